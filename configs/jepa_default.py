# The seed's default.json: synthetic arithmetic (levels 1-5), MiniLM context encoder trained end to end
# with its EMA target, 4-layer transformer predictor, 6-layer GPT-2-shaped decoder from scratch on GPT-2
# BPE, 30 epochs over the three stages. One GPU, or several with torchrun.
#   python jepa.py configs/jepa_default.py
#   torchrun --standalone --nproc_per_node 4 jepa.py configs/jepa_default.py
out_dir = "out/jepa_default"
name = "jepa-default"
domain = "math"
datasets = "synthetic"
n_train = 20000
n_val = 500
encoder = "minilm"
freeze_encoder = False
predictor_type = "transformer"
pred_layers = 4
pred_dim = 384
pred_heads = 6
use_latent_z = False
tokenizer = "gpt2"
decoder_init = "scratch"
n_layer = 6
n_head = 6
n_embd = 384
loss_type = "cosine"
contrastive_weight = 0.1
epochs = 30
batch_size = 32

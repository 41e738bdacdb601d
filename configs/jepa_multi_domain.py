# The seed's multi_domain.json: math (synthetic), code (CodeSearchNet Python, CodeBERT encoder) and text
# (HotpotQA, MiniLM) together; latent_dim 768 (MiniLM's 384 gets a learned projection), a 6-layer
# predictor with the stochastic latent z. Needs the network once for CodeBERT and the two downloads (or
# copies in data_dir and a local CodeBERT directory); one or more GPUs.
#   torchrun --standalone --nproc_per_node 4 jepa.py configs/jepa_multi_domain.py
out_dir = "out/jepa_multi_domain"
name = "jepa-multi-domain"
domain = "multi"
datasets = "synthetic,codesearchnet,hotpotqa"
n_train = 20000
n_val = 500
encoder = "minilm"
code_encoder = "microsoft/codebert-base"
latent_dim = 768
max_length = 256
freeze_encoder = False
predictor_type = "transformer"
pred_layers = 6
pred_dim = 768
pred_heads = 12
use_latent_z = True
z_dim = 64
n_z_samples = 4
tokenizer = "gpt2"
n_layer = 6
n_head = 12
n_embd = 768
block_size = 512
prefix_len = 10
max_new_tokens = 384
epochs = 30
batch_size = 32
eval_batch_size = 64

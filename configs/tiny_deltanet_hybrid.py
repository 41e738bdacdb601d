# Tiny hybrid for CI and smoke tests: 2 layers (Gated DeltaNet, then attention) x 32 on GPT-2 tokens,
# naive PyTorch GDN op, fp32. Under a minute on 2 CPU cores.
#   python prep/lm_text.py --input ../shared/data/tinyshakespeare/input.txt --out_dir data/tinyshakespeare
#   python deltanet_hybrid.py configs/tiny_deltanet_hybrid.py
checkpoint_dir = "out/tiny_deltanet_hybrid/checkpoints_baseline"
results_dir = "out/tiny_deltanet_hybrid/results"
data_dir = "data/tinyshakespeare"
eval_interval = 25
eval_iters = 4
log_interval = 5
save_interval = 50
n_layer = 2
n_embd = 32
attention_layers = [1]
n_head = 2
gdn_n_head = 2
gdn_head_k_dim = 16
gdn_head_v_dim = 16
mlp_hidden = 64
block_size = 32
batch_size = 8
micro_batch_size = 4
max_iters = 100
learning_rate = 1e-2
min_lr = 1e-3
warmup_iters = 10
use_triton = False
compile = False

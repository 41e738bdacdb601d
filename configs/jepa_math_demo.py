# CPU demo of the JEPA reasoner: synthetic arithmetic (levels 1-2), the real MiniLM encoder (frozen,
# features cached), a small transformer predictor and byte-level decoder; prints the ablation table,
# i.e. exact match before and after latent search. Target: under 10 minutes on 2 CPU cores.
#   python jepa.py configs/jepa_math_demo.py
out_dir = "out/jepa_math_demo"
name = "jepa-math-demo"
domain = "math"
n_train = 3000
n_val = 200
feedback_pool = 100
max_level = 2
curriculum_epochs = 2
freeze_encoder = True
predictor_type = "transformer"
pred_layers = 2
pred_dim = 128
pred_heads = 4
tokenizer = "bytes"
n_layer = 2
n_head = 4
n_embd = 128
block_size = 96
prefix_len = 4
max_new_tokens = 48
verifier_hidden = 256
verifier_epochs = 10
verifier_perturbations = 4
epochs = 40
stage1_frac = 0.3
stage2_frac = 0.3
batch_size = 32
eval_batch_size = 200
eval_interval = 8
learning_rate = 1e-3
warmup_steps = 20
log_interval = 100
search_beam = 2
search_branching = 4
search_depth = 2
denoise_steps = 3
refine_steps = 10
refine_lr = 0.02
cluster_candidates = 8
n_clusters = 3

# Tiny CPU run of gru_steer.py's whole pipeline (prep, phase 1, phase 2, eval) on a random tiny Qwen3
# student/teacher pair sharing Qwen3's vocabulary; the same code path as the real configs, smaller.
#   python prep/gsm_icot.py --local_dir ../shared/data/gsm8k_icot --out_dir data/gsm8k
#   python gru_steer.py configs/tiny_gru_steer.py --mode=tiny_models && python gru_steer.py configs/tiny_gru_steer.py
# ~25 s with OMP_NUM_THREADS=1 on a shared 2-core box (2 OpenMP threads spin against other jobs: ~5x slower).
# Random weights answer nothing right: the run shows the pipeline works, not the seed's numbers.
out_dir = "out/tiny_gru_steer"
name = "tiny-gru-steer"
student = "out/tiny_gru_steer/models/student"
teacher = "out/tiny_gru_steer/models/teacher"
dtype = "float32"
train_path = "data/gsm8k/gsm_valid.json"
eval_path = "data/gsm8k/gsm_test.json"
n_trajectories = 16
n_val_trajectories = 4
max_eval_examples = 8
max_new_tokens = 16
gen_batch_size = 8
seq_len = 256
intervention_layer = 1
proj_dim = 32
gru_hidden = 32
window = 8
proxy_window = 4
steer_rank = 4
phase1_iters = 20
phase2_iters = 20
frag_horizon = 4
batch_size = 2
gradient_accumulation_steps = 1
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 2
log_interval = 5
eval_interval = 10
tda_fixed_n = 8
device = "cpu"

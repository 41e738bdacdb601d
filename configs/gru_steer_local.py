# Seed 004, "Local" section: one 24 GB GPU (RTX 3090/4090). Same models and controller as the base
# config; batch 2 x 8 accumulation steps, gradient checkpointing on the student, bf16, 32-token window.
#   python gru_steer.py configs/gru_steer_local.py
out_dir = "out/gru_steer_local"
name = "gru-steer-local"
train_path = "data/gsm8k/gsm_train.json"
eval_path = "data/gsm8k/gsm_test.json"
student = "Qwen/Qwen3-0.6B"
teacher = "Qwen/Qwen3-1.7B"
dtype = "bfloat16"
intervention_layer = 4
window = 32
proxy_window = 16
steer_rank = 16
n_trajectories = 1000
n_val_trajectories = 100
max_new_tokens = 512
gen_batch_size = 16
seq_len = 512
phase1_iters = 1000
phase2_iters = 2000
gradient_checkpointing = True
batch_size = 2
gradient_accumulation_steps = 8
learning_rate = 3e-4

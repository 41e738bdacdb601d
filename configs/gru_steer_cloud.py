# Seed 004, "Cloud" section: H100/A100 80 GB GPUs, student and teacher resident together, larger
# batches (16 per GPU), a 64-token window, 7,000 trajectories, no checkpointing.
#   torchrun --standalone --nproc_per_node 8 gru_steer.py configs/gru_steer_cloud.py
out_dir = "out/gru_steer_cloud"
name = "gru-steer-cloud"
train_path = "data/gsm8k/gsm_train.json"
eval_path = "data/gsm8k/gsm_test.json"
student = "Qwen/Qwen3-0.6B"
teacher = "Qwen/Qwen3-1.7B"
dtype = "bfloat16"
intervention_layer = 4
window = 64
proxy_window = 16
steer_rank = 16
n_trajectories = 7000                # ~5 GB of float16 activations (the iCoT train file has 385k)
n_val_trajectories = 500
max_new_tokens = 512
gen_batch_size = 64
seq_len = 512
phase1_iters = 2000
phase2_iters = 4000
gradient_checkpointing = False
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 3e-4
eval_interval = 250

# Tiny Coconut (M3) for CI and smoke tests: a 2-layer scratch GPT on a word-level tokenizer,
# 1 epoch per stage up to 2 thoughts. Seconds on 2 CPU cores.
#   python coconut.py configs/tiny_coconut.py --train_path=... --val_path=... --tokenizer=...
out_dir = "out/tiny_coconut"
name = "tiny-coconut"
init_from = "scratch"
n_layer = 2
n_head = 2
n_embd = 32
block_size = 256
dropout = 0.0
method = "coconut"
feedback_mode = "continuous"
c_thought = 1
epochs_per_stage = 1
max_latent_stage = 2
num_epochs = 3
batch_size = 8
gradient_accumulation_steps = 2
learning_rate = 1e-3
max_new_tokens = 32
eval_batch_size = 16
log_interval = 5

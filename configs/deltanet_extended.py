# Seed 001 "--experiment extended": the baseline trained for 5000 steps (warmup 500), as the seed's
# get_extended_reasoning_config; 246M tokens.
#   python deltanet_hybrid.py --experiment extended             # = configs/deltanet_extended.py
data_dir = "data/fineweb10B"
checkpoint_dir = "checkpoints_baseline"
results_dir = "results"
attention_layers = [5, 11]
learning_rate = 2e-3
batch_size = 48
block_size = 1024
max_iters = 5000
warmup_iters = 500

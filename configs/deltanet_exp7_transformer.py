# Seed 001's Experiment 7, "Full Transformer (100%)": softmax attention in all 12 layers, 300 steps of
# 48 x 1024 tokens, lr 2e-3, 10% warmup. Exp7: val loss 5.146 (worst of 13).
#   python deltanet_hybrid.py --experiment exp7_transformer
data_dir = "data/fineweb10B"
checkpoint_dir = "checkpoints_exp7_transformer"
results_dir = "results/exp7_transformer"
attention_layers = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
learning_rate = 2e-3
batch_size = 48
block_size = 1024
max_iters = 300
warmup_iters = 30

# Seed 001's Experiment 7 winner rerun: "Hybrid Sparse 17%" (attention at [5, 11]), 300 steps of
# 48 x 1024 tokens (14.7M), lr 2e-3, 10% warmup. Exp7 reported val loss 4.055 (SmolLM tokenizer,
# cosmopedia-v2; not comparable with FineWeb / GPT-2 BPE, compare the three exp7 configs with each other).
#   python deltanet_hybrid.py --experiment exp7_hybrid_sparse
data_dir = "data/fineweb10B"
checkpoint_dir = "checkpoints_exp7_hybrid_sparse"
results_dir = "results/exp7_hybrid_sparse"
attention_layers = [5, 11]
learning_rate = 2e-3
batch_size = 48
block_size = 1024
max_iters = 300
warmup_iters = 30

# Seed 001's Experiment 7, "Full DeltaNet (0%)": all 12 layers Gated DeltaNet, 300 steps of 48 x 1024
# tokens, lr 1e-3 (Exp7's LR ablation: pure DeltaNet prefers 1e-3), 10% warmup. Exp7: val loss 4.396.
#   python deltanet_hybrid.py --experiment exp7_pure
data_dir = "data/fineweb10B"
checkpoint_dir = "checkpoints_exp7_pure"
results_dir = "results/exp7_pure"
attention_layers = []
learning_rate = 1e-3
min_lr = 1e-4
batch_size = 48
block_size = 1024
max_iters = 300
warmup_iters = 30

# Seed 001 baseline mode ("Hybrid Sparse 17%"): 12 x 768, softmax attention at layers [5, 11], Gated
# DeltaNet elsewhere; 1000 steps of 48 x 1024 tokens, lr 2e-3, warmup 100 + cosine. The seed's val loss
# 4.055 was on cosmopedia-v2 with SmolLM's tokenizer, so ours (FineWeb, GPT-2 BPE) is not comparable.
#   python prep/lm_text.py --dataset fineweb --out_dir data/fineweb10B
#   python deltanet_hybrid.py configs/deltanet_base.py          # = python deltanet_hybrid.py
#   torchrun --standalone --nproc_per_node 8 deltanet_hybrid.py configs/deltanet_base.py --micro_batch_size=6
data_dir = "data/fineweb10B"
checkpoint_dir = "checkpoints_baseline"
results_dir = "results"
attention_layers = [5, 11]
learning_rate = 2e-3
batch_size = 48
block_size = 1024
max_iters = 1000
warmup_iters = 100

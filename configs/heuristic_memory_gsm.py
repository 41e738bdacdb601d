# The heuristic memory for GSM8K (the seed's args/gsm_heuristic.yaml): key/value dimensions, the
# retrieval cutoff and top-k, the index directory. A run config activates it with
#   heuristic_memory = "configs/heuristic_memory_gsm.py"
# Copy this file to sweep a knob by hand (seed step 5), or use `--sweep=True` for the threshold.
index_dir = "data/index/gsm"
key_dim = 128
value_dim = 256
retrieval_threshold = 0.8
top_k = 4
temperature = 0.1
max_nudge_ratio = 0.5
nudge_hidden = 512
index_type = "flat"

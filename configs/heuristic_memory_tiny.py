# A small flat memory for configs/tiny_heuristic.py (CI): 16-d keys and values, a low cutoff so a
# tiny model's thoughts hit something.
index_dir = "out/tiny_heuristic/index"
key_dim = 16
value_dim = 16
retrieval_threshold = 0.3
top_k = 4
temperature = 0.1
max_nudge_ratio = 0.5
nudge_hidden = 32
index_type = "flat"

# The seed's math_small.json: the lightweight variant, MLP predictor on a frozen MiniLM backbone (its
# features are cached), a 4-layer byte-level decoder; synthetic arithmetic levels 1-4. A GPU takes
# minutes; a CPU an hour or so.
#   python jepa.py configs/jepa_math_small.py
out_dir = "out/jepa_math_small"
name = "jepa-math-small"
domain = "math"
n_train = 5000
n_val = 200
feedback_pool = 200
max_level = 4
curriculum_epochs = 3
freeze_encoder = True
predictor_type = "mlp"
pred_layers = 3
pred_dim = 1024
tokenizer = "bytes"
n_layer = 4
n_head = 4
n_embd = 256
block_size = 128
prefix_len = 8
max_new_tokens = 96
epochs = 12
batch_size = 64
eval_batch_size = 200
learning_rate = 1e-3

# CPU demo (`make demo`): M1-M4b on the labelled small-graph ProsQA variant (prep/prosqa.py
# --variant small: ~10 nodes, 2-4 hops), a 4-layer scratch GPT on a word-level tokenizer.
# The Makefile sets method/feedback_mode per model:
#   python coconut.py configs/demo_prosqa_small.py --method=cot --out_dir=out/demo/m1_cot
out_dir = "out/demo/m3_coconut"
name = "demo-coconut"
init_from = "scratch"
train_path = "data/prosqa_small/prosqa_train.json"
val_path = "data/prosqa_small/prosqa_valid.json"
tokenizer = "data/prosqa_small/words.tiktoken"
max_train_examples = 3000
max_eval_examples = 300
n_layer = 4
n_head = 4
n_embd = 128
block_size = 256
dropout = 0.0
method = "coconut"
feedback_mode = "continuous"
c_thought = 1
epochs_per_stage = 1
max_latent_stage = 4
num_epochs = 6
batch_size = 32
gradient_accumulation_steps = 1
learning_rate = 1e-3
max_new_tokens = 64
eval_batch_size = 100
eval_interval = 1
log_interval = 20

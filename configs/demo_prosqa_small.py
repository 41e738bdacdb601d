# CPU demo (`make demo`): M1-M4b on the labelled small-graph ProsQA variant (prep/prosqa.py
# --variant small: ~7 nodes, 2-3 hops, the real vocabulary and templates), a 2-layer scratch GPT
# on a word-level tokenizer, Meta's curriculum compressed to 2 epochs per stage. The Makefile sets
# method/feedback_mode per model:
#   python coconut.py configs/demo_prosqa_small.py --method=cot --out_dir=out/demo/m1_cot
out_dir = "out/demo/m3_coconut"
name = "demo-coconut"
init_from = "scratch"
train_path = "data/prosqa_small/prosqa_train.json"
val_path = "data/prosqa_small/prosqa_valid.json"
tokenizer = "data/prosqa_small/words.tiktoken"
max_train_examples = 4000
max_eval_examples = 300
n_layer = 2
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0
method = "coconut"
feedback_mode = "continuous"
c_thought = 1
epochs_per_stage = 2
max_latent_stage = 3
num_epochs = 8
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 2e-3
reset_optimizer = "epoch"
max_new_tokens = 48
eval_batch_size = 100
eval_interval = 2
log_interval = 50

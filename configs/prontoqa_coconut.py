# Coconut on ProntoQA 5-hop (paper Table 1: 99.8 +- 0.2); Meta's args/prontoqa_coconut.yaml.
#   torchrun --standalone --nproc_per_node 4 coconut.py configs/prontoqa_coconut.py --gradient_accumulation_steps=1
# Data: python prep/prontoqa.py (see prep/README.md).
out_dir = "out/prontoqa_coconut"
name = "prontoqa-coconut"
init_from = "gpt2"
train_path = "data/prontoqa/prontoqa_train.json"
val_path = "data/prontoqa/prontoqa_valid.json"
method = "coconut"
feedback_mode = "continuous"
c_thought = 1
epochs_per_stage = 5
max_latent_stage = 6
pad_latent_to_max = True
num_epochs = 50
batch_size = 32
gradient_accumulation_steps = 4
learning_rate = 1e-4
weight_decay = 0.01
reset_optimizer = "epoch"
seed = 0
max_new_tokens = 128

# GSM8K CoT warm-up (Meta's args/gsm_cot.yaml; paper Table 1 CoT: 42.9). Meta keeps the checkpoint
# with the best validation accuracy (epoch 6, ~40%) and starts gsm_coconut.py from it.
#   torchrun --standalone --nproc_per_node 4 coconut.py configs/gsm_cot.py --gradient_accumulation_steps=1
# Data: python prep/gsm_icot.py (see prep/README.md).
out_dir = "out/gsm_cot"
name = "gsm-cot"
init_from = "gpt2"
train_path = "data/gsm8k/gsm_train.json"
val_path = "data/gsm8k/gsm_valid.json"
method = "cot"
num_epochs = 25
batch_size = 32
gradient_accumulation_steps = 4
learning_rate = 1e-4
weight_decay = 0.01
reset_optimizer = "never"
seed = 0
max_new_tokens = 64

# Coconut on GSM8K (Meta's args/gsm_coconut.yaml; paper Table 1: 34.1 +- 1.5): c = 2 thoughts per
# step, 3 epochs per stage up to stage 3, then 6 thoughts and no steps; starts at epoch 3 (stage 1)
# from the best CoT checkpoint.
#   torchrun --standalone --nproc_per_node 4 coconut.py configs/gsm_coconut.py --gradient_accumulation_steps=1
out_dir = "out/gsm_coconut"
name = "gsm-coconut"
init_from = "gpt2"
load_model_path = "out/gsm_cot/ckpt_best.pt"
start_epoch = 3
train_path = "data/gsm8k/gsm_train.json"
val_path = "data/gsm8k/gsm_valid.json"
method = "coconut"
feedback_mode = "continuous"
c_thought = 2
epochs_per_stage = 3
max_latent_stage = 3
pad_latent_to_max = True
num_epochs = 25
batch_size = 32
gradient_accumulation_steps = 4
learning_rate = 1e-4
weight_decay = 0.01
reset_optimizer = "epoch"
seed = 0
max_new_tokens = 64

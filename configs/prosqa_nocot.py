# M2 no-CoT on ProsQA (paper Table 1: 76.7).
#   torchrun --standalone --nproc_per_node 1 coconut.py configs/prosqa_nocot.py
#   (4 GPUs: --nproc_per_node 4 --gradient_accumulation_steps=1 keeps the effective batch at 128)
# Seed 003 step 1.4: batch 32 x grad accum 4, 50 epochs, seed 0, fp32, lr 1e-4, wd 0.01.
out_dir = "out/prosqa_nocot"
name = "prosqa-nocot"
init_from = "gpt2"
train_path = "data/prosqa/prosqa_train.json"
val_path = "data/prosqa/prosqa_valid.json"
method = "no_cot"
feedback_mode = "continuous"
c_thought = 1
epochs_per_stage = 5
max_latent_stage = 6
pad_latent_to_max = True
uniform_prob = 0.0
num_epochs = 50
batch_size = 32
gradient_accumulation_steps = 4
learning_rate = 1e-4
weight_decay = 0.01
reset_optimizer = "epoch"
bf16 = False
seed = 0
max_new_tokens = 128

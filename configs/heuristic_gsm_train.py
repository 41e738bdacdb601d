# Seed playbook step 3: fit the heuristic memory + nudge net on the GSM8K training split on top of the
# frozen GSM8K Coconut (configs/gsm_coconut.py, paper Table 1: 34.1). Every example trains the nudge
# MLP and inserts its thought transitions; index + weights land in data/index/gsm. Live plot:
# out/heuristic_gsm_train/live_train.png.
#   python heuristic.py configs/heuristic_gsm_train.py
#   torchrun --standalone --nproc_per_node 4 heuristic.py configs/heuristic_gsm_train.py
out_dir = "out/heuristic_gsm_train"
name = "heuristic-gsm-train"
load_model_path = "out/gsm_coconut/ckpt_best.pt"
heuristic_memory = "configs/heuristic_memory_gsm.py"
train_mode = True
train_path = "data/gsm8k/gsm_train.json"
eval_stage = 3
num_epochs = 1
batch_size = 16
learning_rate = 1e-3
save_interval = 50000
baseline_accuracy = 0.341

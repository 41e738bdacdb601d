# Seed playbook steps 4-5: the frozen memory of configs/heuristic_gsm_train.py on the GSM8K test set
# (nothing is written to data/index/gsm); accuracy with vs without the memory against the 34.1
# Coconut baseline; results.jsonl has one line per question. Step 5 (threshold sweep, table + plot):
#   python heuristic.py configs/heuristic_gsm_eval.py
#   torchrun --standalone --nproc_per_node 4 heuristic.py configs/heuristic_gsm_eval.py
#   python heuristic.py configs/heuristic_gsm_eval.py --sweep=True
out_dir = "out/heuristic_gsm_eval"
name = "heuristic-gsm-eval"
load_model_path = "out/gsm_coconut/ckpt_best.pt"
heuristic_memory = "configs/heuristic_memory_gsm.py"
train_mode = False
val_path = "data/gsm8k/gsm_test.json"
eval_stage = 3
eval_batch_size = 32
sweep_thresholds = "0.5 0.6 0.7 0.8 0.85 0.9 0.95"
baseline_accuracy = 0.341

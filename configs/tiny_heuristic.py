# Tiny heuristic memory for CI and smoke tests: the same code path as configs/heuristic_gsm_*.py on
# the tiny Coconut of configs/tiny_coconut.py, 2 epochs of nudge training. Seconds on 2 CPU cores.
#   python coconut.py configs/tiny_coconut.py --train_path=T --val_path=V --tokenizer=W
#   python heuristic.py configs/tiny_heuristic.py --train_path=T                        # step 3
#   python heuristic.py configs/tiny_heuristic.py --train_mode=False --val_path=V [--sweep=True]   # steps 4, 5
out_dir = "out/tiny_heuristic"
name = "tiny-heuristic"
load_model_path = "out/tiny_coconut/ckpt_last.pt"
heuristic_memory = "configs/heuristic_memory_tiny.py"
eval_stage = -1
num_epochs = 2
batch_size = 8
learning_rate = 3e-3
eval_batch_size = 16
log_interval = 4
plot_every = 16
rolling_window = 16
sweep_thresholds = "0.0 0.3 0.6 0.9"
live_plot = False

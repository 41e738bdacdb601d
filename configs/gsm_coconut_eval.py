# Evaluate the best GSM8K Coconut checkpoint on the GSM8K test set with 6 thoughts (Meta's
# args/gsm_coconut_eval.yaml hides this in `resume: 15`; here it is eval_stage = 3 -> 3 x c = 6).
#   torchrun --standalone --nproc_per_node 1 coconut.py configs/gsm_coconut_eval.py --load_model_path=out/gsm_coconut/ckpt_best.pt
out_dir = "out/gsm_coconut_eval"
name = "gsm-coconut-eval"
init_from = "gpt2"
only_eval = True
load_model_path = "out/gsm_coconut/ckpt_best.pt"
val_path = "data/gsm8k/gsm_test.json"
method = "coconut"
feedback_mode = "continuous"
c_thought = 2
epochs_per_stage = 3
max_latent_stage = 3
eval_stage = 3
max_new_tokens = 64

# Evaluate a ProsQA Coconut-style checkpoint (M3/M4/M4b) on the ProsQA test split with 6 thoughts
# (Meta's prosqa_coconut_eval.yaml hides this in `resume: 40`; here eval_stage = 6 -> 6 x c = 6).
# For M4/M4b add --feedback_mode=frozen / learned_shared to match the checkpoint.
#   python coconut.py configs/prosqa_coconut_eval.py --load_model_path=out/prosqa_coconut/ckpt_best.pt
out_dir = "out/prosqa_coconut_eval"
name = "prosqa-coconut-eval"
init_from = "gpt2"
only_eval = True
load_model_path = "out/prosqa_coconut/ckpt_best.pt"
val_path = "data/prosqa/prosqa_test.json"
method = "coconut"
feedback_mode = "continuous"
c_thought = 1
epochs_per_stage = 5
max_latent_stage = 6
eval_stage = 6
max_new_tokens = 128

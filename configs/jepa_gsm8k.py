# GSM8K in the kit's format (prep/gsm_icot.py: train = GSM8K train minus the iCoT valid questions,
# val = the iCoT valid split): steps are the <<a*b=c>> calculator annotations. Frozen MiniLM, transformer
# predictor, GPT-2-BPE decoder. One GPU.
#   python prep/gsm_icot.py --local_dir ../shared/data/gsm8k_icot --offline_train ../shared/data/gsm8k/train.jsonl --out_dir data/gsm8k
#   python jepa.py configs/jepa_gsm8k.py
out_dir = "out/jepa_gsm8k"
name = "jepa-gsm8k"
domain = "math"
datasets = "gsm8k"
gsm8k_train_path = "data/gsm8k/gsm_train.json"
gsm8k_val_path = "data/gsm8k/gsm_valid.json"
n_train = 0
n_val = 500
feedback_pool = 300
curriculum_epochs = 4
freeze_encoder = True
predictor_type = "transformer"
pred_layers = 4
tokenizer = "gpt2"
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
max_new_tokens = 160
epochs = 30
batch_size = 32

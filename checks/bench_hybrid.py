"""Benchmark: training tokens/s and MFU of deltanet_hybrid.py's model (12 x 768, attention at [5, 11],
Gated DeltaNet elsewhere, GPT-2 vocabulary) on one GPU in bf16, against the seed's 118K tokens/s
(seed 001 / Exp7, FLA kernels, one H100). Issue 4's target: >= 40% MFU.

A step is what deltanet_hybrid.py does per optimizer step: bf16 autocast over fp32 weights, forward,
backward, grad clipping, fused AdamW, on `--batch_size` sequences of `--seq_len` random tokens (48 x
1024 as the seed; if that does not fit, the micro-batch is halved and gradients are accumulated, and
the script says so). Before timing, one step through our Triton GDN op is checked against the naive
PyTorch op on the same weights (loss and gradients, rel-RMS); the script exits 1 on a numerical
mismatch or a non-finite loss, never on speed.

FLOP model, per trained token (forward + backward), d = n_embd, T = seq_len:
  6 N        N = weights of every Linear (GDN/attention projections, SwiGLU, LM head; the embedding
             lookup is not a matmul): 2 FLOPs per multiply-add, x3 for forward + backward
  12 d T     per attention layer: QK^T and AV (PaLM / nanoGPT count; the causal half is not discounted)
  2 (3CK + 2CV + 3KV) + 2 (7CK + 5CV + 8KV)   per GDN layer and head, chunk C = 64: the chunked
             gated delta rule forward and backward (reference/deltanet_trm.md section 2; the same
             count as checks/bench_gated_delta.py)
  left out: conv, norms, gates, RoPE, softmax / cross-entropy, optimizer (< 1% together).
For the default model: 6N = 1.479 GFLOP, attention 0.019, GDN 0.240 -> 1.737 GFLOP per token, so
the seed's 118K tokens/s is 205 TFLOP/s = 21% MFU on an H100 SXM, and 40% MFU is 228K tokens/s.
Peak dense bf16 tensor-core TFLOP/s assumed (NVIDIA datasheets, without sparsity): PEAK_TFLOPS below;
another GPU needs --peak_tflops.

    python checks/bench_hybrid.py                  # GPU: full size; CPU: a tiny size, GPU numbers owed
    python checks/bench_hybrid.py --compile        # torch.compile around the model (the GDN op stays eager)
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (0 active drivers otherwise)
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
import deltanet_hybrid as dh  # noqa: E402

SEED_TOKENS_PER_S = 118_000  # seed 001: Exp7's "Hybrid Sparse 17%", one H100, FLA
TARGET_MFU = 0.40  # issue 4
PEAK_TFLOPS = {  # substring of torch.cuda.get_device_name() -> dense bf16 TFLOP/s
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4,
    "A100": 312.0, "B200": 2250.0, "L40S": 362.0,
}
CHUNK = 64  # C of the chunk kernels
CPU_SIZE = dict(n_layer=2, n_embd=64, attention_layers=(1,), n_head=2, gdn_n_head=2, gdn_head_k_dim=32,
                gdn_head_v_dim=32, mlp_hidden=128)


def flops_per_token(cfg, T):
    """The FLOP model above, per part."""
    d, H, K, V, C = cfg.n_embd, cfg.gdn_n_head, cfg.gdn_head_k_dim, cfg.gdn_head_v_dim, CHUNK
    n_attn = len(cfg.attention_layers)
    n_gdn = cfg.n_layer - n_attn
    gdn_linear = d * (2 * H * K + 2 * H * V + 2 * H) + H * V * d
    linear = n_gdn * gdn_linear + n_attn * 4 * d * d + cfg.n_layer * 3 * d * cfg.mlp_hidden + d * cfg.vocab_size
    rule = 2 * (3 * C * K + 2 * C * V + 3 * K * V) + 2 * (7 * C * K + 5 * C * V + 8 * K * V)
    parts = {"6N (matmul weights)": 6 * linear, "attention (12 d T per layer)": n_attn * 12 * d * T,
             "gated delta rule": n_gdn * H * rule}
    parts["total"] = sum(parts.values())
    return parts


def peak_tflops(override):
    if override:
        return override, "given"
    if not HAS_GPU:
        return None, "cpu"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():  # the more specific names come first
        if key in name:
            return value, name
    return None, name


def rel_rms(ref, out):
    ref, out = ref.detach().double(), out.detach().double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def check_triton_vs_naive(cfg, T, device, autocast):
    """One forward + backward of 2 sequences through each GDN op on the same weights."""
    torch.manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (2, T + 1), device=device)
    out = {}
    state = None
    for use_triton in (False, True):
        model = dh.HybridLM(dh.HybridConfig(**{**cfg.__dict__, "use_triton": use_triton})).to(device)
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        with autocast:
            loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        out[use_triton] = (loss.detach().float(), {n: p.grad for n, p in model.named_parameters()})
        del model
    # bf16 on a GPU (the op's T, W, U, h are bf16 there); exact float32 math under the interpreter
    tol_loss, tol_grad = (1e-2, 5e-2) if HAS_GPU else (1e-5, 1e-4)
    d_loss = abs(out[True][0] - out[False][0]).item() / abs(out[False][0]).item()
    worst = max((rel_rms(out[False][1][n], g), n) for n, g in out[True][1].items())
    ok = d_loss <= tol_loss and worst[0] <= tol_grad and bool(torch.isfinite(out[True][0]))
    print(f"triton vs naive GDN op, one step: loss {out[True][0]:.5f} vs {out[False][0]:.5f} (rel {d_loss:.1e}, "
          f"expected <= {tol_loss:.0e}); worst grad rel-rms {worst[0]:.1e} ({worst[1]}, expected <= {tol_grad:.0e})"
          f"  {'ok' if ok else 'MISMATCH'}")
    return ok


def time_steps(cfg, batch, micro, T, steps, warmup, device, autocast, compile_model):
    """Mean wall time of `steps` optimizer steps after `warmup` untimed ones; returns (s/step, last loss)."""
    torch.manual_seed(0)
    model = dh.HybridLM(cfg).to(device)
    c = argparse.Namespace(learning_rate=2e-3, weight_decay=0.1, beta1=0.9, beta2=0.95)
    optimizer = dh.configure_optimizer(model, c, device)
    fwd = torch.compile(model) if compile_model else model
    data = torch.randint(0, 50257, (batch, T + 1), device=device)  # GPT-2 ids, as real data
    accum = batch // micro

    def step():
        for m in range(accum):
            x = data[m * micro:(m + 1) * micro]
            with autocast:
                loss = fwd(x[:, :-1], x[:, 1:])
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if HAS_GPU:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = loss.item()  # waits for the GPU
    return (time.perf_counter() - t0) / steps, loss


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch_size", type=int, default=48 if HAS_GPU else 2, help="sequences per step")
    p.add_argument("--seq_len", type=int, default=1024 if HAS_GPU else 64)
    p.add_argument("--steps", type=int, default=20 if HAS_GPU else 3, help="timed steps")
    p.add_argument("--warmup", type=int, default=5 if HAS_GPU else 1, help="untimed steps first (autotune, compile)")
    p.add_argument("--attention_layers", type=str, default="5,11" if HAS_GPU else "1",
                   help="comma-separated; '' = pure GDN")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="override the datasheet table")
    args = p.parse_args(argv)
    device = "cuda" if HAS_GPU else "cpu"
    layers = tuple(int(i) for i in args.attention_layers.split(",") if i)
    size = {} if HAS_GPU else CPU_SIZE
    cfg = dh.HybridConfig(**{**size, "attention_layers": layers})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=HAS_GPU)
    import triton
    print(f"device: {torch.cuda.get_device_name() if HAS_GPU else 'cpu (TRITON_INTERPRET=1 for the check)'}, "
          f"torch {torch.__version__}, triton {triton.__version__}, {'bf16 autocast' if HAS_GPU else 'float32'}")
    n_params = dh.parameter_formula(cfg)["total"]
    print(f"model: {cfg.n_layer} x {cfg.n_embd}, attention at {list(layers)}, GDN {cfg.gdn_n_head} heads "
          f"K={cfg.gdn_head_k_dim} V={cfg.gdn_head_v_dim}, {n_params:,} parameters"
          f"{'' if HAS_GPU else ' (CPU: a tiny size of the same model code)'}")

    ok = check_triton_vs_naive(cfg, min(args.seq_len, 128 if HAS_GPU else 64), device, autocast)

    # the op deltanet_hybrid.py would pick here: Triton on a GPU, the naive op on CPU (the interpreter
    # only shows that the kernels run; its speed means nothing)
    cfg.use_triton = HAS_GPU
    micro = args.batch_size
    while True:
        try:
            dt, loss = time_steps(cfg, args.batch_size, micro, args.seq_len, args.steps, args.warmup, device,
                                  autocast, args.compile)
            break
        except torch.OutOfMemoryError:
            if micro == 1 or args.batch_size % (micro // 2):
                raise
            micro //= 2
            torch.cuda.empty_cache()
            print(f"out of memory: micro-batch {micro * 2} -> {micro} with gradient accumulation")
    ok &= bool(torch.isfinite(torch.tensor(loss)))
    fl = flops_per_token(cfg, args.seq_len)
    tok_s = args.batch_size * args.seq_len / dt
    print("FLOPs per token: " + ", ".join(f"{k} {v / 1e9:.3f} G" for k, v in fl.items()))
    print(f"step: {args.batch_size} x {args.seq_len} tokens (micro-batch {micro}), {dt * 1e3:.1f} ms, "
          f"{tok_s:,.0f} tokens/s, {fl['total'] * tok_s / 1e12:.2f} TFLOP/s, loss {loss:.3f}"
          + (f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if HAS_GPU else ""))
    peak, source = peak_tflops(args.peak_tflops)
    if peak:
        mfu = fl["total"] * tok_s / (peak * 1e12)
        print(f"MFU {mfu:.1%} of {peak:.0f} TFLOP/s ({source}); target >= {TARGET_MFU:.0%} -> "
              f"{'met' if mfu >= TARGET_MFU else 'NOT met'} (reported, not a failure)")
        print(f"vs the seed's {SEED_TOKENS_PER_S / 1e3:.0f}K tokens/s (FLA, H100): {tok_s / SEED_TOKENS_PER_S:.2f}x")
    elif HAS_GPU:
        print(f"MFU: no peak TFLOP/s known for '{source}'; pass --peak_tflops")
    else:
        seed_mfu = flops_per_token(dh.HybridConfig(), 1024)["total"] * SEED_TOKENS_PER_S / (PEAK_TFLOPS["H100"] * 1e12)
        print(f"GPU numbers owed: run `python checks/bench_hybrid.py` on an H100 (the seed's 118K tokens/s "
              f"is {seed_mfu:.1%} MFU there by this FLOP model; target >= {TARGET_MFU:.0%})")
    print(f"numerics: {'ok' if ok else 'MISMATCH or non-finite loss'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Benchmark: our chunk_gated_delta_rule (kernels/gated_delta_rule) vs fla's, forward and forward+backward.

GPU: bf16 at (B, T, H, K=V) = (4, 2048, 16, 128), (1, 8192, 16, 128), (8, 4096, 32, 64); prints the
median times, the ratio fla / ours (> 1: ours is faster; issue 4's target is >= 1.0 at every shape),
and achieved TFLOP/s and GB/s for both. fla is a benchmark-only dependency
(`pip install flash-linear-attention`); FLA_FLASH_QLA=0 keeps fla on its Triton kernels rather than
the FlashQLA backend. Without fla the comparison is against naive_chunk_gated_delta_rule (PyTorch).
CPU: tiny sizes, our kernels under TRITON_INTERPRET=1 in float32, against the naive PyTorch path
(fla's chunk op does not run under the interpreter as shipped: its autotuner needs a GPU).

Before timing, every shape checks our output and gradients against a float32 reference
(naive_chunk_gated_delta_rule on the same inputs) and prints rel-RMS vs tolerance; the script
exits 1 on a numerical mismatch only, never on speed.

FLOP model (dense matmul MACs x 2, per token and head, chunk C = 64, as in
../shared/reference/deltanet_trm.md section 2; the same count for both implementations):
    forward   2 (3CK + 2CV + 3KV)        backward  2 (7CK + 5CV + 8KV)   (its recomputation included)
GB/s counts compulsory traffic only: every input read once and every output written once per
pass (backward re-reads q, k, v, g, beta and reads dO, writes the five gradients). Real traffic is
several times higher (T, W, U, h, v_new round trips), so GB/s is a lower bound.

    python checks/bench_gated_delta.py
"""

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (0 active drivers otherwise)
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they save
os.environ["FLA_FLASH_QLA"] = "0"  # fla: Triton kernels, not the FlashQLA (TileLang) backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `kernels`
from kernels.gated_delta_rule import chunk_gated_delta_rule, naive_chunk_gated_delta_rule  # noqa: E402

# -----------------------------------------------------------------------------
# config

gpu_shapes = [(4, 2048, 16, 128), (1, 8192, 16, 128), (8, 4096, 32, 64)]  # (B, T, H, K=V)
cpu_shapes = [(1, 128, 2, 32), (2, 100, 2, 16)]  # interpreter: tiny
chunk = 64  # C in the FLOP model
# rel-RMS tolerances vs the float32 reference: bf16 as fla's tests/ops/test_gdn.py (dbeta, dg looser)
tol_bf16 = dict(o=5e-3, dq=8e-3, dk=8e-3, dv=8e-3, dg=2e-2, dbeta=2e-2)
tol_fp32 = dict.fromkeys(tol_bf16, 1e-4)  # interpreter float32: errors are ~1e-6


def flops(B, T, H, K, V, backward):
    C = chunk
    macs = 3 * C * K + 2 * C * V + 3 * K * V
    if backward:
        macs += 7 * C * K + 5 * C * V + 8 * K * V
    return 2 * macs * B * T * H


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def make_inputs(B, T, H, K, V, dtype, device, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(B, T, H, K, device=device, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, device=device, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device=device) + 4)  # float32, alpha mostly 0.9-0.999
    beta = torch.rand(B, T, H, device=device, dtype=dtype)
    return [q, k, v, g, beta]


def run(fn, inputs, do):
    """Output and the five input grads of fn(q, k, v, g, beta) for upstream grad do."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, _ = fn(*leaves)
    o.backward(do)
    return [o] + [x.grad for x in leaves]


def rel_rms(ref, out):
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def check(label, ref, out, tol):
    """Print rel-RMS of every tensor vs its tolerance; True if all within."""
    ok = True
    for name, r, x in zip(tol, ref, out):
        err = rel_rms(r, x)
        good = err <= tol[name] and bool(torch.isfinite(x).all())
        ok &= good
        print(f"  {label} {name:>5}: rel-rms {err:.2e}, expected <= {tol[name]:.0e}  {'ok' if good else 'MISMATCH'}")
    return ok


def timer(fn, inputs, do, backward):
    """Median ms of fn's forward (or forward + backward)."""
    leaves = [x.detach().clone().requires_grad_(backward) for x in inputs]

    def step():
        o, _ = fn(*leaves)
        if backward:
            o.backward(do)

    if HAS_GPU:
        import triton.testing
        return triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
    step()  # interpreter: compile-free, but the first call also builds caches
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def load_fla():
    """fla's chunk_gated_delta_rule, or (None, reason)."""
    if not HAS_GPU:
        return None, "no GPU: fla's chunk op autotunes, which fails under the interpreter"
    try:
        import fla
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except Exception as e:  # absent, or built for another torch / triton
        return None, f"fla not importable ({type(e).__name__}: {e})"
    return fla_chunk, f"fla {getattr(fla, '__version__', '?')} (FLA_FLASH_QLA=0)"


def main():
    device, dtype = ('cuda', torch.bfloat16) if HAS_GPU else ('cpu', torch.float32)
    shapes, tol = (gpu_shapes, tol_bf16) if HAS_GPU else (cpu_shapes, tol_fp32)
    import triton
    print(f"device: {torch.cuda.get_device_name() if HAS_GPU else 'cpu (TRITON_INTERPRET=1)'}, "
          f"torch {torch.__version__}, triton {triton.__version__}, dtype {dtype}")
    fla_fn, fla_note = load_fla()
    if fla_fn is not None:
        base_fn, base_name = fla_fn, "fla"
        print(f"baseline: {fla_note}")
    else:
        base_fn, base_name = naive_chunk_gated_delta_rule, "naive"
        print(f"baseline: naive_chunk_gated_delta_rule (PyTorch); fla not compared: {fla_note}")
    ours = chunk_gated_delta_rule

    all_ok, ratios = True, []
    for B, T, H, D in shapes:
        K = V = D
        print(f"\n(B, T, H, K=V) = ({B}, {T}, {H}, {D})")
        inputs = make_inputs(B, T, H, K, V, dtype, device)
        do = torch.randn(B, T, H, V, device=device, dtype=dtype)
        # float32 reference on the same (rounded) inputs
        ref = run(naive_chunk_gated_delta_rule, [x.float() for x in inputs], do.float())
        all_ok &= check("ours", ref, run(ours, inputs, do), tol)
        if fla_fn is not None:
            check(" fla", ref, run(fla_fn, inputs, do), tol)  # informative: fla's own error
        del ref

        io_fwd = nbytes(*inputs) + nbytes(do)  # read q, k, v, g, beta; write o (shaped like dO)
        io_bwd = 2 * nbytes(*inputs) + nbytes(do)  # re-read the inputs, read dO, write the five grads
        for backward in (False, True):
            t_ours = timer(ours, inputs, do, backward)
            t_base = timer(base_fn, inputs, do, backward)
            fl = flops(B, T, H, K, V, backward)
            io = io_fwd + (io_bwd if backward else 0)
            ratio = t_base / t_ours
            ratios.append(ratio)
            label = "fwd+bwd" if backward else "fwd    "
            print(f"  {label} ours {t_ours:9.3f} ms  {fl / t_ours / 1e9:7.3g} TFLOP/s {io / t_ours / 1e6:7.3g} GB/s | "
                  f"{base_name} {t_base:9.3f} ms  {fl / t_base / 1e9:7.3g} TFLOP/s {io / t_base / 1e6:7.3g} GB/s | "
                  f"{base_name}/ours {ratio:.2f}")

    if fla_fn is not None:
        met = min(ratios) >= 1.0
        print(f"\nspeed target (issue 4): fla/ours >= 1.0 at every shape and pass; got min {min(ratios):.2f} "
              f"-> {'met' if met else 'NOT met'} (reported, not a failure)")
    else:
        print(f"\nspeed vs fla not measured: {fla_note}")
    print(f"numerics: {'all within tolerance' if all_ok else 'MISMATCH (see above)'}")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()

"""kernels/gated_delta_rule against its float32 spec, naive_recurrent_gated_delta_rule.

Every comparison prints rel-RMS = rms(ref - out) / rms(ref) per tensor (see with `pytest -s`).
On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/kernels/conftest.py) in float32 only:
the interpreter's bf16 tl.dot multiplies bit patterns (triton-lang/triton#11584). On a GPU the same
float32 tests run with TF32 tolerances (Triton's default for float32 tl.dot), and the bf16 / long-T
cases below run too.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/kernels
"""

import pytest
import torch
import torch.nn.functional as F

from kernels.gated_delta_rule import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    naive_chunk_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                                  reason="bf16 and long T need a GPU (bf16 tl.dot is wrong in the interpreter)")

# float32 inputs: ~1e-6 is what the interpreter gives; TF32 dots on a GPU give ~1e-3
TOL_FP32 = 1e-5 if DEVICE == 'cpu' else 5e-3
# bf16 inputs vs the float32 recurrence: fla's thresholds (tests/ops/test_gdn.py); dbeta, dg looser
TOL_BF16 = dict(o=5e-3, ht=5e-3, dq=8e-3, dk=8e-3, dv=8e-3, dh0=8e-3, dbeta=2e-2, dg=2e-2)
GRAD_NAMES = ('dq', 'dk', 'dv', 'dg', 'dbeta', 'dh0')


def rel_rms(ref, out):
    ref, out = ref.detach().double(), out.detach().double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def check(name, ref, out, tol):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if not ref.any():
        # e.g. dg at T = 1 without an initial state: g multiplies a zero state. A relative error is
        # undefined; like fla's tests, accept rounding noise up to 1e-6 in absolute terms
        err = out.abs().max().item()
        print(f"  {name:>5}: reference is exactly 0, max |out| {err:.2e} (tol 1e-06)")
        assert err <= 1e-6, f"{name}: max |out| {err:.2e} > 1e-06 where the reference is 0"
        return
    err = rel_rms(ref, out)
    print(f"  {name:>5}: rel-rms {err:.2e} (tol {tol:.0e})")
    assert err <= tol, f"{name}: rel-rms {err:.2e} > tol {tol:.0e}"


def make_inputs(B, T, H, K, V, N=None, strong_decay=False, normalize_k=True, seed=0):
    """q, k, v, g, beta, h0 in float32 on DEVICE. k is L2-normalised (unless the op will do it),
    beta in (0, 1), g = log alpha <= 0. By default alpha is mostly 0.9-0.999 as in trained GDN
    layers, so tokens a whole chunk apart still interact (with alpha ~ 0.5 the far blocks of the
    chunk's inverse are ~e^-25 and a bug there would go unseen); strong_decay gives alpha ~ e^-14
    and chunk decays near exp(-1000)."""
    torch.manual_seed(seed)
    q = torch.randn(B, T, H, K)
    k = torch.randn(B, T, H, K)
    k = F.normalize(k, dim=-1) if normalize_k else k
    v = torch.randn(B, T, H, V)
    g = F.logsigmoid(torch.randn(B, T, H)) * 20 if strong_decay else F.logsigmoid(torch.randn(B, T, H) + 4)
    beta = torch.rand(B, T, H)
    h0 = torch.randn(B if N is None else N, H, K, V)
    return [x.to(DEVICE) for x in (q, k, v, g, beta, h0)]


def run(fn, inputs, do, dht, use_h0, **kwargs):
    """Output, final state and input grads of fn for upstream grads do (and dht on the final state)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    q, k, v, g, beta, h0 = leaves
    o, ht = fn(q, k, v, g, beta, initial_state=h0 if use_h0 else None, output_final_state=dht is not None,
               **kwargs)
    loss = (o.float() * do).sum() + ((ht * dht).sum() if dht is not None else 0)
    loss.backward()
    grads = dict(zip(GRAD_NAMES, (x.grad for x in leaves)))
    return o, ht, grads


def compare(ref, out, tol, use_h0=True):
    (o_r, ht_r, g_r), (o, ht, g) = ref, out
    tol = tol if isinstance(tol, dict) else dict.fromkeys(('o', 'ht') + GRAD_NAMES, tol)
    check('o', o_r, o, tol['o'])
    if ht_r is not None:
        check('ht', ht_r, ht, tol['ht'])
    for name in GRAD_NAMES:
        if name == 'dh0' and not use_h0:
            assert g[name] is None, "initial state not passed, yet it got a gradient"
            continue
        check(name, g_r[name], g[name], tol[name])


# ---------------------------------------------------------------------------------------------
# naive chunked form vs naive recurrence (pure PyTorch: the two specs agree)

@pytest.mark.parametrize('T', [1, 63, 64, 100, 130])
def test_naive_chunk_matches_recurrent(T):
    inputs = make_inputs(2, T, 2, 16, 24)
    do, dht = torch.randn(2, T, 2, 24, device=DEVICE), torch.randn(2, 2, 16, 24, device=DEVICE)
    print(f"\nnaive chunk vs naive recurrent, T={T}")
    compare(run(naive_recurrent_gated_delta_rule, inputs, do, dht, True),
            run(naive_chunk_gated_delta_rule, inputs, do, dht, True), 1e-5)


# ---------------------------------------------------------------------------------------------
# chunk kernel: outputs, final state and all gradients

@pytest.mark.parametrize('use_h0', [False, True])
@pytest.mark.parametrize('T', [1, 63, 64, 100, 130])
def test_chunk(T, use_h0):
    B, H, K, V = 2, 2, 32, 32
    inputs = make_inputs(B, T, H, K, V)
    do, dht = torch.randn(B, T, H, V, device=DEVICE), torch.randn(B, H, K, V, device=DEVICE)
    print(f"\nchunk vs naive recurrent, T={T}, initial state: {use_h0}")
    compare(run(naive_recurrent_gated_delta_rule, inputs, do, dht, use_h0),
            run(chunk_gated_delta_rule, inputs, do, dht, use_h0), TOL_FP32, use_h0)


def test_chunk_odd_head_dims():
    # K, V not powers of two (fla's layer uses e.g. K = 96): masked tiles; K != V catches swapped strides
    B, T, H, K, V = 1, 100, 3, 24, 40
    inputs = make_inputs(B, T, H, K, V)
    do, dht = torch.randn(B, T, H, V, device=DEVICE), torch.randn(B, H, K, V, device=DEVICE)
    print(f"\nchunk vs naive recurrent, K={K}, V={V}, H={H}")
    compare(run(naive_recurrent_gated_delta_rule, inputs, do, dht, True),
            run(chunk_gated_delta_rule, inputs, do, dht, True), TOL_FP32)


def test_chunk_strong_decay():
    # gamma reaches ~ -1000 inside a chunk: exp(gamma_i - gamma_j) must be masked before exp, or
    # the upper triangle overflows and 0 * inf poisons the sums with NaN
    B, T, H, K, V = 1, 130, 2, 32, 32
    inputs = make_inputs(B, T, H, K, V, strong_decay=True)
    print(f"\nstrong decay: min chunk gamma {inputs[3][0, :64].sum(0).min().item():.0f}")
    do, dht = torch.randn(B, T, H, V, device=DEVICE), torch.randn(B, H, K, V, device=DEVICE)
    compare(run(naive_recurrent_gated_delta_rule, inputs, do, dht, True),
            run(chunk_gated_delta_rule, inputs, do, dht, True), 5 * TOL_FP32)


def test_chunk_l2norm_in_kernel():
    # raw (unnormalised) q, k: gradients flow through the in-kernel L2 norm; no final state asked,
    # so the backward runs without a final-state gradient
    B, T, H, K, V = 2, 100, 2, 32, 16
    inputs = make_inputs(B, T, H, K, V, normalize_k=False)
    inputs[0], inputs[1] = inputs[0] * 3, inputs[1] * 3
    do = torch.randn(B, T, H, V, device=DEVICE)
    print("\nchunk vs naive recurrent, use_qk_l2norm_in_kernel=True")
    ref = run(naive_recurrent_gated_delta_rule, inputs, do, None, True, use_qk_l2norm_in_kernel=True)
    out = run(chunk_gated_delta_rule, inputs, do, None, True, use_qk_l2norm_in_kernel=True)
    assert out[1] is None
    compare(ref, out, TOL_FP32)


def test_chunk_varlen():
    # packed sequences (a single token, a chunk and a half, exactly one chunk, a partial one) vs the
    # same sequences run one by one: no state may leak across a boundary
    lens = [1, 100, 64, 37]
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    H, K, V, N, T = 2, 32, 16, len(lens), sum(lens)
    inputs = make_inputs(1, T, H, K, V, N=N)
    do, dht = torch.randn(1, T, H, V, device=DEVICE), torch.randn(N, H, K, V, device=DEVICE)
    packed = run(chunk_gated_delta_rule, inputs, do, dht, True, cu_seqlens=cu)

    pieces = []
    for n, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        seq = [x[:, bos:eos] for x in inputs[:5]] + [inputs[5][n:n + 1]]
        pieces.append(run(chunk_gated_delta_rule, seq, do[:, bos:eos], dht[n:n + 1], True))
    one_by_one = (torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces]),
                  {name: torch.cat([p[2][name] for p in pieces], 0 if name == 'dh0' else 1)
                   for name in GRAD_NAMES})
    print(f"\nvarlen {lens} vs one by one")
    compare(one_by_one, packed, TOL_FP32)
    print(f"varlen {lens} vs naive recurrent")
    compare(run(naive_recurrent_gated_delta_rule, inputs, do, dht, True, cu_seqlens=cu), packed, TOL_FP32)


# ---------------------------------------------------------------------------------------------
# fused recurrent kernel (forward only)

@pytest.mark.parametrize('use_l2norm', [False, True])
@pytest.mark.parametrize('T', [1, 63, 130])
def test_fused_recurrent(T, use_l2norm):
    B, H, K, V = 2, 2, 32, 24
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, normalize_k=not use_l2norm)
    kwargs = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=use_l2norm)
    o_r, ht_r = naive_recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    o, ht = fused_recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    print(f"\nfused_recurrent vs naive recurrent, T={T}, l2norm: {use_l2norm}")
    check('o', o_r, o, 1e-5)
    check('ht', ht_r, ht, 1e-5)


def test_fused_recurrent_varlen_and_decoding():
    # packed prompts, then decoding one token at a time from the returned cache
    lens = [5, 70, 33]
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    H, K, V, N, T = 2, 16, 32, len(lens), sum(lens)
    q, k, v, g, beta, h0 = make_inputs(1, T, H, K, V, N=N)
    o_r, ht_r = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                 cu_seqlens=cu)
    o, ht = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                             cu_seqlens=cu)
    print(f"\nfused_recurrent varlen {lens}")
    check('o', o_r, o, 1e-5)
    check('ht', ht_r, ht, 1e-5)

    # the last sequence again: prompt of 30 tokens, then 3 single-token steps through the cache
    bos = cu[-2].item()
    seq = [x[:, bos:] for x in (q, k, v, g, beta)]
    o_p, state = fused_recurrent_gated_delta_rule(*[x[:, :30] for x in seq], initial_state=h0[-1:],
                                                  output_final_state=True)
    steps = [o_p]
    for t in range(30, 33):
        o_t, state = fused_recurrent_gated_delta_rule(*[x[:, t:t + 1] for x in seq], initial_state=state,
                                                      output_final_state=True)
        steps.append(o_t)
    print("fused_recurrent prompt + 3 decoding steps vs one call")
    check('o', o_r[:, bos:], torch.cat(steps, 1), 1e-5)
    check('ht', ht_r[-1:], state, 1e-5)


# ---------------------------------------------------------------------------------------------
# GPU only: bf16, long T, realistic head dims

@requires_gpu
@pytest.mark.parametrize('T', [64, 500, 2048])
def test_chunk_bf16(T):
    B, H, K, V = 2, 4, 128, 128
    inputs = make_inputs(B, T, H, K, V)
    low = [x.bfloat16() for x in inputs[:3]] + [inputs[3], inputs[4].bfloat16(), inputs[5]]  # g, h0 fp32
    # upstream grads rounded to bf16 once, so both sides see exactly the same values
    do = torch.randn(B, T, H, V, device=DEVICE).bfloat16().float()
    dht = torch.randn(B, H, K, V, device=DEVICE)
    print(f"\nchunk bf16 vs naive recurrent fp32 (same bf16-rounded inputs), T={T}")
    ref = run(naive_recurrent_gated_delta_rule, [x.float() for x in low], do, dht, True)
    compare(ref, run(chunk_gated_delta_rule, low, do, dht, True), TOL_BF16)


@requires_gpu
def test_chunk_bf16_varlen_l2norm():
    lens = [300, 1, 700, 1024]
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    H, K, V, N, T = 4, 64, 128, len(lens), sum(lens)
    inputs = make_inputs(1, T, H, K, V, N=N, normalize_k=False)
    low = [x.bfloat16() for x in inputs[:3]] + [inputs[3], inputs[4].bfloat16(), inputs[5]]
    do = torch.randn(1, T, H, V, device=DEVICE).bfloat16().float()
    dht = torch.randn(N, H, K, V, device=DEVICE)
    kwargs = dict(cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    print(f"\nchunk bf16 varlen {lens} + l2norm vs naive recurrent fp32")
    ref = run(naive_recurrent_gated_delta_rule, [x.float() for x in low], do, dht, True, **kwargs)
    compare(ref, run(chunk_gated_delta_rule, low, do, dht, True, **kwargs), TOL_BF16)


@requires_gpu
def test_fused_recurrent_bf16():
    B, T, H, K, V = 2, 1000, 4, 128, 128
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V)
    q, k, v, beta = (x.bfloat16() for x in (q, k, v, beta))
    kwargs = dict(initial_state=h0, output_final_state=True)
    o_r, ht_r = naive_recurrent_gated_delta_rule(q.float(), k.float(), v.float(), g, beta.float(), **kwargs)
    o, ht = fused_recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    print(f"\nfused_recurrent bf16 vs naive recurrent fp32, T={T}")
    check('o', o_r, o, TOL_BF16['o'])
    check('ht', ht_r, ht, TOL_BF16['ht'])

"""Step-by-step gated delta rule in Triton, forward only: for decoding and inference.

One program per (V block, sequence, head) keeps its [K, BV] slice of the state in float32 registers
and walks the tokens one by one; per token it costs O(K * V) and reads q, k, v, g, beta once. Use
`chunk_gated_delta_rule` for training (this kernel has no backward) and for long prompts.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def fused_recurrent_gated_delta_rule_fwd_kernel(
    q, k, v, g, beta, o, h0, ht, cu_seqlens, scale, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    USE_QK_L2NORM_IN_KERNEL: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        bos = tl.cast(i_n, tl.int64) * T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]

    p_q = q + (bos * H + i_h) * K + o_k
    p_k = k + (bos * H + i_h) * K + o_k
    p_v = v + (bos * H + i_h) * V + o_v
    p_o = o + (bos * H + i_h) * V + o_v
    p_g = g + bos * H + i_h
    p_b = beta + bos * H + i_h

    b_h = tl.zeros([BK, BV], dtype=tl.float32)  # h[:, V block], FLA's [K, V] orientation
    if USE_INITIAL_STATE:
        p_h0 = h0 + tl.cast(i_nh, tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h += tl.load(p_h0, mask=m_h, other=0.).to(tl.float32)

    # pointers advance by one token per step: no loop index is used in address arithmetic
    for _ in range(0, T):
        b_q = tl.load(p_q, mask=m_k, other=0.).to(tl.float32)
        b_k = tl.load(p_k, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0.).to(tl.float32)
        if USE_QK_L2NORM_IN_KERNEL:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + 1e-6)
        b_h *= tl.exp(tl.load(p_g).to(tl.float32))  # decay before the prediction error
        b_v = tl.load(p_b).to(tl.float32) * (b_v - tl.sum(b_h * b_k[:, None], 0))  # beta (v - h^T k)
        b_h += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * (b_q * scale)[:, None], 0)  # h^T (scale q)
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)
        p_q += H * K
        p_k += H * K
        p_v += H * V
        p_o += H * V
        p_g += H
        p_b += H

    if STORE_FINAL_STATE:
        p_ht = ht + tl.cast(i_nh, tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        tl.store(p_ht, b_h.to(p_ht.dtype.element_ty), mask=m_h)


@torch.compiler.disable  # keep torch.compile out of the Triton launch, as for the chunk op
def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float = None,
    initial_state: torch.Tensor = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor = None,
    use_qk_l2norm_in_kernel: bool = False,
):
    r"""
    Gated delta rule, one token at a time (forward only; no autograd).

    Args:
        q (torch.Tensor): queries of shape `[B, T, H, K]`.
        k (torch.Tensor): keys of shape `[B, T, H, K]`.
        v (torch.Tensor): values of shape `[B, T, H, V]`.
        g (torch.Tensor): log decays (log alpha, <= 0) of shape `[B, T, H]`.
        beta (torch.Tensor): write strengths of shape `[B, T, H]`.
        scale (Optional[float]): multiplies q. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]`, N = B or the number of sequences
            in `cu_seqlens`: the cache when decoding. Default: zeros.
        output_final_state (Optional[bool]): also return the final states. Default: `False`.
        cu_seqlens (torch.LongTensor): `[N + 1]` offsets of packed sequences; then B must be 1.
        use_qk_l2norm_in_kernel (Optional[bool]): L2-normalise q and k over K per token. Default: `False`.

    Returns:
        o (torch.Tensor): outputs of shape `[B, T, H, V]`, in v's dtype.
        final_state (torch.Tensor): `[N, H, K, V]` in float32 if `output_final_state`, else `None`.
    """
    B, T, H, K, V = *q.shape, v.shape[-1]
    assert k.shape == q.shape and v.shape[:3] == q.shape[:3], f"q {q.shape}, k {k.shape}, v {v.shape}"
    assert g.shape == beta.shape == q.shape[:3], f"g {g.shape} and beta {beta.shape} must be [B, T, H]"
    N = B
    if cu_seqlens is not None:
        assert B == 1, f"with cu_seqlens the batch size must be 1, got {B}"
        N = len(cu_seqlens) - 1
    if initial_state is not None:
        assert initial_state.shape == (N, H, K, V), f"initial_state {initial_state.shape}, want {(N, H, K, V)}"
        initial_state = initial_state.contiguous()
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), 32)  # more V blocks = more programs for small-batch decoding
    o = torch.empty_like(v)
    final_state = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    fused_recurrent_gated_delta_rule_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, g, beta, o, initial_state, final_state, cu_seqlens, scale, T, H=H, K=K, V=V, BK=BK, BV=BV,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        USE_QK_L2NORM_IN_KERNEL=use_qk_l2norm_in_kernel, IS_VARLEN=cu_seqlens is not None,
        num_warps=1 if BK * BV <= 1024 else 4)
    return o, final_state

"""Pure-PyTorch gated delta rule: the spec the Triton kernels are tested against.

Both functions compute in float32, are differentiable by autograd, and use the state layout of
flash-linear-attention: h_t is [K, V] per head (the transpose of the paper's S_t), so

    h_t = exp(g_t) * h_{t-1} + k_t (beta_t * (v_t - exp(g_t) * h_{t-1}^T k_t))^T
    o_t = h_t^T (scale * q_t)

(Yang, Kautz, Hatamizadeh, "Gated Delta Networks", ICLR 2025, eq. 10; the decay is applied before
the prediction error). See README.md for the chunked form.
"""

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in float32 (same eps as the kernels)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _split_varlen(cu_seqlens, x):
    """Yield (n, bos, eos) per sequence; without cu_seqlens each batch row is one sequence."""
    if cu_seqlens is None:
        for n in range(x.shape[0]):
            yield n, None, None
    else:
        assert x.shape[0] == 1, f"with cu_seqlens the batch size must be 1, got {x.shape[0]}"
        bounds = cu_seqlens.tolist()
        for n in range(len(bounds) - 1):
            yield n, bounds[n], bounds[n + 1]


def _seq(x, n, bos, eos):
    """One sequence of a [B, T, ...] tensor as [T, ...], whether padded-batch or packed."""
    return x[n] if bos is None else x[0, bos:eos]


def _chunks(x, C):
    """(T, H, ...) -> (H, NT, C, ...), zero-padding T up to a multiple of C; heads and chunks
    lead so that every matmul of the chunked form is batched over both."""
    x = torch.cat([x, x.new_zeros(-x.shape[0] % C, *x.shape[1:])])
    return x.unflatten(0, (-1, C)).movedim(2, 0)


def naive_recurrent_gated_delta_rule(
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
    Token-by-token gated delta rule in float32.

    Args:
        q (torch.Tensor): queries of shape `[B, T, H, K]`.
        k (torch.Tensor): keys of shape `[B, T, H, K]`.
        v (torch.Tensor): values of shape `[B, T, H, V]`.
        g (torch.Tensor): log decays (log alpha, <= 0) of shape `[B, T, H]`.
        beta (torch.Tensor): write strengths of shape `[B, T, H]`.
        scale (Optional[float]): multiplies q. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]`, N = B or the number of sequences
            in `cu_seqlens`. Default: zeros.
        output_final_state (Optional[bool]): also return the final states. Default: `False`.
        cu_seqlens (torch.LongTensor): `[N + 1]` offsets of packed sequences (FlashAttention
            convention); then B must be 1 and no state crosses a sequence boundary.
        use_qk_l2norm_in_kernel (Optional[bool]): L2-normalise q and k over K first. Default: `False`.

    Returns:
        o (torch.Tensor): outputs of shape `[B, T, H, V]`, in v's dtype.
        final_state (torch.Tensor): `[N, H, K, V]` in float32 if `output_final_state`, else `None`.
    """
    dtype, K, V = v.dtype, k.shape[-1], v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    outs, finals = [], []
    for n, bos, eos in _split_varlen(cu_seqlens, q):
        qs, ks, vs, gs, bs = (_seq(x, n, bos, eos) for x in (q, k, v, g, beta))  # (T, H, ·)
        H = qs.shape[1]
        h = q.new_zeros(H, K, V) if initial_state is None else initial_state[n].float()  # (H, K, V)
        o = []
        for t in range(qs.shape[0]):
            h = h * gs[t].exp()[:, None, None]  # decay first ("forget before error")
            pred = torch.einsum('hkv,hk->hv', h, ks[t])  # what the state recalls for k_t
            delta = bs[t][:, None] * (vs[t] - pred)  # (H, V)
            h = h + ks[t][:, :, None] * delta[:, None, :]  # rank-1 write k_t delta^T
            o.append(torch.einsum('hkv,hk->hv', h, qs[t] * scale))
        outs.append(torch.stack(o) if o else vs.new_zeros(0, H, V))  # (T, H, V)
        finals.append(h)
    o = torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]
    final_state = torch.stack(finals) if output_final_state else None
    return o.to(dtype), final_state


def naive_chunk_gated_delta_rule(
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
    chunk_size: int = 64,
):
    r"""
    Chunked (WY / UT-transform) gated delta rule in float32: the algorithm of `chunk.py`, written
    with dense PyTorch ops. Same arguments and returns as `naive_recurrent_gated_delta_rule`, plus
    `chunk_size` (C). The last chunk of each sequence is zero-padded (k = v = q = beta = g = 0),
    which leaves outputs and states unchanged.
    """
    dtype, K, V, C = v.dtype, k.shape[-1], v.shape[-1], chunk_size
    scale = K ** -0.5 if scale is None else scale
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # j <= i
    eye = torch.eye(C, device=q.device)
    outs, finals = [], []
    for n, bos, eos in _split_varlen(cu_seqlens, q):
        T = q.shape[1] if bos is None else eos - bos
        qs, ks, vs, gs, bs = (_chunks(_seq(x, n, bos, eos), C) for x in (q, k, v, g, beta))
        gamma = gs.cumsum(-1)  # (H, NT, C) chunk-local cumulative log decay
        # exp(gamma_i - gamma_j) for j <= i only: the masked entries would overflow (see README)
        decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float('-inf')).exp()
        A = (bs[..., None] * ks @ ks.transpose(-1, -2) * decay).tril(-1)  # (H, NT, C, C) strictly lower
        Tinv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
        W = Tinv @ (ks * (bs * gamma.exp())[..., None])  # (H, NT, C, K)
        U = Tinv @ (vs * bs[..., None])  # (H, NT, C, V)
        Aqk = (qs @ ks.transpose(-1, -2) * decay) * scale  # (H, NT, C, C), causal incl. diagonal
        H = qs.shape[0]
        h = q.new_zeros(H, K, V) if initial_state is None else initial_state[n].float()  # (H, K, V)
        o = []
        for c in range(qs.shape[1]):  # the only sequential part: one step per chunk
            v_new = U[:, c] - W[:, c] @ h  # corrected values (H, C, V)
            o.append(scale * (qs[:, c] * gamma[:, c, :, None].exp()) @ h + Aqk[:, c] @ v_new)
            g_last = gamma[:, c, -1]  # (H,)
            k_dec = ks[:, c] * (g_last[:, None] - gamma[:, c]).exp()[..., None]  # (H, C, K)
            h = h * g_last.exp()[:, None, None] + k_dec.transpose(-1, -2) @ v_new
        o = torch.cat(o, 1)[:, :T] if o else vs.new_zeros(H, 0, V)  # (H, T, V)
        outs.append(o.transpose(0, 1))  # (T, H, V)
        finals.append(h)
    o = torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]
    final_state = torch.stack(finals) if output_final_state else None
    return o.to(dtype), final_state

"""Chunked gated delta rule in Triton: forward and backward (chunk size 64, WY / UT transform).

Pipeline (README.md derives every step; gamma = chunk-local cumsum of g, T = (I + A)^-1):
  forward   cumsum g -> A and T (intra) -> W, U -> state scan (h, v_new) -> output o
  backward  W, U, h, v_new recomputed -> dv_local -> reverse state scan (dh, dh0, dv_new)
            -> dq, dk, dw, dgamma -> WY backward (dk, dv, dbeta, dgamma) -> reverse cumsum -> dg
Per-chunk kernels run on a grid over (chunk, batch * head); the two scans run one program per
(V block, sequence, head) and walk the chunks in order. Intermediates (T, W, U, h, v_new) are stored
in the input dtype, accumulators are float32, the final state and dh0 are float32.

Plain pointer arithmetic with masks throughout: block pointers are gone in triton 3.9 and tensor
descriptors are not in every triton we support (3.6 on the GPU boxes).
"""

import os

import torch
import triton
import triton.language as tl

# The interpreter has no GPU to benchmark configs on: with more than one config Triton's autotuner
# raises "0 active drivers" (this breaks fla's chunk kernels on CPU), so it gets the first one only.
IS_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(configs):
    return configs[:1] if IS_INTERPRETER else configs


WARPS_STAGES = _configs([triton.Config({}, num_warps=w, num_stages=s) for w in (4, 2, 8) for s in (2, 3, 4)])
BV_WARPS_STAGES = _configs([triton.Config({'BV': bv}, num_warps=w, num_stages=s)
                            for bv in (32, 64) for w in (4, 2, 8) for s in (2, 3, 4)])

CHUNK_SIZE = 64  # BT: rows per chunk


def prepare_chunk_indices(cu_seqlens: torch.Tensor, BT: int):
    """For packed sequences: `chunk_indices` [NT, 2] = (sequence id, chunk id within it) for every
    chunk, ordered by sequence, and `chunk_offsets` [N + 1] = index of each sequence's first chunk."""
    n_chunks = triton.cdiv(cu_seqlens[1:] - cu_seqlens[:-1], BT)  # (N,)
    chunk_offsets = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])
    seq_ids = torch.repeat_interleave(torch.arange(len(n_chunks), device=cu_seqlens.device), n_chunks)
    chunk_ids = torch.arange(len(seq_ids), device=cu_seqlens.device) - chunk_offsets[seq_ids]
    return torch.stack([seq_ids, chunk_ids], 1).to(torch.int32), chunk_offsets.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# addressing helpers

@triton.jit
def _tile(base, r0, c0, n_r, n_c, s_r, s_c, BR: tl.constexpr, BCOL: tl.constexpr):
    """Pointers and in-bounds mask of the [BR, BCOL] tile at (r0, c0) of an n_r x n_c matrix with
    strides (s_r, s_c). Passing the strides swapped gives the transposed tile."""
    o_r = r0 + tl.arange(0, BR)
    o_c = c0 + tl.arange(0, BCOL)
    return base + o_r[:, None] * s_r + o_c[None, :] * s_c, (o_r < n_r)[:, None] & (o_c < n_c)[None, :]


@triton.jit
def _vec(base, r0, n, s, BR: tl.constexpr):
    """Pointers and in-bounds mask of BR entries from r0 of a length-n vector with stride s."""
    o_r = r0 + tl.arange(0, BR)
    return base + o_r * s, o_r < n


@triton.jit
def _chunk_bounds(i_t, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN: tl.constexpr):
    """(chunk index within its sequence, first token row, sequence length) for chunk program i_t."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        bos = tl.cast(i_b, tl.int64) * T  # int64: B*T*H*K can exceed 2^31
    return i_t, bos, T


@triton.jit
def _seq_bounds(i_n, cu_seqlens, chunk_offsets, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token row, length, index of the first chunk in h / dh) of sequence i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = tl.cast(i_n, tl.int64) * T
        boh = tl.cast(i_n, tl.int64) * tl.cdiv(T, BT)
    return bos, T, boh


@triton.jit
def _gamma_last(g, bos, i_t, T, H: tl.constexpr, BT: tl.constexpr, i_h):
    """gamma at the last valid row of chunk i_t: the log decay across the whole chunk."""
    return tl.load(g + (bos + tl.minimum(i_t * BT + BT, T) - 1) * H + i_h).to(tl.float32)


def _block(dim, cap=64):
    """Tile width for a head dim: a power of two >= dim up to cap, at least 16 (tl.dot's minimum;
    the extra columns are masked)."""
    return max(16, min(cap, triton.next_power_of_2(dim)))


def _n_chunks(T, cu_seqlens, chunk_indices):
    return triton.cdiv(T, CHUNK_SIZE) if cu_seqlens is None else len(chunk_indices)


# ---------------------------------------------------------------------------------------------
# chunk-local cumsum of the log decays (forward) and its reverse (backward)

@triton.jit
def chunk_local_cumsum_kernel(g, o, cu_seqlens, chunk_indices, T, H: tl.constexpr, BT: tl.constexpr,
                              REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T = _chunk_bounds(i_t, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN)
    p_g, m_t = _vec(g + bos * H + i_h, i_t * BT, T, H, BT)
    p_o, m_t = _vec(o + bos * H + i_h, i_t * BT, T, H, BT)
    b_g = tl.load(p_g, mask=m_t, other=0.).to(tl.float32)  # rows past T are 0: sums unchanged
    tl.store(p_o, tl.cumsum(b_g, axis=0, reverse=REVERSE), mask=m_t)


def chunk_local_cumsum(g, reverse, cu_seqlens, chunk_indices):
    """Cumulative sum of g [B, T, H] within each chunk (from the chunk end if `reverse`), float32."""
    B, T, H = g.shape
    o = torch.empty_like(g, dtype=torch.float32)
    chunk_local_cumsum_kernel[(_n_chunks(T, cu_seqlens, chunk_indices), B * H)](
        g, o, cu_seqlens, chunk_indices, T, H=H, BT=CHUNK_SIZE, REVERSE=reverse,
        IS_VARLEN=cu_seqlens is not None)
    return o


# ---------------------------------------------------------------------------------------------
# L2 normalisation of q and k over the head dim (use_qk_l2norm_in_kernel)

@triton.jit
def l2norm_fwd_kernel(x, y, rstd, M, D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    i_m = tl.cast(tl.program_id(0), tl.int64) * BM  # rows of [B*T*H, D]: B*T*H*D can pass 2^31
    p_x, m_x = _tile(x, i_m, 0, M, D, D, 1, BM, BD)
    p_y, m_x = _tile(y, i_m, 0, M, D, D, 1, BM, BD)
    p_r, m_r = _vec(rstd, i_m, M, 1, BM)
    b_x = tl.load(p_x, mask=m_x, other=0.).to(tl.float32)
    b_r = tl.rsqrt(tl.sum(b_x * b_x, 1) + 1e-6)  # same eps as fla's l2norm
    tl.store(p_y, (b_x * b_r[:, None]).to(p_y.dtype.element_ty), mask=m_x)
    tl.store(p_r, b_r, mask=m_r)


@triton.jit
def l2norm_bwd_kernel(y, rstd, dy, dx, M, D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    # y = x * r, r = (|x|^2 + eps)^-1/2  =>  dx = r * (dy - y * (dy . y))
    i_m = tl.cast(tl.program_id(0), tl.int64) * BM
    p_y, m_x = _tile(y, i_m, 0, M, D, D, 1, BM, BD)
    p_dy, m_x = _tile(dy, i_m, 0, M, D, D, 1, BM, BD)
    p_dx, m_x = _tile(dx, i_m, 0, M, D, D, 1, BM, BD)
    p_r, m_r = _vec(rstd, i_m, M, 1, BM)
    b_y = tl.load(p_y, mask=m_x, other=0.).to(tl.float32)
    b_dy = tl.load(p_dy, mask=m_x, other=0.).to(tl.float32)
    b_r = tl.load(p_r, mask=m_r, other=0.)
    b_dx = (b_dy - b_y * tl.sum(b_dy * b_y, 1)[:, None]) * b_r[:, None]
    tl.store(p_dx, b_dx.to(p_dx.dtype.element_ty), mask=m_x)


def _l2norm_grid(x):
    D = x.shape[-1]
    BD = triton.next_power_of_2(D)
    BM = max(1, 4096 // BD)  # ~4K elements per program
    return triton.cdiv(x.numel() // D, BM), x.numel() // D, D, BM, BD


def l2norm_fwd(x):
    n_prog, M, D, BM, BD = _l2norm_grid(x)
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    l2norm_fwd_kernel[(n_prog,)](x, y, rstd, M, D=D, BM=BM, BD=BD)
    return y, rstd


def l2norm_bwd(y, rstd, dy):
    n_prog, M, D, BM, BD = _l2norm_grid(y)
    dx = torch.empty_like(dy, dtype=torch.float32)
    l2norm_bwd_kernel[(n_prog,)](y, rstd, dy, dx, M, D=D, BM=BM, BD=BD)
    return dx


# ---------------------------------------------------------------------------------------------
# intra-chunk: A = strict_lower(beta_i k_i.k_j exp(gamma_i - gamma_j)), T = (I + A)^-1

@triton.jit
def _gate_block(b_A, b_beta, b_gi, b_gj, m):
    """beta_i * exp(gamma_i - gamma_j) * A_ij where m holds, 0 elsewhere. The exponent is masked
    BEFORE exp: masked entries (upper triangle, padded rows whose gamma loads as 0) can be large
    and positive, exp would overflow and 0 * inf would give NaN."""
    return b_A * b_beta[:, None] * tl.exp(tl.where(m, b_gi[:, None] - b_gj[None, :], float('-inf')))


@triton.jit
def _invert_unit_lower(b_A, o_c, BC: tl.constexpr):
    """(I + A)^-1 of one BC x BC strictly lower block by forward substitution: the strict part of
    row r is -A[r] - sum_{j<r} A[r, j] * (row j), with rows j < r already final."""
    b_T = -b_A
    for r in range(1, BC):
        m_r = (o_c == r)[:, None]
        b_a = tl.sum(tl.where(m_r, b_T, 0.), 0)  # row r, still -A[r]
        b_a = b_a + tl.sum(b_a[:, None] * b_T, 0)
        b_T = tl.where(m_r, b_a[None, :], b_T)
    return b_T + (o_c[:, None] == o_c[None, :]).to(tl.float32)


@triton.jit
def _load_rows(base, r0, c0, n_r, n_c, s_r, BR: tl.constexpr, BCOL: tl.constexpr):
    p, m = _tile(base, r0, c0, n_r, n_c, s_r, 1, BR, BCOL)
    return tl.load(p, mask=m, other=0.)


@triton.jit
def _store_rows(base, r0, c0, n_r, n_c, s_r, b_x, BR: tl.constexpr, BCOL: tl.constexpr):
    p, m = _tile(base, r0, c0, n_r, n_c, s_r, 1, BR, BCOL)
    tl.store(p, b_x.to(p.dtype.element_ty), mask=m)


@triton.jit
def _load_vec(base, r0, n, s, BR: tl.constexpr):
    p, m = _vec(base, r0, n, s, BR)
    return tl.load(p, mask=m, other=0.).to(tl.float32)


@triton.autotune(configs=WARPS_STAGES, key=['H', 'K', 'BK', 'IS_VARLEN'])
@triton.jit
def chunk_gdr_fwd_intra_kernel(k, beta, g, Ai, cu_seqlens, chunk_indices, T, H: tl.constexpr,
                               K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                               IS_VARLEN: tl.constexpr):
    # BT = 4 * BC: the chunk is cut into four row blocks, A into ten lower BC x BC blocks A_ij (i >= j)
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T = _chunk_bounds(i_t, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN)
    o_c = tl.arange(0, BC)
    r0, r1, r2, r3 = i_t * BT, i_t * BT + BC, i_t * BT + 2 * BC, i_t * BT + 3 * BC

    b_A00 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A10 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A11 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A20 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A21 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A22 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A30 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A31 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A32 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A33 = tl.zeros([BC, BC], dtype=tl.float32)
    p_k = k + (bos * H + i_h) * K
    for i_k in range(tl.cdiv(K, BK)):
        b_k0 = _load_rows(p_k, r0, i_k * BK, T, K, H * K, BC, BK)
        b_k1 = _load_rows(p_k, r1, i_k * BK, T, K, H * K, BC, BK)
        b_k2 = _load_rows(p_k, r2, i_k * BK, T, K, H * K, BC, BK)
        b_k3 = _load_rows(p_k, r3, i_k * BK, T, K, H * K, BC, BK)
        b_A00 += tl.dot(b_k0, tl.trans(b_k0))
        b_A10 += tl.dot(b_k1, tl.trans(b_k0))
        b_A11 += tl.dot(b_k1, tl.trans(b_k1))
        b_A20 += tl.dot(b_k2, tl.trans(b_k0))
        b_A21 += tl.dot(b_k2, tl.trans(b_k1))
        b_A22 += tl.dot(b_k2, tl.trans(b_k2))
        b_A30 += tl.dot(b_k3, tl.trans(b_k0))
        b_A31 += tl.dot(b_k3, tl.trans(b_k1))
        b_A32 += tl.dot(b_k3, tl.trans(b_k2))
        b_A33 += tl.dot(b_k3, tl.trans(b_k3))

    p_b, p_g = beta + bos * H + i_h, g + bos * H + i_h
    b_b0, b_g0 = _load_vec(p_b, r0, T, H, BC), _load_vec(p_g, r0, T, H, BC)
    b_b1, b_g1 = _load_vec(p_b, r1, T, H, BC), _load_vec(p_g, r1, T, H, BC)
    b_b2, b_g2 = _load_vec(p_b, r2, T, H, BC), _load_vec(p_g, r2, T, H, BC)
    b_b3, b_g3 = _load_vec(p_b, r3, T, H, BC), _load_vec(p_g, r3, T, H, BC)
    # valid rows per block; off-diagonal blocks need nothing else (row > col there), diagonal
    # blocks are also strictly lower
    m_0, m_1 = (r0 + o_c < T)[:, None], (r1 + o_c < T)[:, None]
    m_2, m_3 = (r2 + o_c < T)[:, None], (r3 + o_c < T)[:, None]
    m_d = o_c[:, None] > o_c[None, :]
    b_A00 = _gate_block(b_A00, b_b0, b_g0, b_g0, m_0 & m_d)
    b_A10 = _gate_block(b_A10, b_b1, b_g1, b_g0, m_1)
    b_A11 = _gate_block(b_A11, b_b1, b_g1, b_g1, m_1 & m_d)
    b_A20 = _gate_block(b_A20, b_b2, b_g2, b_g0, m_2)
    b_A21 = _gate_block(b_A21, b_b2, b_g2, b_g1, m_2)
    b_A22 = _gate_block(b_A22, b_b2, b_g2, b_g2, m_2 & m_d)
    b_A30 = _gate_block(b_A30, b_b3, b_g3, b_g0, m_3)
    b_A31 = _gate_block(b_A31, b_b3, b_g3, b_g1, m_3)
    b_A32 = _gate_block(b_A32, b_b3, b_g3, b_g2, m_3)
    b_A33 = _gate_block(b_A33, b_b3, b_g3, b_g3, m_3 & m_d)

    # diagonal blocks by forward substitution, then the off-diagonal blocks of the inverse by
    # block forward substitution: T_ij = -T_ii sum_{j <= l < i} A_il T_lj (README, "Intra-chunk")
    b_T00 = _invert_unit_lower(b_A00, o_c, BC)
    b_T11 = _invert_unit_lower(b_A11, o_c, BC)
    b_T22 = _invert_unit_lower(b_A22, o_c, BC)
    b_T33 = _invert_unit_lower(b_A33, o_c, BC)
    b_T10 = -tl.dot(b_T11, tl.dot(b_A10, b_T00))
    b_T21 = -tl.dot(b_T22, tl.dot(b_A21, b_T11))
    b_T32 = -tl.dot(b_T33, tl.dot(b_A32, b_T22))
    b_T20 = -tl.dot(b_T22, tl.dot(b_A20, b_T00) + tl.dot(b_A21, b_T10))
    b_T31 = -tl.dot(b_T33, tl.dot(b_A31, b_T11) + tl.dot(b_A32, b_T21))
    b_T30 = -tl.dot(b_T33, tl.dot(b_A30, b_T00) + tl.dot(b_A31, b_T10) + tl.dot(b_A32, b_T20))

    # Ai is [B, T, H, BT]: token row r holds row (r mod BT) of its chunk's T. The upper blocks are
    # written as zeros so that consumers load the whole BT x BT tile.
    p_A = Ai + (bos * H + i_h) * BT
    b_z = tl.zeros([BC, BC], dtype=tl.float32)
    _store_rows(p_A, r0, 0, T, BT, H * BT, b_T00, BC, BC)
    _store_rows(p_A, r0, BC, T, BT, H * BT, b_z, BC, BC)
    _store_rows(p_A, r0, 2 * BC, T, BT, H * BT, b_z, BC, BC)
    _store_rows(p_A, r0, 3 * BC, T, BT, H * BT, b_z, BC, BC)
    _store_rows(p_A, r1, 0, T, BT, H * BT, b_T10, BC, BC)
    _store_rows(p_A, r1, BC, T, BT, H * BT, b_T11, BC, BC)
    _store_rows(p_A, r1, 2 * BC, T, BT, H * BT, b_z, BC, BC)
    _store_rows(p_A, r1, 3 * BC, T, BT, H * BT, b_z, BC, BC)
    _store_rows(p_A, r2, 0, T, BT, H * BT, b_T20, BC, BC)
    _store_rows(p_A, r2, BC, T, BT, H * BT, b_T21, BC, BC)
    _store_rows(p_A, r2, 2 * BC, T, BT, H * BT, b_T22, BC, BC)
    _store_rows(p_A, r2, 3 * BC, T, BT, H * BT, b_z, BC, BC)
    _store_rows(p_A, r3, 0, T, BT, H * BT, b_T30, BC, BC)
    _store_rows(p_A, r3, BC, T, BT, H * BT, b_T31, BC, BC)
    _store_rows(p_A, r3, 2 * BC, T, BT, H * BT, b_T32, BC, BC)
    _store_rows(p_A, r3, 3 * BC, T, BT, H * BT, b_T33, BC, BC)


def chunk_gdr_fwd_intra(k, beta, g_cum, cu_seqlens, chunk_indices):
    B, T, H, K = k.shape
    Ai = torch.empty(B, T, H, CHUNK_SIZE, device=k.device, dtype=k.dtype)
    chunk_gdr_fwd_intra_kernel[(_n_chunks(T, cu_seqlens, chunk_indices), B * H)](
        k, beta, g_cum, Ai, cu_seqlens, chunk_indices, T, H=H, K=K, BT=CHUNK_SIZE, BC=CHUNK_SIZE // 4,
        BK=_block(K), IS_VARLEN=cu_seqlens is not None)
    return Ai


# ---------------------------------------------------------------------------------------------
# W = T diag(beta exp(gamma)) K,  U = T diag(beta) V

@triton.autotune(configs=WARPS_STAGES, key=['H', 'K', 'V', 'BK', 'BV', 'IS_VARLEN'])
@triton.jit
def recompute_w_u_fwd_kernel(k, v, beta, g, Ai, w, u, cu_seqlens, chunk_indices, T, H: tl.constexpr,
                             K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                             BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T = _chunk_bounds(i_t, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN)
    b_T = _load_rows(Ai + (bos * H + i_h) * BT, i_t * BT, 0, T, BT, H * BT, BT, BT)
    b_b = _load_vec(beta + bos * H + i_h, i_t * BT, T, H, BT)
    b_bg = b_b * tl.exp(_load_vec(g + bos * H + i_h, i_t * BT, T, H, BT))  # beta * exp(gamma) <= 1

    p_v, p_u = v + (bos * H + i_h) * V, u + (bos * H + i_h) * V
    for i_v in range(tl.cdiv(V, BV)):
        b_v = _load_rows(p_v, i_t * BT, i_v * BV, T, V, H * V, BT, BV)
        b_u = tl.dot(b_T, (b_v * b_b[:, None]).to(b_v.dtype))
        _store_rows(p_u, i_t * BT, i_v * BV, T, V, H * V, b_u, BT, BV)
    p_k, p_w = k + (bos * H + i_h) * K, w + (bos * H + i_h) * K
    for i_k in range(tl.cdiv(K, BK)):
        b_k = _load_rows(p_k, i_t * BT, i_k * BK, T, K, H * K, BT, BK)
        b_w = tl.dot(b_T, (b_k * b_bg[:, None]).to(b_k.dtype))
        _store_rows(p_w, i_t * BT, i_k * BK, T, K, H * K, b_w, BT, BK)


def recompute_w_u_fwd(k, v, beta, g_cum, Ai, cu_seqlens, chunk_indices):
    B, T, H, K, V = *k.shape, v.shape[-1]
    w, u = torch.empty_like(k), torch.empty_like(v)
    recompute_w_u_fwd_kernel[(_n_chunks(T, cu_seqlens, chunk_indices), B * H)](
        k, v, beta, g_cum, Ai, w, u, cu_seqlens, chunk_indices, T, H=H, K=K, V=V, BT=CHUNK_SIZE,
        BK=_block(K), BV=_block(V),
        IS_VARLEN=cu_seqlens is not None)
    return w, u


# ---------------------------------------------------------------------------------------------
# inter-chunk state scan: v_new = U - W h;  h <- exp(gamma_C) h + (exp(gamma_C - gamma) K)^T v_new

@triton.autotune(configs=BV_WARPS_STAGES, key=['H', 'K', 'V', 'BK', 'IS_VARLEN'])
@triton.jit
def chunk_gdr_fwd_h_kernel(k, u, w, g, h, v_new, h0, ht, cu_seqlens, chunk_offsets, T, H: tl.constexpr,
                           K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                           BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                           STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr):
    # one program per (V block, sequence, head); all of K (BK >= K) stays in float32 registers
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, boh = _seq_bounds(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    p_k, p_w = k + (bos * H + i_h) * K, w + (bos * H + i_h) * K
    p_u, p_vn = u + (bos * H + i_h) * V, v_new + (bos * H + i_h) * V

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += _load_rows(h0 + tl.cast(i_nh, tl.int64) * K * V, 0, i_v * BV, K, V, V, BK, BV).to(tl.float32)

    for i_t in range(tl.cdiv(T, BT)):
        p_h = h + ((boh + i_t) * H + i_h) * K * V
        _store_rows(p_h, 0, i_v * BV, K, V, V, b_h, BK, BV)  # state entering chunk i_t
        b_w = _load_rows(p_w, i_t * BT, 0, T, K, H * K, BT, BK)
        b_vn = _load_rows(p_u, i_t * BT, i_v * BV, T, V, H * V, BT, BV).to(tl.float32)
        b_vn -= tl.dot(b_w, b_h.to(b_w.dtype))
        _store_rows(p_vn, i_t * BT, i_v * BV, T, V, H * V, b_vn, BT, BV)

        b_g = _load_vec(g + bos * H + i_h, i_t * BT, T, H, BT)
        b_gl = _gamma_last(g, bos, i_t, T, H, BT, i_h)
        # each row decays from its position to the chunk end; padded rows masked before exp
        b_vn = b_vn * tl.exp(tl.where(i_t * BT + o_t < T, b_gl - b_g, float('-inf')))[:, None]
        p_kt, m_kt = _tile(p_k, 0, i_t * BT, K, T, 1, H * K, BK, BT)  # K^T tile [BK, BT]
        b_kt = tl.load(p_kt, mask=m_kt, other=0.)
        b_h = b_h * tl.exp(b_gl) + tl.dot(b_kt, b_vn.to(b_kt.dtype))

    if STORE_FINAL_STATE:
        _store_rows(ht + tl.cast(i_nh, tl.int64) * K * V, 0, i_v * BV, K, V, V, b_h, BK, BV)


def chunk_gdr_fwd_h(k, w, u, g_cum, initial_state, output_final_state, cu_seqlens, chunk_offsets, NT):
    B, T, H, K, V = *k.shape, u.shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    h = k.new_empty(NT, H, K, V)  # NT = chunks over all sequences; h[c] = state entering chunk c
    v_new = torch.empty_like(u)
    final_state = k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    grid = lambda meta: (triton.cdiv(V, meta['BV']), N * H)  # noqa: E731
    chunk_gdr_fwd_h_kernel[grid](
        k, u, w, g_cum, h, v_new, initial_state, final_state, cu_seqlens, chunk_offsets, T, H=H, K=K, V=V,
        BT=CHUNK_SIZE, BK=_block(K, 256), USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state, IS_VARLEN=cu_seqlens is not None)
    return h, v_new, final_state


# ---------------------------------------------------------------------------------------------
# output: o = scale * (diag(exp(gamma)) Q h + (Q K^T * M) v_new),  M_ij = exp(gamma_i - gamma_j), j <= i

@triton.autotune(configs=BV_WARPS_STAGES, key=['H', 'K', 'V', 'BK', 'IS_VARLEN'])
@triton.jit
def chunk_fwd_o_kernel(q, k, v_new, h, g, o, cu_seqlens, chunk_indices, scale, T, H: tl.constexpr,
                       K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_v, i_tg, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T = _chunk_bounds(i_tg, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN)
    if not IS_VARLEN:
        i_tg = i_b * tl.cdiv(T, BT) + i_t  # chunk index in h (packed chunks are numbered globally)
    o_t = tl.arange(0, BT)
    p_q, p_k = q + (bos * H + i_h) * K, k + (bos * H + i_h) * K
    p_h = h + (tl.cast(i_tg, tl.int64) * H + i_h) * K * V

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_q = _load_rows(p_q, i_t * BT, i_k * BK, T, K, H * K, BT, BK)
        p_kt, m_kt = _tile(p_k, i_k * BK, i_t * BT, K, T, 1, H * K, BK, BT)
        b_o += tl.dot(b_q, _load_rows(p_h, i_k * BK, i_v * BV, K, V, V, BK, BV))
        b_A += tl.dot(b_q, tl.load(p_kt, mask=m_kt, other=0.))

    b_g = _load_vec(g + bos * H + i_h, i_t * BT, T, H, BT)
    m_A = (o_t[:, None] >= o_t[None, :]) & (i_t * BT + o_t < T)[:, None]  # causal, valid rows
    b_A = b_A * tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], float('-inf')))
    p_v = v_new + (bos * H + i_h) * V
    b_v = _load_rows(p_v, i_t * BT, i_v * BV, T, V, H * V, BT, BV)
    b_o = (b_o * tl.exp(b_g)[:, None] + tl.dot(b_A.to(b_v.dtype), b_v)) * scale
    _store_rows(o + (bos * H + i_h) * V, i_t * BT, i_v * BV, T, V, H * V, b_o, BT, BV)


def chunk_fwd_o(q, k, v_new, h, g_cum, scale, cu_seqlens, chunk_indices):
    B, T, H, K, V = *q.shape, v_new.shape[-1]
    o = torch.empty_like(v_new)
    NT = _n_chunks(T, cu_seqlens, chunk_indices)
    grid = lambda meta: (triton.cdiv(V, meta['BV']), NT, B * H)  # noqa: E731
    chunk_fwd_o_kernel[grid](
        q, k, v_new, h, g_cum, o, cu_seqlens, chunk_indices, scale, T, H=H, K=K, V=V, BT=CHUNK_SIZE,
        BK=_block(K), IS_VARLEN=cu_seqlens is not None)
    return o


# ---------------------------------------------------------------------------------------------
# backward 1: dv_new from the intra-chunk output term, scale * (Q K^T * M)^T dO

@triton.autotune(configs=WARPS_STAGES, key=['H', 'K', 'V', 'BK', 'BV', 'IS_VARLEN'])
@triton.jit
def chunk_bwd_dv_local_kernel(q, k, g, do, dv, cu_seqlens, chunk_indices, scale, T, H: tl.constexpr,
                              K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                              BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T = _chunk_bounds(i_t, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN)
    o_t = tl.arange(0, BT)
    p_q, p_k = q + (bos * H + i_h) * K, k + (bos * H + i_h) * K

    b_A = tl.zeros([BT, BT], dtype=tl.float32)  # b_A[j, i] = k_j . q_i
    for i_k in range(tl.cdiv(K, BK)):
        p_qt, m_qt = _tile(p_q, i_k * BK, i_t * BT, K, T, 1, H * K, BK, BT)
        b_A += tl.dot(_load_rows(p_k, i_t * BT, i_k * BK, T, K, H * K, BT, BK),
                      tl.load(p_qt, mask=m_qt, other=0.))
    b_g = _load_vec(g + bos * H + i_h, i_t * BT, T, H, BT)
    m_A = (o_t[:, None] <= o_t[None, :]) & (i_t * BT + o_t < T)[None, :]  # j <= i, i valid
    b_A = b_A * tl.exp(tl.where(m_A, b_g[None, :] - b_g[:, None], float('-inf'))) * scale

    p_do, p_dv = do + (bos * H + i_h) * V, dv + (bos * H + i_h) * V
    for i_v in range(tl.cdiv(V, BV)):
        b_do = _load_rows(p_do, i_t * BT, i_v * BV, T, V, H * V, BT, BV)
        _store_rows(p_dv, i_t * BT, i_v * BV, T, V, H * V, tl.dot(b_A.to(b_do.dtype), b_do), BT, BV)


def chunk_bwd_dv_local(q, k, g_cum, do, scale, cu_seqlens, chunk_indices):
    B, T, H, K, V = *k.shape, do.shape[-1]
    dv = torch.empty_like(do)
    chunk_bwd_dv_local_kernel[(_n_chunks(T, cu_seqlens, chunk_indices), B * H)](
        q, k, g_cum, do, dv, cu_seqlens, chunk_indices, scale, T, H=H, K=K, V=V, BT=CHUNK_SIZE,
        BK=_block(K), BV=_block(V),
        IS_VARLEN=cu_seqlens is not None)
    return dv


# ---------------------------------------------------------------------------------------------
# backward 2: reverse state scan. With dh = dL/d(state leaving the chunk):
#   dv_new += diag(exp(gamma_C - gamma)) K dh
#   dh     <- exp(gamma_C) dh + scale (diag(exp(gamma)) Q)^T dO - W^T dv_new

@triton.autotune(configs=BV_WARPS_STAGES, key=['H', 'K', 'V', 'BK', 'IS_VARLEN'])
@triton.jit
def chunk_gdr_bwd_dhu_kernel(q, k, w, g, dht, dh0, do, dh, dv, dv2, cu_seqlens, chunk_offsets, scale, T,
                             H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                             BK: tl.constexpr, BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                             USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, boh = _seq_bounds(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    p_q, p_k, p_w = q + (bos * H + i_h) * K, k + (bos * H + i_h) * K, w + (bos * H + i_h) * K
    p_do, p_dv, p_dv2 = do + (bos * H + i_h) * V, dv + (bos * H + i_h) * V, dv2 + (bos * H + i_h) * V

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += _load_rows(dht + tl.cast(i_nh, tl.int64) * K * V, 0, i_v * BV, K, V, V, BK, BV).to(tl.float32)

    NT = tl.cdiv(T, BT)
    for i_s in range(NT):
        i_t = NT - 1 - i_s  # chunks last to first
        _store_rows(dh + ((boh + i_t) * H + i_h) * K * V, 0, i_v * BV, K, V, V, b_dh, BK, BV)
        b_g = _load_vec(g + bos * H + i_h, i_t * BT, T, H, BT)
        b_gl = _gamma_last(g, bos, i_t, T, H, BT, i_h)
        b_k = _load_rows(p_k, i_t * BT, 0, T, K, H * K, BT, BK)
        b_kd = b_k * tl.exp(tl.where(i_t * BT + o_t < T, b_gl - b_g, float('-inf')))[:, None]
        b_dv = _load_rows(p_dv, i_t * BT, i_v * BV, T, V, H * V, BT, BV).to(tl.float32)
        b_dv += tl.dot(b_kd.to(b_k.dtype), b_dh.to(b_k.dtype))
        _store_rows(p_dv2, i_t * BT, i_v * BV, T, V, H * V, b_dv, BT, BV)

        p_qt, m_qt = _tile(p_q, 0, i_t * BT, K, T, 1, H * K, BK, BT)
        p_wt, m_wt = _tile(p_w, 0, i_t * BT, K, T, 1, H * K, BK, BT)
        b_qt = tl.load(p_qt, mask=m_qt, other=0.)
        b_qd = (b_qt * (tl.exp(b_g) * scale)[None, :]).to(b_qt.dtype)
        b_wt = tl.load(p_wt, mask=m_wt, other=0.)
        b_do = _load_rows(p_do, i_t * BT, i_v * BV, T, V, H * V, BT, BV)
        b_dh = b_dh * tl.exp(b_gl) + tl.dot(b_qd, b_do) - tl.dot(b_wt, b_dv.to(b_wt.dtype))

    if USE_INITIAL_STATE:
        _store_rows(dh0 + tl.cast(i_nh, tl.int64) * K * V, 0, i_v * BV, K, V, V, b_dh, BK, BV)


def chunk_gdr_bwd_dhu(q, k, w, g_cum, h0, dht, do, dv, scale, cu_seqlens, chunk_offsets, NT):
    B, T, H, K, V = *q.shape, do.shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    dh = q.new_empty(NT, H, K, V)  # dh[c] = dL / d(state leaving chunk c)
    dh0 = torch.empty_like(h0, dtype=torch.float32) if h0 is not None else None
    dv2 = torch.empty_like(dv)
    grid = lambda meta: (triton.cdiv(V, meta['BV']), N * H)  # noqa: E731
    chunk_gdr_bwd_dhu_kernel[grid](
        q, k, w, g_cum, dht, dh0, do, dh, dv, dv2, cu_seqlens, chunk_offsets, scale, T, H=H, K=K, V=V,
        BT=CHUNK_SIZE, BK=_block(K, 256), USE_INITIAL_STATE=h0 is not None,
        USE_FINAL_STATE_GRADIENT=dht is not None, IS_VARLEN=cu_seqlens is not None)
    return dh, dh0, dv2


# ---------------------------------------------------------------------------------------------
# backward 3: dq, dk (output and state terms), dw = -dv_new h^T, and dgamma from those terms

@triton.autotune(configs=WARPS_STAGES, key=['H', 'K', 'V', 'BK', 'BV', 'IS_VARLEN'])
@triton.jit
def chunk_bwd_dqkwg_kernel(q, k, v_new, h, g, do, dh, dv, dq, dk, dw, dg, cu_seqlens, chunk_indices, scale,
                           stride_dg, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_k, i_tg, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T = _chunk_bounds(i_tg, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN)
    if not IS_VARLEN:
        i_tg = i_b * tl.cdiv(T, BT) + i_t
    o_t = tl.arange(0, BT)
    m_t = i_t * BT + o_t < T
    p_h = h + (tl.cast(i_tg, tl.int64) * H + i_h) * K * V
    p_dh = dh + (tl.cast(i_tg, tl.int64) * H + i_h) * K * V
    p_v, p_do, p_dv = v_new + (bos * H + i_h) * V, do + (bos * H + i_h) * V, dv + (bos * H + i_h) * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    b_dgl = tl.zeros([BK], dtype=tl.float32)  # <h, dh> over this K block
    for i_v in range(tl.cdiv(V, BV)):
        b_v = _load_rows(p_v, i_t * BT, i_v * BV, T, V, H * V, BT, BV)
        b_do = _load_rows(p_do, i_t * BT, i_v * BV, T, V, H * V, BT, BV)
        b_dv = _load_rows(p_dv, i_t * BT, i_v * BV, T, V, H * V, BT, BV)
        p_ht, m_ht = _tile(p_h, i_v * BV, i_k * BK, V, K, 1, V, BV, BK)  # h^T tile [BV, BK]
        p_dht, m_ht = _tile(p_dh, i_v * BV, i_k * BK, V, K, 1, V, BV, BK)
        b_ht = tl.load(p_ht, mask=m_ht, other=0.)
        b_dht = tl.load(p_dht, mask=m_ht, other=0.)
        b_dgl += tl.sum(b_ht.to(tl.float32) * b_dht.to(tl.float32), 0)
        b_ds += tl.dot(b_do, tl.trans(b_v))  # dO v_new^T
        b_dq += tl.dot(b_do, b_ht.to(b_do.dtype))  # dO h^T
        b_dk += tl.dot(b_v, b_dht.to(b_v.dtype))  # v_new dh^T
        b_dw += tl.dot(b_dv.to(b_v.dtype), b_ht.to(b_v.dtype))  # dv_new h^T

    b_g = _load_vec(g + bos * H + i_h, i_t * BT, T, H, BT)
    b_gl = _gamma_last(g, bos, i_t, T, H, BT, i_h)
    b_q = _load_rows(q + (bos * H + i_h) * K, i_t * BT, i_k * BK, T, K, H * K, BT, BK)
    b_k = _load_rows(k + (bos * H + i_h) * K, i_t * BT, i_k * BK, T, K, H * K, BT, BK)
    m_A = (o_t[:, None] >= o_t[None, :]) & m_t[:, None]
    b_ds = b_ds * tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], float('-inf'))) * scale
    b_dq = b_dq * (tl.exp(b_g) * scale)[:, None] + tl.dot(b_ds.to(b_k.dtype), b_k)
    b_dk = b_dk * tl.exp(tl.where(m_t, b_gl - b_g, float('-inf')))[:, None]  # state term
    # d gamma_C collects the state decay: exp(gamma_C) <h, dh> + sum_j k_j . dk_state_j
    b_dgl = tl.sum(b_dgl, 0) * tl.exp(b_gl) + tl.sum(b_dk * b_k.to(tl.float32))
    b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q)
    # every gamma_i enters as exp(gamma_i - gamma_j) next to q_i or k_j: d gamma = q.dq - k.dk
    b_dg = tl.sum(b_dq * b_q.to(tl.float32), 1) - tl.sum(b_dk * b_k.to(tl.float32), 1)
    b_dg = tl.where(i_t * BT + o_t == tl.minimum(i_t * BT + BT, T) - 1, b_dg + b_dgl, b_dg)

    _store_rows(dq + (bos * H + i_h) * K, i_t * BT, i_k * BK, T, K, H * K, b_dq, BT, BK)
    _store_rows(dk + (bos * H + i_h) * K, i_t * BT, i_k * BK, T, K, H * K, b_dk, BT, BK)
    _store_rows(dw + (bos * H + i_h) * K, i_t * BT, i_k * BK, T, K, H * K, -b_dw, BT, BK)
    p_dg, m_dg = _vec(dg + i_k * stride_dg + bos * H + i_h, i_t * BT, T, H, BT)
    tl.store(p_dg, b_dg, mask=m_dg)


def chunk_bwd_dqkwg(q, k, v_new, h, g_cum, do, dh, dv, scale, cu_seqlens, chunk_indices):
    B, T, H, K, V = *q.shape, do.shape[-1]
    BK = _block(K)
    NK = triton.cdiv(K, BK)
    dq = torch.empty_like(q, dtype=torch.float32)
    dk = torch.empty_like(k, dtype=torch.float32)
    dw = torch.empty_like(k)
    dg = q.new_empty(NK, B, T, H, dtype=torch.float32)  # one partial sum per K block
    chunk_bwd_dqkwg_kernel[(NK, _n_chunks(T, cu_seqlens, chunk_indices), B * H)](
        q, k, v_new, h, g_cum, do, dh, dv, dq, dk, dw, dg, cu_seqlens, chunk_indices, scale, B * T * H, T,
        H=H, K=K, V=V, BT=CHUNK_SIZE, BK=BK, BV=_block(V),
        IS_VARLEN=cu_seqlens is not None)
    return dq, dk, dw, dg.sum(0)


# ---------------------------------------------------------------------------------------------
# backward 4: through W = T diag(beta e^gamma) K and U = T diag(beta) V, T = (I + A)^-1.
# With dKb = T^T dW, dVb = T^T dU:  dA = -(dKb Kb^T + dVb Vb^T) T^T  (strictly lower part)

@triton.autotune(configs=WARPS_STAGES, key=['H', 'K', 'V', 'BK', 'BV', 'IS_VARLEN'])
@triton.jit
def prepare_wy_repr_bwd_kernel(k, v, beta, g, Ai, dw, du, dk_in, dk, dv, dbeta, dg, cu_seqlens, chunk_indices,
                               T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                               BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T = _chunk_bounds(i_t, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN)
    o_t = tl.arange(0, BT)
    p_k, p_dw = k + (bos * H + i_h) * K, dw + (bos * H + i_h) * K
    p_v, p_du, p_dv = v + (bos * H + i_h) * V, du + (bos * H + i_h) * V, dv + (bos * H + i_h) * V
    b_Tt = tl.trans(_load_rows(Ai + (bos * H + i_h) * BT, i_t * BT, 0, T, BT, H * BT, BT, BT))
    b_b = _load_vec(beta + bos * H + i_h, i_t * BT, T, H, BT)
    b_g = _load_vec(g + bos * H + i_h, i_t * BT, T, H, BT)
    b_bg = b_b * tl.exp(b_g)

    b_X = tl.zeros([BT, BT], dtype=tl.float32)  # dKb Kb^T + dVb Vb^T
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)  # K K^T, to rebuild A
    b_sk = tl.zeros([BT], dtype=tl.float32)  # dKb_i . k_i
    b_db = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_k = _load_rows(p_k, i_t * BT, i_k * BK, T, K, H * K, BT, BK)
        b_dkb = tl.dot(b_Tt, _load_rows(p_dw, i_t * BT, i_k * BK, T, K, H * K, BT, BK))
        b_X += tl.dot(b_dkb.to(b_k.dtype), tl.trans((b_k * b_bg[:, None]).to(b_k.dtype)))
        b_kk += tl.dot(b_k, tl.trans(b_k))
        b_sk += tl.sum(b_dkb * b_k.to(tl.float32), 1)
    for i_v in range(tl.cdiv(V, BV)):
        b_v = _load_rows(p_v, i_t * BT, i_v * BV, T, V, H * V, BT, BV)
        b_dvb = tl.dot(b_Tt, _load_rows(p_du, i_t * BT, i_v * BV, T, V, H * V, BT, BV))
        b_X += tl.dot(b_dvb.to(b_v.dtype), tl.trans((b_v * b_b[:, None]).to(b_v.dtype)))
        b_db += tl.sum(b_dvb * b_v.to(tl.float32), 1)
        _store_rows(p_dv, i_t * BT, i_v * BV, T, V, H * V, b_dvb * b_b[:, None], BT, BV)
    b_db += b_sk * tl.exp(b_g)  # beta and gamma in Kb = diag(beta e^gamma) K
    b_dg = b_sk * b_bg

    # dA, then G = dA * exp(gamma_i - gamma_j) = dL/d(beta_i k_i.k_j) on the strict lower triangle
    m_A = (o_t[:, None] > o_t[None, :]) & (i_t * BT + o_t < T)[:, None]
    b_G = -tl.dot(b_X, b_Tt.to(tl.float32))
    b_G = b_G * tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], float('-inf')))
    b_Gkk = b_G * b_kk
    b_db += tl.sum(b_Gkk, 1)
    b_dAA = b_Gkk * b_b[:, None]  # dA * A: gamma_i enters A_ij with +, gamma_j with -
    b_dg += tl.sum(b_dAA, 1) - tl.sum(b_dAA, 0)
    b_Gb = (b_G * b_b[:, None]).to(k.dtype.element_ty)

    p_dk_in, p_dk = dk_in + (bos * H + i_h) * K, dk + (bos * H + i_h) * K
    for i_k in range(tl.cdiv(K, BK)):  # second pass: dk needs the full G
        b_k = _load_rows(p_k, i_t * BT, i_k * BK, T, K, H * K, BT, BK)
        b_dkb = tl.dot(b_Tt, _load_rows(p_dw, i_t * BT, i_k * BK, T, K, H * K, BT, BK))
        b_dk = _load_rows(p_dk_in, i_t * BT, i_k * BK, T, K, H * K, BT, BK) + b_dkb * b_bg[:, None]
        b_dk += tl.dot(b_Gb, b_k) + tl.dot(tl.trans(b_Gb), b_k)
        _store_rows(p_dk, i_t * BT, i_k * BK, T, K, H * K, b_dk, BT, BK)
    p_db, m_db = _vec(dbeta + bos * H + i_h, i_t * BT, T, H, BT)
    p_dg, m_db = _vec(dg + bos * H + i_h, i_t * BT, T, H, BT)
    tl.store(p_db, b_db, mask=m_db)
    tl.store(p_dg, b_dg, mask=m_db)


def prepare_wy_repr_bwd(k, v, beta, g_cum, Ai, dw, du, dk, cu_seqlens, chunk_indices):
    B, T, H, K, V = *k.shape, v.shape[-1]
    dk_out, dv = torch.empty_like(dk), torch.empty_like(v)
    dbeta = beta.new_empty(B, T, H, dtype=torch.float32)
    dg = torch.empty_like(dbeta)
    prepare_wy_repr_bwd_kernel[(_n_chunks(T, cu_seqlens, chunk_indices), B * H)](
        k, v, beta, g_cum, Ai, dw, du, dk, dk_out, dv, dbeta, dg, cu_seqlens, chunk_indices, T, H=H, K=K, V=V,
        BT=CHUNK_SIZE, BK=_block(K), BV=_block(V),
        IS_VARLEN=cu_seqlens is not None)
    return dk_out, dv, dbeta, dg


# ---------------------------------------------------------------------------------------------
# autograd

class ChunkGatedDeltaRuleFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm_in_kernel):
        q_rstd = k_rstd = chunk_indices = chunk_offsets = None
        if use_qk_l2norm_in_kernel:
            q, q_rstd = l2norm_fwd(q)
            k, k_rstd = l2norm_fwd(k)
        if cu_seqlens is not None:
            chunk_indices, chunk_offsets = prepare_chunk_indices(cu_seqlens, CHUNK_SIZE)
        NT = q.shape[0] * triton.cdiv(q.shape[1], CHUNK_SIZE) if cu_seqlens is None else len(chunk_indices)
        g_cum = chunk_local_cumsum(g, False, cu_seqlens, chunk_indices)
        Ai = chunk_gdr_fwd_intra(k, beta, g_cum, cu_seqlens, chunk_indices)
        w, u = recompute_w_u_fwd(k, v, beta, g_cum, Ai, cu_seqlens, chunk_indices)
        h, v_new, final_state = chunk_gdr_fwd_h(k, w, u, g_cum, initial_state, output_final_state,
                                                cu_seqlens, chunk_offsets, NT)
        o = chunk_fwd_o(q, k, v_new, h, g_cum, scale, cu_seqlens, chunk_indices)
        # h, v_new, W, U are recomputed in backward rather than kept: h alone is K*V per chunk
        ctx.save_for_backward(q, q_rstd, k, k_rstd, v, g_cum, beta, Ai, initial_state, cu_seqlens,
                              chunk_indices, chunk_offsets)
        ctx.scale, ctx.NT, ctx.g_dtype = scale, NT, g.dtype
        ctx.use_qk_l2norm_in_kernel = use_qk_l2norm_in_kernel
        return o, final_state

    @staticmethod
    def backward(ctx, do, dht):
        q, q_rstd, k, k_rstd, v, g_cum, beta, Ai, h0, cu_seqlens, chunk_indices, chunk_offsets = ctx.saved_tensors
        do = do.contiguous()
        dht = dht.contiguous() if dht is not None else None
        w, u = recompute_w_u_fwd(k, v, beta, g_cum, Ai, cu_seqlens, chunk_indices)
        h, v_new, _ = chunk_gdr_fwd_h(k, w, u, g_cum, h0, False, cu_seqlens, chunk_offsets, ctx.NT)
        dv = chunk_bwd_dv_local(q, k, g_cum, do, ctx.scale, cu_seqlens, chunk_indices)
        dh, dh0, dv = chunk_gdr_bwd_dhu(q, k, w, g_cum, h0, dht, do, dv, ctx.scale, cu_seqlens, chunk_offsets,
                                        ctx.NT)
        dq, dk, dw, dg = chunk_bwd_dqkwg(q, k, v_new, h, g_cum, do, dh, dv, ctx.scale, cu_seqlens,
                                         chunk_indices)
        dk, dv, dbeta, dg_wy = prepare_wy_repr_bwd(k, v, beta, g_cum, Ai, dw, dv, dk, cu_seqlens, chunk_indices)
        # gamma = cumsum(g) within the chunk, so dg_t = sum of dgamma_i over i >= t in the chunk
        dg = chunk_local_cumsum(dg + dg_wy, True, cu_seqlens, chunk_indices)
        if ctx.use_qk_l2norm_in_kernel:
            dq, dk = l2norm_bwd(q, q_rstd, dq), l2norm_bwd(k, k_rstd, dk)
        return (dq.to(q.dtype), dk.to(k.dtype), dv, dg.to(ctx.g_dtype), dbeta.to(beta.dtype), None, dh0,
                None, None, None)


# torch.compile must not trace into the launches: fla saw wrong values / NaN when it did (fla #52)
@torch.compiler.disable
def chunk_gated_delta_rule(
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
    Gated delta rule, chunked Triton kernels (chunk size 64), differentiable in all inputs.

    Args:
        q (torch.Tensor): queries of shape `[B, T, H, K]`.
        k (torch.Tensor): keys of shape `[B, T, H, K]`; L2-normalised keys keep the recurrence stable.
        v (torch.Tensor): values of shape `[B, T, H, V]`.
        g (torch.Tensor): log decays (log alpha, <= 0) of shape `[B, T, H]`; float32 recommended.
        beta (torch.Tensor): write strengths in (0, 1) of shape `[B, T, H]`.
        scale (Optional[float]): multiplies q. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]`, N = B, or the number of sequences
            with `cu_seqlens`. Default: zeros.
        output_final_state (Optional[bool]): also return the final states. Default: `False`.
        cu_seqlens (torch.LongTensor): `[N + 1]` offsets of packed sequences (FlashAttention
            convention); then B must be 1. Chunks never straddle sequences and no state is carried
            from one sequence into the next.
        use_qk_l2norm_in_kernel (Optional[bool]): L2-normalise q and k over K inside the op (gradients
            flow to the raw q, k). Default: `False`.

    Returns:
        o (torch.Tensor): outputs of shape `[B, T, H, V]`, in v's dtype.
        final_state (torch.Tensor): `[N, H, K, V]` in float32 if `output_final_state`, else `None`.
    """
    B, T, H, K, V = *q.shape, v.shape[-1]
    assert k.shape == q.shape and v.shape[:3] == q.shape[:3], f"q {q.shape}, k {k.shape}, v {v.shape}"
    assert g.shape == beta.shape == q.shape[:3], f"g {g.shape} and beta {beta.shape} must be [B, T, H]"
    assert K <= 256, f"the state scans keep all of K in registers: K <= 256, got {K}"
    # tile offsets inside one sequence are int32; the per-sequence base is int64
    assert T * H * max(K, V, CHUNK_SIZE) < 2 ** 31, f"T * H * max(K, V, 64) must fit in int32, T={T}"
    N = B
    if cu_seqlens is not None:
        assert B == 1, f"with cu_seqlens the batch size must be 1, got {B}"
        N = len(cu_seqlens) - 1
    if initial_state is not None:
        assert initial_state.shape == (N, H, K, V), f"initial_state {initial_state.shape}, want {(N, H, K, V)}"
        initial_state = initial_state.contiguous()
    scale = K ** -0.5 if scale is None else scale
    return ChunkGatedDeltaRuleFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(), scale,
        initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel)

"""The Triton kernels of the fused NT-Xent: forward, anchor-gradient and candidate-gradient sweeps.

Every kernel works on one tile of anchors x candidates at a time and never stores the logit matrix.
Three grid axes spread the work (docs/kernels.md has the math and the scheme):
- axis 0, the owned block: anchor rows (forward, anchor gradient) or candidate columns (candidate gradient);
- axis 1, a split of the swept axis, so that 256-1024 anchors still fill the GPU: each split writes a
  partial result (a log-sum-exp, or a gradient) that the host combines with ordinary tensor ops;
- axis 2 (gradients only), a block of the output's feature columns, so the fp32 accumulator stays in
  registers when d is large; the scores are then recomputed once per feature block.
Scores are summed over d in chunks of BLOCK_K (`ONE_CHUNK` when the whole row fits one chunk: then the
resident side is loaded once, outside the sweep). The gradient kernels write unscaled partials: the
incoming gradient, 1/(M t) and the normalisation's backward are applied on the device by the caller.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(x, y, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x @ y with fp32 accumulation; exact fp32 products (no TF32) when IEEE. UPCAST is for the
    interpreter, whose bf16 `tl.dot` returns garbage (measured with triton 3.8: errors of 1e10)."""
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    if IEEE:  # noqa: SIM108 (a constexpr branch, resolved when the kernel is compiled)
        out = tl.dot(x, y, acc, input_precision="ieee")
    else:
        out = tl.dot(x, y, acc)
    return out


@triton.jit
def _load_rows(P, idx, n, D, k0, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows `idx` (< n) of the [*, D] matrix at P, feature columns k0 .. k0+BLOCK_K, zeros outside."""
    dims = k0 + tl.arange(0, BLOCK_K)
    return tl.load(P + idx[:, None] * D + dims[None, :], mask=(idx[:, None] < n) & (dims[None, :] < D), other=0.0)


@triton.jit
def _chunked_scores(UA, UC, rows, cols, m_end, k_end, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """u_a . u_c for one tile, summed over d in chunks: the tile never holds whole rows of a large d."""
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        a = _load_rows(UA, rows, m_end, D, k0, BLOCK_M, BLOCK_K)
        c = _load_rows(UC, cols, k_end, D, k0, BLOCK_N, BLOCK_K)
        s = _dot(a, tl.trans(c), s, IEEE, UPCAST)
    return s


@triton.jit
def _grad_tile(s, rows, cols, lse, m_end, k_end, offset, half):
    """(P - Pi) on one tile of scaled scores: softmax weights with the self term excluded, minus one at each
    anchor's partner; zero outside rows < m_end, cols < k_end."""
    valid = (rows[:, None] < m_end) & (cols[None, :] < k_end)
    p = tl.where(valid & (cols[None, :] != rows[:, None] + offset), tl.exp(s - lse[:, None]), 0.0)
    partner = tl.where(rows < half, rows + half, rows - half) + offset
    return p - tl.where(valid & (cols[None, :] == partner[:, None]), 1.0, 0.0)


@triton.jit
def fwd_kernel(UA, UC, LSE_PART, POS_PART, M, K, D, offset, half, scale, split_len, M_BUCKET, K_BUCKET,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr,
               IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Per anchor, over the candidates of one split: log-sum-exp (self excluded) and the partner's score.

    Writes LSE_PART[split, row] (-inf when the split holds no candidate of that row) and POS_PART[split, row]
    (zero unless the partner lies in this split). M_BUCKET, K_BUCKET only key the autotuner.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, K)
    rmask = rows < M
    self_col = rows + offset
    partner = tl.where(rows < half, rows + half, rows - half) + offset
    if ONE_CHUNK:
        a = _load_rows(UA, rows, M, D, 0, BLOCK_M, BLOCK_K)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        if ONE_CHUNK:
            c = _load_rows(UC, cols, hi, D, 0, BLOCK_N, BLOCK_K)
            s = _dot(a, tl.trans(c), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE, UPCAST)
        else:
            s = _chunked_scores(UA, UC, rows, cols, M, hi, D, BLOCK_M, BLOCK_N, BLOCK_K, IEEE, UPCAST)
        s = s * scale
        pos += tl.sum(tl.where((cols[None, :] == partner[:, None]) & (cols[None, :] < hi), s, 0.0), 1)
        s = tl.where((cols[None, :] < hi) & (cols[None, :] != self_col[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing valid yet: no -inf - -inf
        l_i = l_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), 1)
        m_i = m_new
    tl.store(LSE_PART + split * M + rows, m_i + tl.log(l_i), mask=rmask)
    tl.store(POS_PART + split * M + rows, pos, mask=rmask)


@triton.jit
def bwd_rows_kernel(UA, UC, LSE, DUA_PART, M, K, D, offset, half, scale, split_len, M_BUCKET, K_BUCKET,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                    ONE_CHUNK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Anchor gradients, unscaled: DUA_PART[split, rows, dblock] = (P - Pi)[rows, split's columns] @ U_c."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    d0 = tl.program_id(2) * BLOCK_D
    lo = split * split_len
    hi = tl.minimum(lo + split_len, K)
    lse = tl.load(LSE + rows, mask=rows < M, other=0.0)
    if ONE_CHUNK:
        a = _load_rows(UA, rows, M, D, 0, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        if ONE_CHUNK:
            c = _load_rows(UC, cols, hi, D, 0, BLOCK_N, BLOCK_K)
            s = _dot(a, tl.trans(c), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE, UPCAST)
        else:
            s = _chunked_scores(UA, UC, rows, cols, M, hi, D, BLOCK_M, BLOCK_N, BLOCK_K, IEEE, UPCAST)
            c = _load_rows(UC, cols, hi, D, d0, BLOCK_N, BLOCK_D)
        g = _grad_tile(s * scale, rows, cols, lse, M, hi, offset, half)
        acc = _dot(g.to(c.dtype), c, acc, IEEE, UPCAST)
    dims = d0 + tl.arange(0, BLOCK_D)
    tl.store(DUA_PART + split * M * D + rows[:, None] * D + dims[None, :], acc,
             mask=(rows[:, None] < M) & (dims[None, :] < D))


@triton.jit
def bwd_cols_kernel(UA, UC, LSE, DUC_PART, M, K, D, offset, half, scale, split_len, M_BUCKET, K_BUCKET,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                    ONE_CHUNK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Candidate gradients, unscaled: DUC_PART[split, cols, dblock] = (P - Pi)[split's rows, cols]^T @ U_a.
    One program per block of columns and split of the anchors; no atomics."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    d0 = tl.program_id(2) * BLOCK_D
    lo = split * split_len
    hi = tl.minimum(lo + split_len, M)
    if ONE_CHUNK:
        c = _load_rows(UC, cols, K, D, 0, BLOCK_N, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        lse = tl.load(LSE + rows, mask=rows < hi, other=0.0)
        if ONE_CHUNK:
            a = _load_rows(UA, rows, hi, D, 0, BLOCK_M, BLOCK_K)
            s = _dot(a, tl.trans(c), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE, UPCAST)
        else:
            s = _chunked_scores(UA, UC, rows, cols, hi, K, D, BLOCK_M, BLOCK_N, BLOCK_K, IEEE, UPCAST)
            a = _load_rows(UA, rows, hi, D, d0, BLOCK_M, BLOCK_D)
        g = _grad_tile(s * scale, rows, cols, lse, hi, K, offset, half)
        acc = _dot(tl.trans(g.to(a.dtype)), a, acc, IEEE, UPCAST)
    dims = d0 + tl.arange(0, BLOCK_D)
    tl.store(DUC_PART + split * K * D + cols[:, None] * D + dims[None, :], acc,
             mask=(cols[:, None] < K) & (dims[None, :] < D))


KERNELS = {"fwd": fwd_kernel, "bwd_rows": bwd_rows_kernel, "bwd_cols": bwd_cols_kernel}
"""By the name the tile table and compile_check use."""

OPERAND_POINTERS = ("UA", "UC")
"""Arguments that point at the unit rows, in the operand dtype; every other pointer is fp32."""

FLOAT_ARGS = ("scale",)
"""Non-pointer arguments passed as Python floats; the other runtime arguments are integers."""

POINTERS = OPERAND_POINTERS + ("LSE", "LSE_PART", "POS_PART", "DUA_PART", "DUC_PART")

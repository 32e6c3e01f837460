"""Fused NT-Xent: tiled, online log-sum-exp, never storing the logit matrix; exact across GPUs.

    loss = nt_xent(z1, z2, temperature=0.1, group=None)

Anchors are this rank's 2B views; candidates are the 2BW views of the process group, gathered
with a gradient-carrying all-gather. Math (REFERENCE.md §3): u = z/|z|, s_ij = u_i.u_j / t,
L = mean_i [LSE_i - s_i,p(i)] with the self term excluded. With P_ij = exp(s_ij - LSE_i) and
G = (P - Pi) / M, the anchor gradient is G C / t and the candidate gradient is G^T A / t; in one
process A and C are the same tensor, so autograd adds both (the G + G^T of the math), and across
ranks the all-gather's backward brings each rank's candidate gradients to their owner. Both
backward passes end with the normalisation's backward, (g - (g.u) u) / |z|.

On CUDA tensors (or any tensor under TRITON_INTERPRET=1) the Triton kernels run; elsewhere a
PyTorch version of the same algorithm over chunks of anchors does, so the CPU never holds the
full matrix either. Both sit behind one `torch.library.custom_op`, so the loss composes with
`torch.compile` and autocast.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton (macOS, some CPU installs): the PyTorch path serves every device
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EPS = 1e-12
CHUNK_ELEMENTS = 1 << 21
"""Logits per chunk of anchors in the PyTorch path (8 MB in fp32): its peak extra memory is a few of
these, and a block this size stays in the allocator's heap instead of being mapped and faulted in
afresh each chunk (measured: 512 x 16384 chunks spent most of their time in page faults)."""


def use_triton(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or INTERPRET)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _normalise(z: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows in `dtype` and the fp32 (or fp64) inverse norms the backward's epilogue needs."""
    zf = z.to(_compute_dtype(z.dtype))
    rnorm = 1.0 / zf.norm(dim=1).clamp_min(EPS)
    return (zf * rnorm[:, None]).to(dtype), rnorm


def _normalise_both(za: torch.Tensor, zc: torch.Tensor, dtype: torch.dtype):
    """Anchors and candidates normalised once each; in one process they are the same tensor."""
    ua, rna = _normalise(za, dtype)
    if zc.data_ptr() == za.data_ptr() and zc.shape == za.shape:
        return ua, rna, ua, rna
    return (ua, rna, *_normalise(zc, dtype))


def _partner(rows: torch.Tensor, half: int) -> torch.Tensor:
    return torch.where(rows < half, rows + half, rows - half)


# ----------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    @triton.jit
    def _dot(x, y, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """fp32 accumulation; exact fp32 inputs (no TF32) when IEEE. UPCAST is for the interpreter,
        whose bf16 `tl.dot` returns garbage (measured with triton 3.8: errors of 1e10)."""
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        if IEEE:  # noqa: SIM108 (a constexpr branch, resolved when the kernel is compiled)
            out = tl.dot(x, y, input_precision="ieee")
        else:
            out = tl.dot(x, y)
        return out

    @triton.jit
    def _fwd_kernel(UA, UC, LSE, LOSS, M, K, D, offset, half, scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """Per-anchor log-sum-exp over every candidate but itself (online, tile by tile) and the loss."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        rmask = rows < M
        a = tl.load(UA + rows[:, None] * D + dims[None, :], mask=rmask[:, None] & (dims[None, :] < D), other=0.0)
        self_col = rows + offset
        partner = tl.where(rows < half, rows + half, rows - half) + offset
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        pos = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, K, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            c = tl.load(UC + cols[:, None] * D + dims[None, :], mask=(cols[:, None] < K) & (dims[None, :] < D),
                        other=0.0)
            s = _dot(a, tl.trans(c), IEEE, UPCAST) * scale
            pos += tl.sum(tl.where(cols[None, :] == partner[:, None], s, 0.0), 1)
            s = tl.where((cols[None, :] < K) & (cols[None, :] != self_col[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_i = m_new
        lse = m_i + tl.log(l_i)
        tl.store(LSE + rows, lse, mask=rmask)
        tl.store(LOSS + rows, lse - pos, mask=rmask)

    @triton.jit
    def _grad_tile(a, c, rows, cols, lse, M, K, offset, half, scale, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """(P - Pi) on one tile of anchors x candidates: softmax weights with the self term excluded, minus
        one at each anchor's partner. Both backward kernels sweep these tiles, along rows or along columns."""
        s = _dot(a, tl.trans(c), IEEE, UPCAST) * scale
        valid = (rows[:, None] < M) & (cols[None, :] < K)
        p = tl.where(valid & (cols[None, :] != rows[:, None] + offset), tl.exp(s - lse[:, None]), 0.0)
        partner = tl.where(rows < half, rows + half, rows - half) + offset
        return p - tl.where(valid & (cols[None, :] == partner[:, None]), 1.0, 0.0)

    @triton.jit
    def _normalisation_backward(g, u, rn):
        """dL/dz from dL/du for u = z / |z|: remove the radial part, divide by |z|."""
        u = u.to(tl.float32)
        return (g - tl.sum(g * u, 1)[:, None] * u) * rn[:, None]

    @triton.jit
    def _bwd_rows_kernel(UA, UC, LSE, RNA, DZA, M, K, D, offset, half, scale, gscale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """Anchor gradients: one program per block of rows, sweeping every candidate column."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        rmask = rows < M
        amask = rmask[:, None] & (dims[None, :] < D)
        a = tl.load(UA + rows[:, None] * D + dims[None, :], mask=amask, other=0.0)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, K, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            c = tl.load(UC + cols[:, None] * D + dims[None, :], mask=(cols[:, None] < K) & (dims[None, :] < D),
                        other=0.0)
            p = _grad_tile(a, c, rows, cols, lse, M, K, offset, half, scale, IEEE, UPCAST)
            acc += _dot(p.to(c.dtype), c, IEEE, UPCAST)
        rn = tl.load(RNA + rows, mask=rmask, other=0.0)
        tl.store(DZA + rows[:, None] * D + dims[None, :], _normalisation_backward(acc * (gscale * scale), a, rn),
                 mask=amask)

    @triton.jit
    def _bwd_cols_kernel(UA, UC, LSE, RNC, DZC, M, K, D, offset, half, scale, gscale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """Candidate gradients: one program per block of columns, sweeping every anchor row; no atomics."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        cmask = cols < K
        cmask2 = cmask[:, None] & (dims[None, :] < D)
        c = tl.load(UC + cols[:, None] * D + dims[None, :], mask=cmask2, other=0.0)
        acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start in range(0, M, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            rmask = rows < M
            a = tl.load(UA + rows[:, None] * D + dims[None, :], mask=rmask[:, None] & (dims[None, :] < D),
                        other=0.0)
            lse = tl.load(LSE + rows, mask=rmask, other=0.0)
            p = _grad_tile(a, c, rows, cols, lse, M, K, offset, half, scale, IEEE, UPCAST)
            acc += _dot(tl.trans(p.to(a.dtype)), a, IEEE, UPCAST)
        rn = tl.load(RNC + cols, mask=cmask, other=0.0)
        tl.store(DZC + cols[:, None] * D + dims[None, :], _normalisation_backward(acc * (gscale * scale), c, rn),
                 mask=cmask2)


def _launch_config(ua: torch.Tensor) -> dict:
    """Tile sizes: 64x64 as in Inf-CL; the interpreter runs one program at a time, so fewer, larger ones."""
    block_d = max(16, triton.next_power_of_2(ua.shape[1]))
    big = 128 if INTERPRET and not ua.is_cuda else 64
    return {"BLOCK_M": big, "BLOCK_N": big, "BLOCK_D": block_d, "IEEE": ua.dtype == torch.float32,
            "UPCAST": INTERPRET}


def _triton_dtype(dtype: torch.dtype) -> torch.dtype:
    """Tensor-core dtype for the dots: bf16/fp16 stay, everything else runs in exact fp32."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def forward_triton(za: torch.Tensor, zc: torch.Tensor, offset: int, half: int, temperature: float):
    ua, _, uc, _ = _normalise_both(za, zc, _triton_dtype(za.dtype))
    m, k = ua.shape[0], uc.shape[0]
    lse = torch.empty(m, device=za.device, dtype=torch.float32)
    loss_rows = torch.empty_like(lse)
    cfg = _launch_config(ua)
    _fwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](ua, uc, lse, loss_rows, m, k, ua.shape[1], offset, half,
                                                    1.0 / temperature, **cfg)
    return loss_rows.mean(), lse


def backward_triton(grad: torch.Tensor, za: torch.Tensor, zc: torch.Tensor, lse: torch.Tensor, offset: int,
                    half: int, temperature: float):
    ua, rna, uc, rnc = _normalise_both(za, zc, _triton_dtype(za.dtype))
    m, k, d = ua.shape[0], uc.shape[0], ua.shape[1]
    dza = torch.empty(m, d, device=za.device, dtype=torch.float32)
    dzc = torch.empty(k, d, device=za.device, dtype=torch.float32)
    cfg = _launch_config(ua)
    gscale = float(grad) / m
    args = (m, k, d, offset, half, 1.0 / temperature, gscale)
    _bwd_rows_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](ua, uc, lse, rna.float(), dza, *args, **cfg)
    _bwd_cols_kernel[(triton.cdiv(k, cfg["BLOCK_N"]),)](ua, uc, lse, rnc.float(), dzc, *args, **cfg)
    return dza.to(za.dtype), dzc.to(zc.dtype)


# ----------------------------------------------------------------------------------------------
# The same algorithm in PyTorch, over chunks of anchors (CPU, and any device without Triton)

def _chunks(m: int, k: int):
    step = max(16, CHUNK_ELEMENTS // k)
    for lo in range(0, m, step):
        yield lo, min(m, lo + step)


def _chunk_logits(ua, uc, lo, hi, offset, half, temperature):
    rows = torch.arange(lo, hi, device=ua.device)
    s = (ua[lo:hi] @ uc.T).mul_(1.0 / temperature)
    s[rows - lo, rows + offset] = float("-inf")
    return s, rows, _partner(rows, half) + offset


def forward_torch(za, zc, offset, half, temperature):
    dtype = _compute_dtype(za.dtype)
    ua, _, uc, _ = _normalise_both(za, zc, dtype)
    m = ua.shape[0]
    lse = torch.empty(m, device=za.device, dtype=dtype)
    total = torch.zeros((), device=za.device, dtype=dtype)
    for lo, hi in _chunks(m, uc.shape[0]):
        s, rows, partner = _chunk_logits(ua, uc, lo, hi, offset, half, temperature)
        lse[lo:hi] = torch.logsumexp(s, dim=1)
        total += (lse[lo:hi] - s[rows - lo, partner]).sum()
    return total / m, lse


def backward_torch(grad, za, zc, lse, offset, half, temperature):
    dtype = _compute_dtype(za.dtype)
    ua, rna, uc, rnc = _normalise_both(za, zc, dtype)
    m = ua.shape[0]
    dua = torch.empty_like(ua)
    duc = torch.zeros_like(uc)
    for lo, hi in _chunks(m, uc.shape[0]):
        s, rows, partner = _chunk_logits(ua, uc, lo, hi, offset, half, temperature)
        p = s.sub_(lse[lo:hi, None]).exp_()
        p[rows - lo, partner] -= 1
        dua[lo:hi] = p @ uc
        duc.addmm_(p.T, ua[lo:hi])
    scale = grad.to(dtype) / (m * temperature)
    dua *= scale
    duc *= scale
    dza = (dua - (dua * ua).sum(1, keepdim=True) * ua) * rna[:, None]
    dzc = (duc - (duc * uc).sum(1, keepdim=True) * uc) * rnc[:, None]
    return dza.to(za.dtype), dzc.to(zc.dtype)


# ----------------------------------------------------------------------------------------------
# One op for torch.compile and autograd

@torch.library.custom_op("faceclr::nt_xent_fwd", mutates_args=())
def _fwd_op(za: torch.Tensor, zc: torch.Tensor, offset: int, half: int, temperature: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    impl = forward_triton if use_triton(za) else forward_torch
    return impl(za.contiguous(), zc.contiguous(), offset, half, temperature)


@_fwd_op.register_fake
def _(za, zc, offset, half, temperature):
    dtype = torch.float32 if use_triton(za) else _compute_dtype(za.dtype)
    return za.new_empty((), dtype=dtype), za.new_empty(za.shape[0], dtype=dtype)


@torch.library.custom_op("faceclr::nt_xent_bwd", mutates_args=())
def _bwd_op(grad: torch.Tensor, za: torch.Tensor, zc: torch.Tensor, lse: torch.Tensor, offset: int, half: int,
            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    impl = backward_triton if use_triton(za) else backward_torch
    return impl(grad, za.contiguous(), zc.contiguous(), lse, offset, half, temperature)


@_bwd_op.register_fake
def _(grad, za, zc, lse, offset, half, temperature):
    return torch.empty_like(za), torch.empty_like(zc)


def _setup_context(ctx, inputs, output):
    za, zc, offset, half, temperature = inputs
    ctx.save_for_backward(za, zc, output[1])
    ctx.args = (offset, half, temperature)


def _backward(ctx, grad_loss, _grad_lse):
    za, zc, lse = ctx.saved_tensors
    dza, dzc = _bwd_op(grad_loss, za, zc, lse, *ctx.args)
    return dza, dzc, None, None, None


torch.library.register_autograd("faceclr::nt_xent_fwd", _backward, setup_context=_setup_context)


def nt_xent_local(za: torch.Tensor, zc: torch.Tensor, offset: int, half: int, temperature: float) -> torch.Tensor:
    """Mean loss of anchors `za` ([M, d], M = 2B: views 1 then views 2) against candidates `zc`
    ([K, d]), where anchor i is candidate `offset + i` and its partner is candidate `offset + (i +- half)`."""
    return _fwd_op(za, zc, offset, half, temperature)[0]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1,
            group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """NT-Xent of this rank's views against every view of `group` (None: this rank's batch alone).

    Returns the mean over this rank's 2B anchors. Its gradient to `z1`, `z2` is W times the
    gradient of the global mean loss, so DDP's averaging yields exactly the global gradient, and
    the mean of the W returned values is the single-process loss on the concatenated batch.
    Every rank must pass the same B.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [B, d], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z = torch.cat([z1, z2])
    half = z1.shape[0]
    if group is None or dist.get_world_size(group) == 1:
        return nt_xent_local(z, z, 0, half, temperature)
    from torch.distributed.nn.functional import all_gather  # backward brings column gradients home

    candidates = torch.cat(all_gather(z, group=group))
    return nt_xent_local(z, candidates, dist.get_rank(group) * z.shape[0], half, temperature)

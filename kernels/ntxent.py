"""Fused NT-Xent: tiled, online log-sum-exp, never storing the logit matrix; exact across GPUs.

    loss = nt_xent(z1, z2, temperature=0.1, group=None)

Anchors are this rank's 2B views; candidates are the 2BW views of the process group, gathered
with a gradient-carrying all-gather. With u = z/|z|, s_ij = u_i.u_j / t and the self term excluded,
L = mean_i [LSE_i - s_i,p(i)]. With P_ij = exp(s_ij - LSE_i) and G = (P - Pi) / M, the anchor
gradient is G C / t and the candidate gradient is G^T A / t; in one process A and C are the same
tensor, so autograd adds both, and across ranks the all-gather's backward brings each rank's
candidate gradients to their owner. Both end with the normalisation's backward, (g - (g.u) u) / |z|.
docs/kernels.md derives this and describes the tiling.

Precision: the operands of the products are the unit rows u in the input's dtype (fp32 exact, no
TF32; bf16 and fp16 rounded after normalising, as tensor cores take them), accumulated in fp32. On
CUDA tensors (or any tensor under TRITON_INTERPRET=1) the Triton kernels run; elsewhere, for fp64,
and for d beyond the kernels' table, a PyTorch version of the same algorithm over chunks of anchors
does, with the same rounding points, so the CPU reproduces the GPU's numerics and never holds the
full matrix either. Both sit behind one `torch.library.custom_op`, so the loss composes with
`torch.compile` and autocast; neither reads a device value on the host, so a step never waits.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.distributed as dist

if dist.is_available():
    # Imported with this module, before any process group exists: torch.distributed.nn.functional binds
    # `group.WORLD` as a default argument of its functions when it is first imported, so a first import inside a
    # run (in nt_xent, or torch._dynamo's at the first call of a custom op) holds that group for the life of the
    # process, past destroy_process_group, with its gloo threads and sockets still up while the ranks exit.
    from torch.distributed.nn.functional import all_gather  # its backward brings column gradients home

from kernels import interpret, tiles

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton
    from triton.runtime.errors import OutOfResources

    from kernels.ntxent_kernels import KERNELS
except ImportError:  # no triton (macOS, some CPU installs): the PyTorch path serves every device
    triton = None

if INTERPRET and triton is not None:
    interpret.install()  # the interpreter's loops under Triton 3.6 and numpy >= 2.4
AUTOTUNE = not INTERPRET
"""Let Triton's autotuner choose among the table's tiles on a GPU; the interpreter has no timer for it and
takes the table's first tile."""
INTERPRETER_SM_COUNT = 4
"""What the split plan assumes under the interpreter (it runs one program at a time; tests raise it to
force splits)."""
EPS = 1e-12
CHUNK_ELEMENTS = 1 << 21
"""Logits per chunk of anchors in the PyTorch path (8 MB in fp32): its peak extra memory is a few of
these, and a block this size stays in the allocator's heap instead of being mapped and faulted in
afresh each chunk (measured: 512 x 16384 chunks spent most of their time in page faults)."""
OPERAND_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
"""Input dtypes the kernels take; fp64 (gradcheck) runs the PyTorch path in fp64."""

_unserved: set[tuple[str, int]] = set()
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this [N, d] input; an unserved d warns once and runs the PyTorch path."""
    if triton is None or not (x.is_cuda or INTERPRET) or x.dtype not in OPERAND_DTYPES:
        return False
    d = x.shape[-1]
    if d > tiles.MAX_D:
        _warn_once(f"d={d}", f"nt_xent: d={d} is beyond the fused kernels' tiles (d <= {tiles.MAX_D}); "
                             "using the chunked PyTorch path")
        return False
    return (OPERAND_DTYPES[x.dtype], d) not in _unserved


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _normalise(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows and inverse norms, in fp32 (fp64 for fp64 inputs)."""
    zf = z.to(_compute_dtype(z.dtype))
    rnorm = 1.0 / zf.norm(dim=1).clamp_min(EPS)
    return zf * rnorm[:, None], rnorm


def _normalise_both(za: torch.Tensor, zc: torch.Tensor):
    """Anchors and candidates normalised once each; in one process they are the same tensor."""
    ua, rna = _normalise(za)
    if zc.data_ptr() == za.data_ptr() and zc.shape == za.shape:
        return ua, rna, ua, rna
    return (ua, rna, *_normalise(zc))


def _as_operand(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` rounded to the operand dtype `dtype` (bf16/fp16) and back: what a tensor core multiplies."""
    return x if dtype not in (torch.bfloat16, torch.float16) else x.to(dtype).to(x.dtype)


def _partner(rows: torch.Tensor, half: int) -> torch.Tensor:
    return torch.where(rows < half, rows + half, rows - half)


def _input_gradient(du: torch.Tensor, u: torch.Tensor, rnorm: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """dL/dz from the unscaled dL/du sums for u = z / |z|: scale on the device, remove the radial part,
    divide by |z|."""
    du = du * factor
    return (du - (du * u).sum(1, keepdim=True) * u) * rnorm[:, None]


# ----------------------------------------------------------------------------------------------
# Triton launches

def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SM_COUNT


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def _tuner(kernel: str, choices: tuple[tiles.Tile, ...]):
    """The kernel wrapped in Triton's autotuner over the table's tiles for one (dtype, d) class, keyed on d
    and the size buckets (Triton adds the pointer dtypes to the key); one tile is used as is."""
    configs = [triton.Config(t.meta(kernel), num_warps=t.num_warps, num_stages=t.num_stages) for t in choices]
    return triton.autotune(configs=configs, key=["D", "M_BUCKET", "K_BUCKET"])(KERNELS[kernel])


def _launch(kernel: str, dtype: torch.dtype, d: int, grid, *args) -> bool:
    """Run one kernel over `grid(meta)`; False (after a one-time warning) when the GPU cannot hold it."""
    name = OPERAND_DTYPES[dtype]
    choices = tuple(tiles.configs(kernel, name, d))
    flags = {"IEEE": name == "float32", "UPCAST": INTERPRET}
    try:
        if AUTOTUNE:
            _tuner(kernel, choices)[grid](*args, **flags)
        else:
            KERNELS[kernel][grid](*args, **choices[0].meta(kernel), **flags)
    except OutOfResources as e:
        _unserved.add((name, d))
        _warn_once(f"{name},{d}", f"nt_xent: the {kernel} kernel does not fit this GPU for {name} d={d} ({e}); "
                                  "using the chunked PyTorch path")
        return False
    return True


def _plan(kernel: str, dtype: torch.dtype, d: int, owned: int, swept: int, device: torch.device) -> tiles.Split:
    """The split of the swept axis for the table's default tile (the autotuner's tiles share SPLIT_ALIGN)."""
    tile = tiles.configs(kernel, OPERAND_DTYPES[dtype], d)[0]
    block = tile.block_n if kernel == "bwd_cols" else tile.block_m
    d_blocks = 1 if kernel == "fwd" else triton.cdiv(d, tile.block_d)
    return tiles.plan_split(triton.cdiv(owned, block) * d_blocks, swept, _sm_count(device))


def _sum_splits(part: torch.Tensor) -> torch.Tensor:
    return part[0] if part.shape[0] == 1 else part.sum(0)


def forward_triton(za, zc, offset, half, temperature):
    """Mean loss and per-anchor LSE (fp32) with the Triton kernels; the PyTorch path if they cannot launch."""
    ua, _, uc, _ = _normalise_both(za, zc)
    m, k, d = ua.shape[0], uc.shape[0], ua.shape[1]
    a = ua.to(za.dtype)
    c = a if uc is ua else uc.to(za.dtype)
    split = _plan("fwd", za.dtype, d, m, k, za.device)
    lse_part = torch.empty(split.count, m, device=za.device, dtype=torch.float32)
    pos_part = torch.empty_like(lse_part)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), split.count)
    if not _launch("fwd", za.dtype, d, grid, a, c, lse_part, pos_part, m, k, d, offset, half, 1.0 / temperature,
                   split.length, _bucket(m), _bucket(k)):
        return forward_torch(za, zc, offset, half, temperature)
    lse = lse_part[0] if split.count == 1 else torch.logsumexp(lse_part, 0)
    return (lse - pos_part.sum(0)).mean(), lse


def backward_triton(grad, za, zc, lse, offset, half, temperature):
    """fp32 gradients to za and zc (the op casts them to the inputs' dtypes); `grad` stays on the device."""
    ua, rna, uc, rnc = _normalise_both(za, zc)
    m, k, d = ua.shape[0], uc.shape[0], ua.shape[1]
    a = ua.to(za.dtype)
    c = a if uc is ua else uc.to(za.dtype)
    rows = _plan("bwd_rows", za.dtype, d, m, k, za.device)
    cols = _plan("bwd_cols", za.dtype, d, k, m, za.device)
    dua = torch.empty(rows.count, m, d, device=za.device, dtype=torch.float32)
    duc = torch.empty(cols.count, k, d, device=za.device, dtype=torch.float32)
    shared = (m, k, d, offset, half, 1.0 / temperature)
    buckets = (_bucket(m), _bucket(k))
    rows_grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), rows.count, triton.cdiv(d, meta["BLOCK_D"]))
    cols_grid = lambda meta: (triton.cdiv(k, meta["BLOCK_N"]), cols.count, triton.cdiv(d, meta["BLOCK_D"]))
    if not (_launch("bwd_rows", za.dtype, d, rows_grid, a, c, lse, dua, *shared, rows.length, *buckets)
            and _launch("bwd_cols", za.dtype, d, cols_grid, a, c, lse, duc, *shared, cols.length, *buckets)):
        return backward_torch(grad, za, zc, lse, offset, half, temperature)
    factor = grad.to(torch.float32) / (m * temperature)
    return _input_gradient(_sum_splits(dua), ua, rna, factor), _input_gradient(_sum_splits(duc), uc, rnc, factor)


# ----------------------------------------------------------------------------------------------
# The same algorithm in PyTorch, over chunks of anchors (CPU, fp64, and any d the kernels do not serve)

def _chunks(m: int, k: int):
    step = max(16, CHUNK_ELEMENTS // k)
    for lo in range(0, m, step):
        yield lo, min(m, lo + step)


def _chunk_logits(a, c, lo, hi, offset, half, temperature):
    rows = torch.arange(lo, hi, device=a.device)
    s = (a[lo:hi] @ c.T).mul_(1.0 / temperature)
    s[rows - lo, rows + offset] = float("-inf")
    return s, rows, _partner(rows, half) + offset


def _operands(za, zc):
    """Unit rows (fp32/fp64) and the same rounded as the kernels' operands."""
    ua, rna, uc, rnc = _normalise_both(za, zc)
    a = _as_operand(ua, za.dtype)
    c = a if uc is ua else _as_operand(uc, zc.dtype)
    return ua, rna, uc, rnc, a, c


def forward_torch(za, zc, offset, half, temperature):
    """Mean loss and per-anchor LSE in fp32 (fp64 for fp64 inputs), chunk by chunk of anchors."""
    ua, _, _, _, a, c = _operands(za, zc)
    m = ua.shape[0]
    lse = torch.empty(m, device=za.device, dtype=ua.dtype)
    total = torch.zeros((), device=za.device, dtype=ua.dtype)
    for lo, hi in _chunks(m, c.shape[0]):
        s, rows, partner = _chunk_logits(a, c, lo, hi, offset, half, temperature)
        lse[lo:hi] = torch.logsumexp(s, dim=1)
        total += (lse[lo:hi] - s[rows - lo, partner]).sum()
    return total / m, lse


def backward_torch(grad, za, zc, lse, offset, half, temperature):
    """Gradients to za and zc in fp32 (fp64 for fp64 inputs), rounding where the kernels do."""
    ua, rna, uc, rnc, a, c = _operands(za, zc)
    m = ua.shape[0]
    lse = lse.to(ua.dtype)
    dua = torch.empty_like(ua)
    duc = torch.zeros_like(uc)
    for lo, hi in _chunks(m, c.shape[0]):
        s, rows, partner = _chunk_logits(a, c, lo, hi, offset, half, temperature)
        p = s.sub_(lse[lo:hi, None]).exp_()
        p[rows - lo, partner] -= 1
        p = _as_operand(p, za.dtype)
        dua[lo:hi] = p @ c
        duc.addmm_(p.T, a[lo:hi])
    factor = grad.to(ua.dtype) / (m * temperature)
    return _input_gradient(dua, ua, rna, factor), _input_gradient(duc, uc, rnc, factor)


# ----------------------------------------------------------------------------------------------
# One op for torch.compile and autograd

@torch.library.custom_op("faceclr::nt_xent_fwd", mutates_args=())
def _fwd_op(za: torch.Tensor, zc: torch.Tensor, offset: int, half: int, temperature: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    impl = forward_triton if use_triton(za) else forward_torch
    return impl(za.contiguous(), zc.contiguous(), offset, half, temperature)


@_fwd_op.register_fake
def _(za, zc, offset, half, temperature):
    dtype = _compute_dtype(za.dtype)
    return za.new_empty((), dtype=dtype), za.new_empty(za.shape[0], dtype=dtype)


@torch.library.custom_op("faceclr::nt_xent_bwd", mutates_args=())
def _bwd_op(grad: torch.Tensor, za: torch.Tensor, zc: torch.Tensor, lse: torch.Tensor, offset: int, half: int,
            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    impl = backward_triton if use_triton(za) else backward_torch
    dza, dzc = impl(grad, za.contiguous(), zc.contiguous(), lse, offset, half, temperature)
    return dza.to(za.dtype), dzc.to(zc.dtype)


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

    Returns the mean over this rank's 2B anchors, in fp32 (fp64 for fp64 inputs). Its gradient to
    `z1`, `z2` is W times the gradient of the global mean loss, so DDP's averaging yields exactly the
    global gradient, and the mean of the W returned values is the single-process loss on the
    concatenated batch. Every rank must pass the same B. Pass bf16 (fp16) views to run the products
    on tensor cores; fp32 views get exact fp32 products.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [B, d], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z = torch.cat([z1, z2])
    half = z1.shape[0]
    if group is None or dist.get_world_size(group) == 1:
        return nt_xent_local(z, z, 0, half, temperature)
    candidates = torch.cat(all_gather(z, group=group))
    return nt_xent_local(z, candidates, dist.get_rank(group) * z.shape[0], half, temperature)

"""Launch plans for the NT-Xent kernels: tile configurations by (kernel, dtype, d) and the split of the sweep.

Every configuration listed here is compiled for sm_80 and sm_90 by `python -m kernels.compile_check`,
which proves it fits the shared memory and registers of both; the autotuner only chooses among them.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_D = 2048
"""Largest feature dimension the table serves (and compile_check proves); larger d runs the PyTorch path."""

SPLIT_ALIGN = 64
"""Split lengths are multiples of this (every swept block below divides it), so no tile straddles two splits."""

PROGRAMS_PER_SM = 2
"""The split aims at this many programs per streaming multiprocessor: enough that the GPU stays busy while
programs finish unevenly; more would only add partial results to combine."""

OPERAND_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Tile:
    """One launch configuration: tile sizes (constexprs) and the compiler's warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    block_d: int
    one_chunk: bool
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        if self.one_chunk and self.block_k != self.block_d:
            raise ValueError("a one-chunk tile reuses the loaded rows for the gradient: block_k must equal block_d")

    def meta(self, kernel: str) -> dict:
        """The kernel's constexpr tile arguments (the forward has no output feature block)."""
        out = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "ONE_CHUNK": self.one_chunk}
        if kernel != "fwd":
            out["BLOCK_D"] = self.block_d
        return out

    def name(self, kernel: str) -> str:
        d = "" if kernel == "fwd" else f" bd{self.block_d}"
        chunk = "one" if self.one_chunk else "chunked"
        return (f"m{self.block_m} n{self.block_n} k{self.block_k}{d} {chunk} "
                f"w{self.num_warps} s{self.num_stages}")


def _pow2_at_least(x: int, floor: int = 16) -> int:
    p = floor
    while p < x:
        p *= 2
    return p


def configs(kernel: str, dtype: str, d: int) -> list[Tile]:
    """The candidate tiles for one kernel, operand dtype and feature dimension; the first is the default.

    Chosen by compile_check on sm_80 and sm_90 (registers, spills, shared memory; docs/kernels.md). Only the
    owned block (rows of the forward and anchor gradient, columns of the candidate gradient) may differ
    between the candidates of one list: the split plan takes the swept block from the first.
    - bf16/fp16 up to d=256: the whole row is one chunk (the owned rows stay loaded through the sweep);
      up to d=128 the autotuner chooses among 64 owned rows with 4 or 8 warps and 128 with 8, none
      spilling; at d=256 only 8 warps avoid spills on sm_80 (4 warps spill 28 bytes in the anchor gradient).
    - bf16/fp16 above: chunks of 64 features for the scores, gradient blocks of 256 features (8 warps:
      212 registers on sm_80, no spills; blocks of 128 reach 255 registers with 4 warps).
    - fp32 (exact products on the FMA units, which hold the tile in registers): 16-feature chunks, and
      32 x 32 gradient tiles with blocks of up to 128 features (at most 16 bytes spilled per thread on
      sm_80, none on sm_90; the anchor gradient with 64 x 64 tiles spilled 32-668 bytes on sm_80 in all
      seven variants tried).
    """
    if dtype not in OPERAND_DTYPES:
        raise ValueError(f"no NT-Xent kernel for operand dtype {dtype}")
    if not 1 <= d <= MAX_D:
        raise ValueError(f"no NT-Xent tile for d={d} (1..{MAX_D})")
    width = _pow2_at_least(d)
    if dtype == "float32":
        if kernel == "fwd":
            return [Tile(64, 64, 16, 16, width <= 16, 4, 2)]
        return [Tile(32, 32, 16, 16, True, 4, 2) if width <= 16 else Tile(32, 32, 16, min(width, 128), False, 4, 2)]
    if width <= 128:  # the training path: the autotuner picks by size bucket; 128 owned rows halve the re-reads
        owned = (128, 64) if kernel != "bwd_cols" else (64, 128)
        return [Tile(64, 64, width, width, True, 4, 3), Tile(64, 64, width, width, True, 8, 3),
                Tile(*owned, width, width, True, 8, 3)]
    if width <= 256:
        return [Tile(64, 64, width, width, True, 8, 3)]
    return [Tile(64, 64, 64, 256, False, 8, 3)]


@dataclass(frozen=True)
class Split:
    """How the swept axis is cut: `count` programs along grid axis 1, each sweeping `length` entries."""

    count: int
    length: int


def plan_split(owned_blocks: int, swept: int, sm_count: int, align: int | None = None) -> Split:
    """Split the swept axis (candidates, or anchors for the candidate gradient) into aligned stretches until
    the grid reaches PROGRAMS_PER_SM per SM or each split is one stretch."""
    align = align or SPLIT_ALIGN
    stretches = -(-swept // align)
    want = -(-PROGRAMS_PER_SM * sm_count // max(owned_blocks, 1))
    count = max(1, min(want, stretches))
    length = -(-stretches // count) * align
    return Split(-(-swept // length), length)

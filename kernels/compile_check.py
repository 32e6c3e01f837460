"""Compile every NT-Xent kernel variant the engine can launch for real GPUs, on a machine without one.

    python -m kernels.compile_check [--arch sm_80] [--arch sm_90] [--json PATH] [--d 16,32,...] [--workers N]

For each architecture, operand dtype (float32, bfloat16, float16), feature dimension and tile configuration
of `kernels.tiles`, Triton compiles the kernel to a cubin with its own ptxas; the row records the shared
memory a block needs (Triton's metadata), the registers and spill stores per thread (`ptxas -v` on the
same PTX), and whether the PTX has tensor-core instructions. A variant fits when its shared memory is
within the architecture's per-block limit; ptxas caps registers at 255 itself, spilling the rest, so
spills are reported, not judged. Exit 1 when a launchable variant does not fit. What this proves: every
launch finds its resources (no `OutOfResources`) and how much each variant spills. What it does not: speed,
or that the kernels compute the right thing (the interpreter tests do that).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from base.cli import OneLineParser, output_file
from base.errors import UsageError, entry_point
from base.files import write_atomic
from kernels.tiles import MAX_D, OPERAND_DTYPES, Tile, configs

PROG = "python -m kernels.compile_check"

SHARED_LIMIT = {80: 166_912, 90: 232_448}
"""Bytes of shared memory one block may use (opt-in maximum): A100 163 KB, H100/H200 227 KB."""

DEFAULT_DIMS = (16, 32, 64, 128, 256, 512, 1024, 2048, 700)
"""Powers of two up to the table's MAX_D, and 700: neither a power of two nor a multiple of 16, so Triton
compiles it without its divisible-by-16 specialisation of D (and with masks on partial chunks)."""

TRITON_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

TENSOR_CORE_OP = re.compile(r"\b(?:wgmma|mma)\.")
"""PTX tensor-core instructions: `wgmma.mma_async` on sm_90, `mma.sync` on sm_80."""

INT_ARGS_DIVISIBLE = ("M", "K", "offset", "half", "split_len", "M_BUCKET", "K_BUCKET")
"""Integer arguments compiled as multiples of 16, as Triton specialises them at training sizes (B a multiple
of 16, as SimCLR batches are); D is marked so only when d is."""


def _arch_number(text: str) -> int:
    m = re.fullmatch(r"sm_?(\d+)", text)
    if not m or int(m.group(1)) not in SHARED_LIMIT:
        raise UsageError(f"unknown --arch {text!r} (use one of {', '.join(f'sm_{a}' for a in SHARED_LIMIT)})")
    return int(m.group(1))


def _tool(name: str) -> str:
    """A CUDA binary shipped inside the triton wheel (TRITON_<NAME>_PATH overrides, as in Triton)."""
    import triton

    override = os.environ.get(f"TRITON_{name.upper()}_PATH")
    return override or str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill-store bytes) per thread from `ptxas -v` on this PTX for this architecture."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([_tool("ptxas"), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(src), "-o",
                            str(src.with_suffix(".cubin"))], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {r.stderr.strip()[-500:]}")
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spills = re.search(r"(\d+) bytes spill stores", r.stderr)
    if not regs or not spills:
        raise RuntimeError(f"cannot read ptxas -v output: {r.stderr.strip()[-500:]}")
    return int(regs.group(1)), int(spills.group(1))


def compile_variant(kernel: str, dtype: str, d: int, tile: Tile, arch: int) -> dict:
    """Compile one kernel variant for `arch` (80, 90) and return its compile_check row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.ntxent_kernels import FLOAT_ARGS, KERNELS, OPERAND_POINTERS, POINTERS

    fn = KERNELS[kernel]
    constexprs = {**tile.meta(kernel), "IEEE": dtype == "float32", "UPCAST": False}
    signature, divisible = {}, []
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = "*" + (TRITON_DTYPE[dtype] if name in OPERAND_POINTERS else "fp32")
            divisible.append(i)
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in INT_ARGS_DIVISIBLE or (name == "D" and d % 16 == 0):
                divisible.append(i)
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})
    registers, spills = ptxas_usage(compiled.asm["ptx"], arch)
    shared = int(compiled.metadata.shared)
    return {"kernel": kernel, "dtype": dtype, "d": d, "arch": f"sm_{arch}", "config": tile.name(kernel),
            "shared_bytes": shared, "registers": registers, "spill_bytes": spills,
            "fits": shared <= SHARED_LIMIT[arch] and registers <= 255,
            "tensor_cores": TENSOR_CORE_OP.search(compiled.asm["ptx"]) is not None,
            "seconds": round(time.perf_counter() - t0, 2)}


def _job(args: tuple) -> dict:
    try:
        return compile_variant(*args)
    except Exception as e:  # a failed compile is a failed row, reported with the others
        kernel, dtype, d, tile, arch = args
        return {"kernel": kernel, "dtype": dtype, "d": d, "arch": f"sm_{arch}", "config": tile.name(kernel),
                "shared_bytes": None, "registers": None, "spill_bytes": None, "fits": False,
                "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}


def variants(archs: list[int], dims: list[int]) -> list[tuple]:
    """Every (kernel, dtype, d, tile, arch) the engine can launch for these d."""
    from kernels.ntxent_kernels import KERNELS

    return [(kernel, dtype, d, tile, arch) for arch in archs for dtype in OPERAND_DTYPES for d in dims
            for kernel in KERNELS for tile in configs(kernel, dtype, d)]


@entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", action="append", default=None, help="sm_80 or sm_90 (repeatable; default both)")
    p.add_argument("--d", default=",".join(map(str, DEFAULT_DIMS)), help="comma-separated feature dimensions")
    p.add_argument("--json", type=output_file, default=None, help="write {'rows': [...]} here")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes")
    a = p.parse_args(argv)
    archs = list(dict.fromkeys(_arch_number(x) for x in (a.arch or ["sm_80", "sm_90"])))
    try:
        dims = list(dict.fromkeys(int(x) for x in a.d.split(",")))
    except ValueError:
        raise UsageError(f"--d must be comma-separated integers, got {a.d!r}") from None
    if not all(1 <= d <= MAX_D for d in dims):
        raise UsageError(f"--d values must lie in 1..{MAX_D} (larger d runs the PyTorch path, nothing to compile)")
    if a.workers < 1:
        raise UsageError("--workers must be at least 1")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise UsageError("triton is not installed (pip install triton; it ships ptxas)") from None
    todo = variants(archs, dims)
    t0 = time.perf_counter()
    if a.workers == 1:
        rows = [_job(v) for v in todo]
    else:
        with ProcessPoolExecutor(min(a.workers, len(todo))) as pool:
            rows = list(pool.map(_job, todo))
    rows.sort(key=lambda r: (r["arch"], r["dtype"], r["d"], r["kernel"], r["config"]))
    for r in rows:
        state = "fits" if r["fits"] else "DOES NOT FIT"
        detail = r.get("error") or (f"shared {r['shared_bytes']:>7} B, {r['registers']:>3} registers, "
                                    f"{r['spill_bytes']:>6} B spilled")
        print(f"{r['arch']} {r['dtype']:>8} d={r['d']:<5} {r['kernel']:<8} {r['config']:<34} {detail}  {state}")
    bad = [r for r in rows if not r["fits"]]
    print(f"{len(rows)} variants compiled in {time.perf_counter() - t0:.0f} s: {len(rows) - len(bad)} fit, "
          f"{len(bad)} do not")
    if a.json:
        write_atomic(a.json, json.dumps({"rows": rows}, indent=1).encode())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

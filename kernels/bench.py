"""Forward+backward time and peak memory of the fused NT-Xent against the eager and compiled reference.

    python -m kernels.bench [--cpu] [--sizes 512,1024,4096,8192,16384,65536] [--dim 128] [--json PATH]
                            [--rows-out FILE.jsonl]

Sizes are 2N, the total number of views, in one process (W = 1): 512, 1024 and 4096 are SimCLR's
per-GPU training batches, the larger ones the loss's scaling. Every implementation runs on the same
inputs in the same invocation, so the ratios are the figures to quote. A row that fails (a Triton error,
out of memory) is reported as failed and the others still run. On the GPU, peak memory is
`torch.cuda.max_memory_allocated` above the inputs; on the CPU each measurement runs in a fresh
process and peak memory is the rise of the resident-set high-water mark (VmHWM, reset after the
warm-up) over the resident set after the warm-up, with the allocator's free memory handed back to
the system first (`malloc_trim`), so buffers reused from the warm-up count as they do in a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kernels.ntxent import nt_xent
from kernels.reference import nt_xent_reference
from measure.hardware import hardware
from measure.memory import peak_bytes, reset_peak
from measure.record import add_rows_out, append_row, save
from pack.cli import OneLineParser, fail, positive

try:
    from triton.errors import TritonError
except ImportError:  # no triton: nothing can raise it
    TritonError = RuntimeError

PROG = "python -m kernels.bench"
IMPLS = ("fused", "eager", "compiled")
SIZES = {"cuda": "512,1024,4096,8192,16384,65536", "cpu": "512,1024,4096,8192,16384"}
ROW_ERRORS = (RuntimeError, torch.OutOfMemoryError, TritonError)
"""What one measurement may raise without ending the others: a kernel that does not fit (`OutOfResources`,
a `TritonError`, not a `RuntimeError`), memory, a failed child process."""


def _loss_fn(impl: str):
    if impl == "fused":
        return nt_xent
    if impl == "eager":
        return nt_xent_reference
    return torch.compile(nt_xent_reference)


def measure(size: int, dim: int, impl: str, device: str, dtype: torch.dtype, repeats: int) -> dict:
    """Median forward+backward milliseconds and peak extra memory for one implementation."""
    torch.manual_seed(0)
    b = size // 2
    z1 = torch.randn(b, dim, device=device, dtype=dtype, requires_grad=True)
    z2 = torch.randn(b, dim, device=device, dtype=dtype, requires_grad=True)
    fn = _loss_fn(impl)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> None:
        z1.grad = z2.grad = None
        fn(z1, z2, 0.1).backward()

    step()  # warm-up: compilation, library loading, allocator pools
    step()
    sync()
    base = reset_peak(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = peak_bytes(device)
    return {"size": size, "dim": dim, "impl": impl, "dtype": str(dtype).removeprefix("torch."),
            "ms": round(statistics.median(times), 3), "peak_mem_mb": round((peak - base) / 2**20, 1)}


def _measure_in_child(size: int, dim: int, impl: str, dtype: str, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "kernels.bench", "--cpu", "--one", f"{size},{dim},{impl},{dtype},{repeats}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"measuring {impl} at 2N={size} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [f"{'2N':>7} {'impl':>9} {'ms':>10} {'peak MB':>10} {'time vs eager':>14} {'mem vs eager':>13}"]
    eager = {r["size"]: r for r in rows if r["impl"] == "eager"}
    for r in rows:
        e = eager.get(r["size"])
        speed = f"{e['ms'] / r['ms']:.2f}x faster" if e else "-"
        mem = f"{r['peak_mem_mb'] / e['peak_mem_mb']:.1%}" if e and e["peak_mem_mb"] > 0 else "-"
        lines.append(f"{r['size']:>7} {r['impl']:>9} {r['ms']:>10.2f} {r['peak_mem_mb']:>10.1f} {speed:>14} {mem:>13}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="measure on the CPU even when a GPU is present")
    p.add_argument("--sizes", default=None, help=f"comma-separated 2N values (default: GPU {SIZES['cuda']}; "
                                                 f"CPU {SIZES['cpu']})")
    p.add_argument("--dim", type=positive(int), default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="input dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--impls", default=",".join(IMPLS), help="subset of fused,eager,compiled")
    p.add_argument("--repeats", type=positive(int), default=5)
    p.add_argument("--json", type=Path, default=None, help="write the rows and the hardware here")
    add_rows_out(p)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    device = "cpu" if a.cpu or not torch.cuda.is_available() else "cuda"
    if a.one:  # a single CPU measurement in a fresh process
        size, dim, impl, dtype, repeats = a.one.split(",")
        print(json.dumps(measure(int(size), int(dim), impl, "cpu", getattr(torch, dtype), int(repeats))))
        return 0
    dtype = a.dtype or ("bfloat16" if device == "cuda" else "float32")
    try:
        sizes = [int(s) for s in (a.sizes or SIZES[device]).split(",")]
    except ValueError:
        fail(f"--sizes must be comma-separated integers, got {a.sizes!r}", PROG)
    if any(s < 2 or s % 2 for s in sizes):
        fail(f"--sizes are 2N, even and at least 2, got {a.sizes!r}", PROG)
    if unknown := set(a.impls.split(",")) - set(IMPLS):
        fail(f"unknown --impls {','.join(sorted(unknown))} (choose from {','.join(IMPLS)})", PROG)
    if a.json and not a.json.parent.is_dir():
        fail(f"--json {a.json}: no such folder {a.json.parent}", PROG)
    rows = []
    for size in sizes:
        for impl in a.impls.split(","):
            try:
                if device == "cuda":
                    row = measure(size, a.dim, impl, device, getattr(torch, dtype), a.repeats)
                    torch.cuda.empty_cache()
                else:
                    row = _measure_in_child(size, a.dim, impl, dtype, a.repeats)
            except ROW_ERRORS as e:
                message = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
                print(f"kernels.bench: {impl} at 2N={size}: {message}", file=sys.stderr)
                row = {"size": size, "dim": a.dim, "impl": impl, "dtype": dtype, "ms": None, "peak_mem_mb": None,
                       "error": message}
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            append_row(a.rows_out, row)
            print(f"  2N={size:>6} {impl:>9}: {row['ms']} ms, {row['peak_mem_mb']} MB", file=sys.stderr)
    print(f"NT-Xent forward+backward, d={a.dim}, {dtype}, {hardware(device)}")
    print(table([r for r in rows if r["ms"] is not None]))
    for r in rows:
        if r["ms"] is None:
            print(f"{r['size']:>7} {r['impl']:>9} FAILED: {r['error']}")
    save("kernels", {"rows": rows, "dim": a.dim, "dtype": dtype}, a.json, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

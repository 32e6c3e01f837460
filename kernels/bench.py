"""Forward+backward time and peak memory of the fused NT-Xent against the plain-PyTorch reference, like with like.

    python -m kernels.bench [--cpu] [--sizes 512,1024,4096] [--dtypes bfloat16,float32] [--dim 128] [--json PATH]
                            [--rows-out FILE.jsonl]

Sizes are 2N, the total number of views, in one process (W = 1): 512, 1024 and 4096 are SimCLR's
per-GPU training batches, the larger ones the loss's scaling (the GPU's default; on the CPU pass them
with --sizes). Each implementation, fused and the reference eager and under `torch.compile`, runs in
each dtype on the same inputs in the same invocation, and the ratios are the figures to quote:
- fusion: fused against the reference in the same dtype (bf16 vs bf16, fp32 vs fp32);
- precision: each implementation in bf16 (fp16) against itself in fp32, what the narrower dtype buys.
The reference computes in its inputs' dtype (`nt_xent_reference(upcast=False)`, plain PyTorch on those
tensors; its docstring says where it rounds); under `torch.compile` Inductor may round at fewer points.
Every comparison names both sides' implementation and dtype. A row that fails (a Triton error, out of
memory) is reported as failed and the others still run. On the GPU, peak memory is
`torch.cuda.max_memory_allocated` above the inputs; on the CPU each measurement runs in a fresh
process and peak memory is the rise of the resident-set high-water mark (VmHWM, reset after the
warm-up) over the resident set after the warm-up, with the allocator's free memory handed back to
the system first (`malloc_trim`), so buffers reused from the warm-up count as they do in a run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from base.cli import OneLineParser, output_file, positive
from base.errors import UsageError, entry_point
from kernels.ntxent import nt_xent
from kernels.reference import nt_xent_reference
from measure.hardware import hardware
from measure.memory import peak_bytes, reset_peak
from measure.record import add_rows_out, append_row, save, speed

try:
    from triton.errors import TritonError
except ImportError:  # no triton: nothing can raise it
    TritonError = RuntimeError

PROG = "python -m kernels.bench"
IMPLS = ("fused", "eager", "compiled")
DTYPES = ("bfloat16", "float32", "float16")
SIZES = {"cuda": "512,1024,4096,8192,16384,65536", "cpu": "512,1024,4096"}
"""The CPU default is the training sizes alone: with 8192 and 16384 a run takes several times as long
(docs/kernels.md states both durations), and the CPU path is the PyTorch twin, not the kernels being sold."""
FUSION = (("fused", "eager"), ("fused", "compiled"))
"""(side, baseline) of the fusion comparisons, both in the same dtype."""
ROW_ERRORS = (RuntimeError, torch.OutOfMemoryError, TritonError)
"""What one measurement may raise without ending the others: a kernel that does not fit (`OutOfResources`,
a `TritonError`, not a `RuntimeError`), memory, a failed child process."""


def reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The reference in its inputs' dtype: what a user's PyTorch does with bf16 views."""
    return nt_xent_reference(z1, z2, temperature, upcast=False)


def _loss_fn(impl: str):
    if impl == "fused":
        return nt_xent
    if impl == "eager":
        return reference
    return torch.compile(reference)


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


def comparisons(rows: list[dict]) -> list[dict]:
    """Fusion (fused vs reference, same dtype) and precision (each implementation, narrow dtype vs fp32) rows,
    each naming both sides; a pair with a failed or missing side is left out."""
    done = {(r["size"], r["impl"], r["dtype"]): r for r in rows if r["ms"] is not None}
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    pairs = [("fusion", (impl, dtype), (base, dtype)) for dtype in dtypes for impl, base in FUSION]
    pairs += [("precision", (impl, dtype), (impl, "float32")) for impl in impls for dtype in dtypes
              if dtype != "float32"]
    out = []
    for size in sizes:
        for kind, side, base in pairs:
            a, b = done.get((size, *side)), done.get((size, *base))
            if a is None or b is None:
                continue
            speedup = b["ms"] / a["ms"]
            out.append({"size": size, "dim": a["dim"], "kind": kind, "impl": a["impl"], "dtype": a["dtype"],
                        "baseline_impl": b["impl"], "baseline_dtype": b["dtype"],
                        "ms": a["ms"], "baseline_ms": b["ms"], "speedup": round(speedup, 3), "speed": speed(speedup),
                        "peak_mem_mb": a["peak_mem_mb"], "baseline_peak_mem_mb": b["peak_mem_mb"],
                        "mem_ratio": round(a["peak_mem_mb"] / b["peak_mem_mb"], 3) if b["peak_mem_mb"] > 0 else None})
    return out


def table(rows: list[dict], compared: list[dict]) -> str:
    """The measurements, then every comparison with both sides named."""
    lines = [f"{'2N':>7} {'impl':>9} {'dtype':>9} {'ms':>10} {'peak MB':>10}"]
    for r in rows:
        if r["ms"] is None:
            lines.append(f"{r['size']:>7} {r['impl']:>9} {r['dtype']:>9} FAILED: {r['error']}")
        else:
            lines.append(f"{r['size']:>7} {r['impl']:>9} {r['dtype']:>9} {r['ms']:>10.2f} {r['peak_mem_mb']:>10.1f}")
    lines += ["", f"{'2N':>7} {'kind':>9} {'side':>18} {'vs baseline':>18} {'time':>13} {'peak memory':>12}"]
    for c in compared:
        mem = f"{c['mem_ratio']:.1%}" if c["mem_ratio"] is not None else "-"
        lines.append(f"{c['size']:>7} {c['kind']:>9} {c['impl'] + ' ' + c['dtype']:>18} "
                     f"{c['baseline_impl'] + ' ' + c['baseline_dtype']:>18} {c['speed']:>13} {mem:>12}")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def load_average() -> float | None:
    """The 1-minute load average: on a shared machine, what the times were measured against."""
    return round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None


@entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="measure on the CPU even when a GPU is present")
    p.add_argument("--sizes", default=None, help=f"comma-separated 2N values (default: GPU {SIZES['cuda']}; "
                                                 f"CPU {SIZES['cpu']})")
    p.add_argument("--dim", type=positive(int), default=128)
    p.add_argument("--dtypes", default="bfloat16,float32",
                   help=f"input dtypes, each for every implementation (subset of {','.join(DTYPES)}; precision "
                        "rows need float32)")
    p.add_argument("--impls", default=",".join(IMPLS), help="subset of fused,eager,compiled")
    p.add_argument("--repeats", type=positive(int), default=5)
    p.add_argument("--json", type=output_file, default=None,
                   help="write the rows, the comparisons and the hardware here")
    add_rows_out(p)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    device = "cpu" if a.cpu or not torch.cuda.is_available() else "cuda"
    if a.one:  # a single CPU measurement in a fresh process
        size, dim, impl, dtype, repeats = a.one.split(",")
        print(json.dumps(measure(int(size), int(dim), impl, "cpu", getattr(torch, dtype), int(repeats))))
        return 0
    try:
        sizes = [int(s) for s in (a.sizes or SIZES[device]).split(",")]
    except ValueError:
        raise UsageError(f"--sizes must be comma-separated integers, got {a.sizes!r}") from None
    if any(s < 2 or s % 2 for s in sizes):
        raise UsageError(f"--sizes are 2N, even and at least 2, got {a.sizes!r}")
    if unknown := set(a.impls.split(",")) - set(IMPLS):
        raise UsageError(f"unknown --impls {','.join(sorted(unknown))} (choose from {','.join(IMPLS)})")
    dtypes = list(dict.fromkeys(a.dtypes.split(",")))
    if unknown := set(dtypes) - set(DTYPES):
        raise UsageError(f"unknown --dtypes {','.join(sorted(unknown))} (choose from {','.join(DTYPES)})")
    start, load = time.perf_counter(), [load_average()]
    rows = []
    for size in sizes:
        for dtype in dtypes:
            for impl in a.impls.split(","):
                try:
                    if device == "cuda":
                        row = measure(size, a.dim, impl, device, getattr(torch, dtype), a.repeats)
                        torch.cuda.empty_cache()
                    else:
                        row = _measure_in_child(size, a.dim, impl, dtype, a.repeats)
                except ROW_ERRORS as e:
                    message = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
                    print(f"kernels.bench: {impl} {dtype} at 2N={size}: {message}", file=sys.stderr)
                    row = {"size": size, "dim": a.dim, "impl": impl, "dtype": dtype, "ms": None,
                           "peak_mem_mb": None, "error": message}
                    if device == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                append_row(a.rows_out, row)
                print(f"  2N={size:>6} {impl:>9} {dtype:>9}: {row['ms']} ms, {row['peak_mem_mb']} MB",
                      file=sys.stderr)
    seconds = time.perf_counter() - start
    load.append(load_average())
    compared = comparisons(rows)
    print(f"NT-Xent forward+backward, d={a.dim}, {hardware(device)}; the run took {duration(seconds)} "
          f"(load average {load[0]} at the start, {load[1]} at the end)")
    print(table(rows, compared))
    save("kernels", {"rows": rows, "comparisons": compared, "dim": a.dim, "dtypes": dtypes,
                     "seconds": round(seconds, 1), "load_average": load}, a.json, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

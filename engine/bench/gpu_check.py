"""./launch.sh gpu-check: on a GPU machine, the GPU tests and every benchmark, sized for a short loan.

    ./launch.sh gpu-check [--dry-run] [--json PLAN] [--out DIR] [--work DIR] [--only STAGE,...]
                          [--budget-scale F]
    FACECLR_WHEELHOUSE=DIR ./launch.sh gpu-check      # first installs from a wheelhouse, offline

Uses the machine's own Python (no venv, no network). Each stage runs in its own session (process group)
with its own time budget: a stage that overruns is killed with every process it started, so nothing holds
the GPU into the next stage, and the others still run. A stage that needs a missing package is skipped
with one line naming every package it lacks. Every bench appends each row to `<bench>.rows.jsonl` in --out
the moment the row is measured (`--rows-out`), so a stage killed at its budget keeps what it finished; its
JSON record follows when it ends, and summary.json is rewritten after every stage. Eager rows run first
and the cold compiles last, each in a stage of its own, so a slow compile cannot cost the eager figures.
The budgets of the stages that run add up to at most 360 s without DALI and 540 s with it (a debug
allocation of 15 minutes, 10 per command; BUDGETS says where each figure comes from). Exit code 0 when
every stage that ran passed; 1 when one failed or none ran.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from base.errors import UsageError, entry_point

ROOT = Path(__file__).resolve().parents[2]
PROG = "./launch.sh gpu-check"
LIMIT_WITHOUT_DALI, LIMIT_WITH_DALI = 360, 540

BUDGETS = {
    "install": 30, "install with DALI": 60, "gpu-tests": 45, "kernels": 40, "step": 55, "data": 30,
    "dali-tests": 30, "loader": 45, "e2e": 50, "e2e with DALI": 75, "kernels-compile": 45,
}
"""Seconds per stage, from cold-start reasoning (no GPU has run them yet). Every stage starts a fresh
Python: importing torch and faceclr took 7-15 s on the 2-core CPU container at a load average of 12
(`import torch` 7.0 s, `engine.trainer` 15.1 s), call it 10 s on the node, plus 1-3 s for the CUDA context.
install: `pip install --no-index` of the wheelhouse's requirements into a --target on that container (load
  average 17): without DALI (102 MiB of wheels) 12 s of CPU time (44 s wall), with DALI (359 MiB, 1.1 GB
  unpacked) 17 s of CPU time (59 s wall).
gpu-tests: pytest on the default kernel variants: 12 Triton compiles (3 kernels x 3 bf16 tiles, 3 fp32),
  16 s on the CPU container (`python -m kernels.compile_check --arch sm_90 --d 128 --workers 1`), the
  autotuner timing 3 tiles per kernel and size bucket (about 0.15 s each: Triton's do_bench, 25 ms warm-up
  and 100 ms of repeats), and a float64 check per case: about 30 s.
kernels: fused and eager NT-Xent at 2N = 512 ... 65536 in bf16. The Triton cache on disk holds the
  gpu-tests compiles; 36 autotune timings (3 kernels x 3 tiles x 4 sizes) about 6 s; 7 runs per row of
  milliseconds each: about 25 s, 40 s if the cache misses.
step: two eager rows (fp32 NCHW, bf16 NHWC), each a fresh process: start and Trainer about 15 s, cuDNN's
  algorithm search in the 3 warm-up steps a few seconds, 13 steps of ResNet-50 on 2 x 256 views at 224 px
  (12 GFLOP a view forward and backward: about 0.3 s a step in fp32, 0.1 s in bf16): about 22 s a row.
data: pack.synth (200 identities, 9,200 images) and pack, both parallel over all cores: 51 s of CPU time
  on the container (42 and 9 s), so a few seconds of work on 16 cores plus two process starts: about 15 s.
dali-tests: pytest, a 244-image probe split, one DALI GPU pipeline: about 20 s.
loader: DALI (two hand-overs) and the torch baseline, 23 batches of 256 each, in one process: about 30 s.
e2e: one fresh process a row (baseline, engine, and + DALI loader where DALI is), 11 steps of 128 real
  samples, eager: about 20 s a row.
kernels-compile: the compiled reference: two cold inductor compiles (the first size, then the dynamic
  recompile at the second), each some 5 Triton kernels forward and backward, about 15 s each.
step-compile: the row training runs on a GPU (bf16, NHWC, compiled): a cold torch.compile of ResNet-50
  forward and backward, about 80-155 s by estimate. It runs last and gets what the limit leaves after the
  other stages that run (without DALI 95 s, 65 s after a wheelhouse install; with DALI 175 s, 115 s) plus
  every second the stages before it left unused, up to STEP_COMPILE_MAX_S; if it still overruns, the eager
  rows are in by then."""

PACKAGES = ("torch", "triton", "torchvision", "accelerate", "numpy", "scipy", "PIL", "safetensors", "tqdm",
            "pytest", "pip", "nvidia.dali", "webdataset")
"""Every package a stage needs; a GPU machine's own Python may lack some (its DALI-free torch install, say)."""
PIP_NAMES = {"nvidia.dali": "nvidia-dali-cuda130", "PIL": "pillow"}
INSTALL_HINT = "or bring a wheelhouse: FACECLR_WHEELHOUSE=DIR ./launch.sh gpu-check (docs/gpu.md: air-gapped clusters)"

BENCH_NEEDS = ("torchvision", "numpy", "PIL", "safetensors", "tqdm")
"""What importing engine.bench needs (torch aside, which every stage assumes); the trainer adds accelerate
(with the dependencies pip installs along with it). tests/test_gpu_check.py derives every stage's list by
hiding packages."""
STEP_NEEDS = (*BENCH_NEEDS, "accelerate", "triton")
STEP_EAGER, STEP_COMPILED = "fp32 NCHW eager,bf16 NHWC eager", "bf16 NHWC compile"
"""The compiled row is the one training runs on a GPU by default."""
KERNEL_SIZES = "512,4096,16384,65536"
STEP_COMPILE_MAX_S = 200
"""The compile's estimate at its upper end (155 s), plus the process start and 13 steps, with margin: a
compile that hangs stops there even when the other stages left more."""
STOP_GRACE_S = 5.0
"""Between SIGTERM and SIGKILL for a stage's session that overran."""


def missing_packages(names: tuple[str, ...] = PACKAGES) -> list[str]:
    """Names that this Python cannot import, found without importing them."""
    missing = []
    for name in names:
        if name == "pip":
            # by its metadata: find_spec("pip") makes setuptools' distutils shim stand aside for the rest of
            # the process (_distutils_hack's spec_for_pip), and a later CPU torch.compile then fails
            try:
                found = importlib.metadata.distribution("pip") is not None
            except importlib.metadata.PackageNotFoundError:
                found = False
        else:
            try:
                found = importlib.util.find_spec(name) is not None
            except (ModuleNotFoundError, ValueError):  # a dotted name whose parent package is absent
                found = False
        if not found:
            missing.append(name)
    return missing


@dataclass
class Stage:
    name: str
    commands: list[list[str]]
    budget_s: float
    needs: tuple[str, ...] = ()
    """Every package it needs besides torch."""
    modules: tuple[str, ...] = ()
    """What its processes import, lazily imported faceclr modules included (tests/test_gpu_check.py derives
    `needs` from these by hiding packages)."""
    at_run: tuple[str, ...] = ()
    """The part of `needs` that only running imports (a loader's webdataset, DALI), not importing `modules`."""
    outputs: tuple[str, ...] = ()
    """Files in --out it writes: its JSON record and the rows file it appends to."""
    takes_slack: bool = False
    """May also use the seconds the stages before it left unused (net of the seconds their stops took)."""
    skip: str | None = None
    result: dict = field(default_factory=dict)


def wheels_in(wheelhouse: Path | None, names: list[str]) -> list[str]:
    """The import names among `names` whose wheel lies in the wheelhouse."""
    if wheelhouse is None or not wheelhouse.is_dir():
        return []
    from engine.bench.wheelhouse import wheel_key, wheel_names

    held = wheel_names(wheelhouse)
    return [n for n in names if wheel_key(PIP_NAMES.get(n, n)) in held]


def plan(out: Path, work: Path, missing: list[str], py: str = sys.executable, wheelhouse: Path | None = None,
         scale: float = 1.0, only: list[str] | None = None) -> list[Stage]:
    """The stages in the order they run, their budgets (times `scale`) and what they need. Without DALI the
    DALI stages are skipped and the end-to-end stage times the torch loader only. With a wheelhouse, a first
    stage installs from it, and what it holds counts as present. `only`: the stages to run (and install)."""
    from engine.bench.wheelhouse import install_command

    missing = [m for m in missing if m not in wheels_in(wheelhouse, missing)]
    dali = "nvidia.dali" not in missing
    data = work / "shards"
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA"]

    def bench(name: str, json_name: str, *args: str) -> tuple[list[str], tuple[str, str]]:
        return [py, "-m", *args, "--json", str(out / json_name), "--rows-out", str(out / f"{name}.rows.jsonl")], (
            json_name, f"{name}.rows.jsonl")

    # bf16 only: what training launches, and within the budgets (kernels.bench's default adds fp32, doubling the
    # autotune and compile work; run it alone on a longer loan for the bf16-vs-fp32 rows)
    kernels, kernels_out = bench("kernels", "kernels.json", "kernels.bench", "--sizes", KERNEL_SIZES,
                                 "--impls", "fused,eager", "--dtypes", "bfloat16")
    kernels_c, kernels_c_out = bench("kernels", "kernels_compile.json", "kernels.bench", "--sizes", KERNEL_SIZES,
                                     "--impls", "compiled", "--dtypes", "bfloat16")
    step, step_out = bench("step", "step.json", "engine.bench", "step", "--steps", "10", "--rows", STEP_EAGER)
    step_c, step_c_out = bench("step", "step_compile.json", "engine.bench", "step", "--steps", "10",
                               "--rows", STEP_COMPILED)
    loader, loader_out = bench("loader", "loader.json", "engine.bench", "loader", "--data", str(data),
                               "--steps", "20")
    # eager: the compiled engine row would be a second cold ResNet-50 compile; step-compile measures it
    e2e, e2e_out = bench("e2e", "e2e.json", "engine.bench", "e2e", "--data", str(data), "--steps", "8",
                         "--batch-size", "128", "--no-compile",
                         "--rows", "baseline,+ DALI loader,engine" if dali else "baseline,engine")
    bench_modules = ("engine.bench.__main__", "engine.trainer")
    stages = [
        # the kernel variants training launches by default (d = 128, bf16 and fp32); kernels.compile_check
        # proves on a CPU that every other variant fits, so the GPU compiles only these
        Stage("gpu-tests", [[*pytest, "-m", "gpu and default_variant", "tests/test_ntxent.py",
                             "--rows-out", str(out / "gpu-tests.rows.jsonl")]], BUDGETS["gpu-tests"],
              ("pytest", "triton"), ("pytest.__main__", "tests.conftest", "tests.test_ntxent"), ("triton",),
              outputs=("gpu-tests.rows.jsonl",)),
        Stage("kernels", [kernels], BUDGETS["kernels"], ("triton",), ("kernels.bench",), ("triton",),
              outputs=kernels_out),
        Stage("step", [step], BUDGETS["step"], STEP_NEEDS, bench_modules, ("triton",), outputs=step_out),
        Stage("data", [[py, "-m", "pack.synth", "--out", str(work / "raw"), "--identities", "200", "--no-progress"],
                       [py, "-m", "pack", "--src", str(work / "raw" / "imdb_crop"), "--out", str(data),
                        "--min-images", "5", "--shard-samples", "500", "--no-progress"]], BUDGETS["data"],
              ("numpy", "scipy", "PIL", "tqdm"), ("pack.synth", "pack.__main__")),
        Stage("dali-tests", [[*pytest, "-m", "gpu", "tests/test_data.py",
                              "--rows-out", str(out / "dali-tests.rows.jsonl")]], BUDGETS["dali-tests"],
              ("pytest", "numpy", "torchvision", "PIL", "nvidia.dali"),
              ("pytest.__main__", "tests.conftest", "tests.test_data"),
              ("nvidia.dali",), outputs=("dali-tests.rows.jsonl",)),
        Stage("loader", [loader], BUDGETS["loader"], (*BENCH_NEEDS, "nvidia.dali", "webdataset"),
              ("engine.bench.__main__",), ("nvidia.dali", "webdataset"), outputs=loader_out),
        Stage("e2e", [e2e], BUDGETS["e2e with DALI" if dali else "e2e"], (*STEP_NEEDS, "webdataset"), bench_modules,
              ("triton", "webdataset"), outputs=e2e_out),
        Stage("kernels-compile", [kernels_c], BUDGETS["kernels-compile"], ("triton",), ("kernels.bench",),
              ("triton",), outputs=kernels_c_out),
        Stage("step-compile", [step_c], 0, STEP_NEEDS, bench_modules, ("triton",), outputs=step_c_out,
              takes_slack=True),
    ]
    if wheelhouse is not None:
        with_dali = "nvidia.dali" in wheels_in(wheelhouse, ["nvidia.dali"])
        stages.insert(0, Stage("install", [install_command(wheelhouse, py)],
                               BUDGETS["install with DALI" if with_dali else "install"], ("pip",)))
    for s in stages:
        absent = [n for n in s.needs if n in missing]
        if absent:
            pips = " ".join(PIP_NAMES.get(n, n) for n in absent)
            s.skip = f"needs {', '.join(absent)}: pip install {pips}, {INSTALL_HINT}"
    data_stage = next(s for s in stages if s.name == "data")
    for s in stages:
        if s.name in ("loader", "e2e") and s.skip is None and data_stage.skip:
            s.skip = f"needs the data stage, which is skipped ({data_stage.skip})"
        if only is not None and s.name not in only and s.name != "install" and s.skip is None:
            s.skip = "not in --only"
    limit = LIMIT_WITH_DALI if dali else LIMIT_WITHOUT_DALI
    last = stages[-1]
    others = sum(s.budget_s for s in stages if s.skip is None and s is not last)
    last.budget_s = min(STEP_COMPILE_MAX_S, limit - others)
    for s in stages:
        s.budget_s = round(s.budget_s * scale, 2)
    return stages


def plan_json(stages: list[Stage]) -> dict:
    return {"stages": [{"name": s.name, "budget_s": s.budget_s, "skip": s.skip} for s in stages],
            "budget_total_s": round(sum(s.budget_s for s in stages if s.skip is None), 2)}


def header(missing: list[str]) -> str:
    """GPU, driver, versions and date: the lines to paste above the figures in BENCHMARKS.md."""
    versions = []
    for name in ("torch", "triton", "nvidia.dali", "webdataset"):
        if name in missing:
            versions.append(f"{name} absent")
            continue
        try:
            module = importlib.import_module(name)
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
        except Exception as e:  # a broken install is reported, not fatal
            versions.append(f"{name} unimportable ({type(e).__name__})")
    gpu = driver = "no GPU visible"
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if q.returncode == 0 and q.stdout.strip():
            name, driver, memory = (x.strip() for x in q.stdout.strip().splitlines()[0].split(",", 2))
            gpu = f"{name} ({memory})"
    except (OSError, subprocess.TimeoutExpired):
        pass
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"GPU: {gpu}; driver {driver}\nPython {platform.python_version()}; {', '.join(versions)}\n"
            f"host: {platform.node()}, {platform.machine()}; date: {date}")


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`, from /proc: what a stage left behind."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # ended while being read
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            pids.append(int(stat.parent.name))
    return pids


def stop_session(sid: int, grace_s: float = STOP_GRACE_S, deadline_s: float = 30.0) -> list[int]:
    """SIGTERM to the stage's process group, SIGKILL to whatever of its session is still there after
    `grace_s`, then wait until none is left; returns the pids that outlived `deadline_s` (none expected)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGTERM)
    t0 = time.monotonic()
    while (left := session_processes(sid)) and time.monotonic() - t0 < grace_s:
        time.sleep(0.1)
    while left and time.monotonic() - t0 < grace_s + deadline_s:
        for pid in left:  # a process that moved to a group of its own is still in the session
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
        left = session_processes(sid)
    return left


def run_stage(s: Stage, log: Path, budget_s: float) -> None:
    """The stage's commands, each in a new session, their output streamed into `log`; past `budget_s` in
    all, the running command's whole session is stopped. Whatever a command leaves running when it ends
    is stopped too."""
    t0 = time.perf_counter()
    ok, timed_out, left, sessions = True, False, [], []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        start = f.tell()
        f.write(f"\n===== {s.name} (budget {budget_s:g} s)\n")
    for cmd in s.commands:
        print(f"== {s.name}: {shlex.join(cmd)}", flush=True)
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            p = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True)
        sessions.append(p.pid)
        try:
            p.wait(timeout=max(0.1, budget_s - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
        left += stop_session(p.pid)
        p.wait()
        ok = not timed_out and p.returncode == 0
        if not ok:
            break
    seconds = round(time.perf_counter() - t0, 1)
    with open(log, "a") as f:
        if timed_out:
            f.write(f"timed out: the stage's budget is {budget_s:g} s; its whole session was stopped\n")
        if left:
            f.write(f"still running after the stop: pids {left}\n")
        f.write(f"===== {s.name}: {'ok' if ok else 'FAILED'} in {seconds} s\n")
    s.result = {"ok": ok, "seconds": seconds, "budget_s": budget_s, "timed_out": timed_out,
                "sessions": sessions, "left_running": left}
    with open(log) as f:
        f.seek(start)
        print(f.read()[-1500:], flush=True)


def _load(out: Path, name: str) -> dict | None:
    try:
        data = json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _rows(out: Path, bench: str, records: tuple[str, ...]) -> list[dict]:
    """The bench's rows: its rows file, appended as they were measured; else the rows of its JSON records
    (a dict of rows, the loader's, becomes a list with names)."""
    from measure.record import read_rows

    if (out / f"{bench}.rows.jsonl").is_file():
        return read_rows(out / f"{bench}.rows.jsonl")
    rows: list[dict] = []
    for name in records:
        found = (_load(out, name) or {}).get("rows", [])
        if isinstance(found, dict):
            found = [{"name": k, **v} for k, v in found.items() if isinstance(v, dict)]
        rows += [r for r in found if isinstance(r, dict)] if isinstance(found, list) else []
    return rows


def _rate(row: dict | None, key: str = "views_per_s") -> float | None:
    value = row.get(key) if isinstance(row, dict) else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def headlines(out: Path, failed: tuple[str, ...] = ()) -> str:
    """One line per benchmark from the rows it wrote, even those of a stage that was killed; a row
    without a figure and a stage that failed say so (it never raises on partial files)."""
    lines = []
    try:
        lines += _test_lines(_rows(out, "gpu-tests", ()), "gpu-tests")
        lines += _test_lines(_rows(out, "dali-tests", ()), "dali-tests")
        lines += _kernel_lines(_rows(out, "kernels", ("kernels.json", "kernels_compile.json")))
        lines += _step_lines(_rows(out, "step", ("step.json", "step_compile.json")))
        lines += _loader_lines(_rows(out, "loader", ("loader.json",)))
        lines += _e2e_lines(_rows(out, "e2e", ("e2e.json",)))
    except Exception as e:  # a format this table does not know: the files are still there
        lines.append(f"  (table incomplete: {type(e).__name__}: {e}; read the files in {out})")
    lines += [f"  {name:<10} FAILED: see gpu_check.log (any rows it finished are above)" for name in failed]
    return "\n".join(lines) or "  (no benchmark wrote a row)"


def _test_lines(rows: list[dict], name: str) -> list[str]:
    if not rows:
        return []
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r.get("outcome"))] = counts.get(str(r.get("outcome")), 0) + 1
    bad = [str(r.get("test")) for r in rows if r.get("outcome") == "failed"]
    return [f"  {name:<10} " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            + (f": {', '.join(bad[:3])}" if bad else "")]


def _kernel_lines(rows: list[dict]) -> list[str]:
    """Per dtype, at the largest size where fused and a reference were both measured (else the largest with
    fused alone): fused against the eager and compiled reference; rows without a figure are named. Read with
    .get only: kernels.bench's row fields may grow (both sides' dtypes, say)."""
    from measure.record import speed

    rows = [r for r in rows if isinstance(r.get("size"), int)]
    lines = []
    for dtype in sorted({r.get("dtype") for r in rows}, key=str):
        mine = [r for r in rows if r.get("dtype") == dtype]
        failed = [f"{r.get('impl')} at 2N={r['size']}" for r in mine if not _rate(r, "ms")]
        timed = {(r["size"], r.get("impl")): _rate(r, "ms") for r in mine if _rate(r, "ms")}
        sizes = [n for n, impl in timed if impl == "fused"]
        line = f"  kernels    {dtype}: "
        if sizes:
            size = max(sizes, key=lambda n: (any(m == n and i != "fused" for m, i in timed), n))
            fused, parts = timed[(size, "fused")], []
            for ref in ("eager", "compiled"):
                if ms := timed.get((size, ref)):
                    parts.append(f"{ref} {ms:.2f} ms (fused {speed(ms / fused)})")
            line += f"2N={size}: fused {fused:.2f} ms" + (f" vs {', '.join(parts)}" if parts else "")
        else:
            line += "fused not measured"
        lines.append(line + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return lines


def _step_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    good = [r for r in rows if _rate(r)]
    bad = [str(r.get("name", "?")) for r in rows if not _rate(r)]
    parts = []
    if good:
        best, base = max(good, key=_rate), rows[0]
        ratio = f" = {_rate(best) / _rate(base):.2f}x {base.get('name')}" if _rate(base) else ""
        parts.append(f"best {best.get('name')}: {_rate(best):.0f} views/s{ratio}")
    if bad:
        parts.append(f"FAILED: {', '.join(bad)}")
    return ["  step       " + "; ".join(parts)]


def _loader_lines(rows: list[dict]) -> list[str]:
    by = {r.get("name"): r for r in rows}  # the last round of a row
    if not by:
        return []
    base = _rate(by.get("baseline"), "samples_per_s")
    parts = []
    for name in ("dali", "dali uint8", "baseline", "lightly"):
        rate = _rate(by.get(name), "samples_per_s")
        if name in by:
            parts.append(f"{name} {rate:.0f}" + (f" ({rate / base:.2f}x)" if base and name != "baseline" else "")
                         if rate else f"{name} FAILED")
    return ["  loader     two-view samples/s: " + ", ".join(parts)]


def _e2e_lines(rows: list[dict]) -> list[str]:
    by = {r.get("name"): r for r in rows}
    if not by:
        return []
    base, eng = _rate(by.get("baseline")), _rate(by.get("engine"))
    if not eng:
        state = "FAILED" if "engine" in by else "not measured"
        return [f"  e2e        engine {state}{'' if base is None else f'; baseline {base:.0f} views/s'}"]
    ratio = f" = {eng / base:.2f}x baseline" if base else " (no baseline figure)"
    h_eng = _rate(by.get("engine"), "projected_hours_50_epochs")
    h_base = _rate(by.get("baseline"), "projected_hours_50_epochs")
    proj = f"; 50 epochs: {h_eng:.2f} h vs {h_base:.2f} h" if h_eng and h_base else ""
    return [f"  e2e        engine {eng:.0f} views/s{ratio}{proj}"]


@entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    from base.cli import OneLineParser, output_file, positive
    from base.files import write_atomic

    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "gpu", help="JSON, rows and the log")
    p.add_argument("--work", type=Path, default=Path("/tmp/faceclr-gpu-check"), help="scratch data")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, budgets, skips) and stop")
    p.add_argument("--json", type=output_file, default=None, help="with --dry-run: also write the plan here")
    p.add_argument("--only", default=None, metavar="STAGE,...",
                   help="run only these stages (a rerun of one that timed out, say); the install stage always runs")
    p.add_argument("--budget-scale", type=positive(float), default=1.0, metavar="F",
                   help="multiply every budget by F (a slower machine; the tests force tiny budgets with it)")
    a = p.parse_args(argv)
    wheelhouse = Path(os.environ["FACECLR_WHEELHOUSE"]) if os.environ.get("FACECLR_WHEELHOUSE") else None
    if wheelhouse is not None and not any(wheelhouse.glob("*.whl")):
        raise UsageError(f"FACECLR_WHEELHOUSE={wheelhouse} holds no wheels (make it with ./launch.sh wheelhouse DIR "
                         "on a machine with network access)")
    missing = missing_packages()
    if "torch" in missing:
        raise UsageError(f"{sys.executable} cannot import torch (run gpu-check with the Python of the node's PyTorch: "
                         "FACECLR_PYTHON=/path/to/python3 ./launch.sh gpu-check)")
    only = [n.strip() for n in a.only.split(",") if n.strip()] if a.only else None
    stages = plan(a.out, a.work, missing, wheelhouse=wheelhouse, scale=a.budget_scale, only=only)
    if unknown := [n for n in only or [] if n not in {s.name for s in stages}]:
        raise UsageError(f"--only: unknown stage(s) {', '.join(unknown)} (stages: {', '.join(s.name for s in stages)})")
    dali = not any(s.name == "loader" and s.skip and "nvidia.dali" in s.skip for s in stages)
    limit = LIMIT_WITH_DALI if dali else LIMIT_WITHOUT_DALI
    the_plan = plan_json(stages)
    the_plan["limit_s"] = limit
    if a.dry_run:
        for s in stages:
            print(f"  {s.name:<16} {s.budget_s:>6g} s  {'skip: ' + s.skip if s.skip else 'runs'}")
            for cmd in [] if s.skip else s.commands:
                print(f"                     $ {shlex.join(cmd)}")
        print(f"  total of the stages that run: {the_plan['budget_total_s']:g} s (limit {limit} s)")
        if not any(s.skip is None and s.name != "install" for s in stages):
            print("  no stage would run: install what the skips name, or bring a wheelhouse")
        if a.json:
            write_atomic(a.json, json.dumps(the_plan, indent=1).encode())
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    for s in stages:  # this run's files only: a stale figure must not stand in for a stage that failed now
        for name in s.outputs:
            (a.out / name).unlink(missing_ok=True)
    log = a.out / "gpu_check.log"
    log.write_text("")
    head = header(missing)
    print(head, flush=True)
    summary: dict = {"header": head, "missing_packages": missing, "plan": the_plan, "stages": {}}
    if any(s.name == "data" and s.skip is None for s in stages):
        shutil.rmtree(a.work, ignore_errors=True)
    slack = 0.0
    for s in stages:
        absent = missing_packages(s.needs)  # the install stage did not bring them
        if s.skip is None and s.name != "install" and absent:
            s.skip = f"needs {', '.join(absent)} (the wheelhouse install did not provide it)"
            slack += s.budget_s
        data = summary["stages"].get("data", {})
        if s.skip is None and s.name in ("loader", "e2e") and data.get("ok") is False:
            s.skip = "needs the data stage's shards, and that stage failed"
            slack += s.budget_s
        if s.skip:
            print(f"== {s.name}: skipped: {s.skip}", flush=True)
            summary["stages"][s.name] = {"ok": None, "skipped": s.skip}
        else:
            budget = s.budget_s
            if s.takes_slack:
                budget = max(budget, min(budget + slack, STEP_COMPILE_MAX_S * a.budget_scale))
            run_stage(s, log, budget)
            slack += s.budget_s - s.result["seconds"]  # net: a stage stopped at its budget overran by its stop
            summary["stages"][s.name] = s.result
        write_atomic(a.out / "summary.json", json.dumps(summary, indent=1).encode())
    failed = tuple(s.name for s in stages if s.result and not s.result["ok"])
    ran = [s for s in stages if s.result and s.name != "install"]
    print("\n== gpu-check summary\n" + head)
    for s in stages:
        r = summary["stages"][s.name]
        state = f"skipped: {s.skip}" if s.skip else ("ok" if r["ok"] else
                                                       "FAILED (timed out)" if r["timed_out"] else "FAILED")
        print(f"  {s.name:<16} {state}  {r.get('seconds', '')}{'s' if 'seconds' in r else ''}")
    print(f"\n== headline figures (rows and JSON in {a.out})")
    print(headlines(a.out, failed))
    if not ran:
        print(f"{PROG}: no stage ran: every one lacks a package (install what the skips name, or {INSTALL_HINT})",
              file=sys.stderr)
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    sys.exit(main())

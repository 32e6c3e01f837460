"""./launch.sh gpu-check: on a GPU machine, the GPU tests and every benchmark, sized for a short loan.

    ./launch.sh gpu-check [--dry-run] [--json PLAN] [--out DIR] [--work DIR]
    FACECLR_WHEELHOUSE=DIR ./launch.sh gpu-check      # first installs from a wheelhouse, offline

Uses the machine's own Python (no venv, no network). Each stage runs in a subprocess with its own time
budget, so one slow or failing stage cannot take the others down; a stage that needs a missing package is
skipped with one line naming it. The budgets of the stages that run add up to at most 360 s without DALI
and 540 s with it (a debug allocation of 15 minutes, 10 per command). Each stage's JSON is in --out as soon
as it finishes, with summary.json rewritten after every stage; the closing table marks failed rows.
Exit code 0 when every stage that ran passed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from base.errors import UsageError, entry_point

ROOT = Path(__file__).resolve().parents[2]
PROG = "./launch.sh gpu-check"
LIMIT_WITHOUT_DALI, LIMIT_WITH_DALI = 360, 540

PACKAGES = ("torch", "torchvision", "triton", "accelerate", "numpy", "scipy", "PIL", "safetensors", "tqdm",
            "matplotlib", "pytest", "nvidia.dali", "webdataset")
"""What the stages import; a GPU machine's own Python may lack some (its DALI-free torch install, say)."""
PIP_NAMES = {"nvidia.dali": "nvidia-dali-cuda130", "PIL": "pillow"}
INSTALL_HINT = "or bring a wheelhouse: FACECLR_WHEELHOUSE=DIR ./launch.sh gpu-check (README: air-gapped clusters)"

STEP_ROWS = "fp32 NCHW eager,bf16 NHWC eager,bf16 NHWC compile"
"""Compiled once: the row training runs on a GPU by default."""


def missing_packages(names: tuple[str, ...] = PACKAGES) -> list[str]:
    """Names that this Python cannot import, found without importing them."""
    missing = []
    for name in names:
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
    budget_s: int
    needs: tuple[str, ...] = ()
    json: str | None = None
    """The file (in --out) the stage's benchmark writes."""
    skip: str | None = None
    result: dict = field(default_factory=dict)


def wheels_in(wheelhouse: Path | None, names: list[str]) -> list[str]:
    """The import names among `names` whose wheel lies in the wheelhouse."""
    if wheelhouse is None or not wheelhouse.is_dir():
        return []
    files = {f.name.lower() for f in wheelhouse.glob("*.whl")}
    found = []
    for name in names:
        prefix = PIP_NAMES.get(name, name).lower().replace("-", "_") + "-"
        if any(f.startswith(prefix) for f in files):
            found.append(name)
    return found


def plan(out: Path, work: Path, missing: list[str], py: str = sys.executable,
         wheelhouse: Path | None = None) -> list[Stage]:
    """The stages, their budgets and what they need; without DALI the loader stage is skipped and the
    end-to-end stage times the torch loader only, with a smaller budget. With a wheelhouse, a first stage
    installs from it, and what it holds counts as present."""
    from engine.bench.wheelhouse import install_command

    missing = [m for m in missing if m not in wheels_in(wheelhouse, missing)]
    dali = "nvidia.dali" not in missing
    data = work / "shards"
    e2e_rows = "baseline,+ DALI loader,engine" if dali else "baseline,engine"
    stages = [
        # the kernel variants training launches by default (d = 128, bf16 and fp32); kernels.compile_check
        # proves on a CPU that every other variant fits, so the GPU compiles only these
        Stage("gpu tests", [[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu and default_variant",
                             "tests/test_ntxent.py"],
                            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_data.py"]],
              70, ("pytest", "triton")),
        Stage("kernels", [[py, "-m", "kernels.bench", "--sizes", "512,4096,16384,65536", "--json",
                           str(out / "kernels.json")]], 70, ("triton",),
              "kernels.json"),
        Stage("step", [[py, "-m", "engine.bench", "step", "--steps", "10", "--rows", STEP_ROWS, "--json",
                        str(out / "step.json")]], 90, ("accelerate", "safetensors", "tqdm"), "step.json"),
        Stage("data", [[py, "-m", "pack.synth", "--out", str(work / "raw"), "--identities", "200", "--no-progress"],
                       [py, "-m", "pack", "--src", str(work / "raw" / "imdb_crop"), "--out", str(data),
                        "--min-images", "5", "--shard-samples", "500", "--no-progress"]], 45, ("scipy", "PIL")),
        Stage("loader", [[py, "-m", "engine.bench", "loader", "--data", str(data), "--steps", "20", "--json",
                          str(out / "loader.json")]], 60, ("nvidia.dali", "webdataset"), "loader.json"),
        Stage("e2e", [[py, "-m", "engine.bench", "e2e", "--data", str(data), "--steps", "8", "--batch-size", "128",
                       "--rows", e2e_rows, "--json", str(out / "e2e.json")]], 120 if dali else 85,
              ("webdataset", "accelerate", "safetensors", "tqdm"), "e2e.json"),
    ]
    if wheelhouse is not None:
        stages.insert(0, Stage("install", [install_command(wheelhouse, py)], 60))
    for s in stages:
        absent = [n for n in s.needs if n in missing]
        if absent:
            pips = " ".join(PIP_NAMES.get(n, n) for n in absent)
            s.skip = f"needs {', '.join(absent)}: pip install {pips}, {INSTALL_HINT}"
    data_stage = next(s for s in stages if s.name == "data")
    for s in stages:
        if s.name in ("loader", "e2e") and s.skip is None and data_stage.skip:
            s.skip = f"needs the data stage, which is skipped ({data_stage.skip})"
    return stages


def plan_json(stages: list[Stage]) -> dict:
    return {"stages": [{"name": s.name, "budget_s": s.budget_s, "skip": s.skip} for s in stages],
            "budget_total_s": sum(s.budget_s for s in stages if s.skip is None)}


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
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"GPU: {gpu}; driver {driver}\nPython {platform.python_version()}; {', '.join(versions)}\n"
            f"host: {platform.node()}, {platform.machine()}; date: {date}")


def run_stage(s: Stage, log: Path) -> None:
    t0 = time.perf_counter()
    ok, tail = True, ""
    for cmd in s.commands:
        left = s.budget_s - (time.perf_counter() - t0)
        print(f"== {s.name}: {shlex.join(cmd)}", flush=True)
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, left))
            ok, tail = r.returncode == 0, tail + r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            ok, tail = False, tail + out + f"\ntimed out: the stage's budget is {s.budget_s} s\n"
        if not ok:
            break
    s.result = {"ok": ok, "seconds": round(time.perf_counter() - t0, 1)}
    with open(log, "a") as f:
        f.write(f"\n===== {s.name} (ok={ok})\n{tail}\n")
    print(tail[-1500:], flush=True)


def _load(out: Path, name: str) -> dict | None:
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


def _rate(row: dict | None, key: str = "views_per_s") -> float | None:
    value = row.get(key) if isinstance(row, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def headlines(out: Path, failed: tuple[str, ...] = ()) -> str:
    """One line per benchmark from the JSON files it wrote; a stage that failed, or a row without a figure,
    says so instead of a number (it never raises on partial JSON)."""
    lines = []
    try:
        lines += _kernel_lines(_load(out, "kernels.json"), "kernels" in failed)
        lines += _step_lines(_load(out, "step.json"), "step" in failed)
        lines += _loader_lines(_load(out, "loader.json"), "loader" in failed)
        lines += _e2e_lines(_load(out, "e2e.json"), "e2e" in failed)
    except Exception as e:  # a format this table does not know: the JSON files are still there
        lines.append(f"  (table incomplete: {type(e).__name__}: {e}; read the JSON files in {out})")
    return "\n".join(lines) or "  (no benchmark wrote its JSON)"


def _kernel_lines(k: dict | None, failed: bool) -> list[str]:
    if not k:
        return ["  kernels  FAILED (no JSON)"] if failed else []
    rows = [r for r in k.get("rows", []) if isinstance(r, dict) and "size" in r]
    if not rows:
        return ["  kernels  FAILED (no rows)"]
    size = max(r["size"] for r in rows)
    lines = []
    for dtype in sorted({r.get("dtype") for r in rows if r["size"] == size}, key=str):
        by = {r.get("impl"): r for r in rows if r["size"] == size and r.get("dtype") == dtype}
        fused, eager = _rate(by.get("fused"), "ms"), _rate(by.get("eager"), "ms")
        if fused and eager:
            lines.append(f"  kernels  2N={size} {dtype}: fused {fused:.2f} ms vs eager {eager:.2f} ms = "
                         f"{eager / fused:.2f}x, memory {by['fused'].get('peak_mem_mb', float('nan')):.0f} / "
                         f"{by['eager'].get('peak_mem_mb', float('nan')):.0f} MB")
        else:
            lines.append(f"  kernels  2N={size} {dtype}: FAILED (fused {fused}, eager {eager})")
    return lines


def _step_lines(st: dict | None, failed: bool) -> list[str]:
    if not st:
        return ["  step     FAILED (no JSON)"] if failed else []
    rows = [r for r in st.get("rows", []) if isinstance(r, dict)]
    good = [r for r in rows if _rate(r)]
    bad = [r.get("name", "?") for r in rows if not _rate(r)]
    line = "  step     "
    if good:
        best, base = max(good, key=_rate), rows[0]
        ratio = f" = {_rate(best) / _rate(base):.2f}x {base.get('name')}" if _rate(base) else ""
        line += f"best {best.get('name')}: {_rate(best):.0f} views/s{ratio}"
    line += f"{'; ' if good else ''}FAILED: {', '.join(bad)}" if bad else ""
    return [line if good or bad else "  step     FAILED (no rows)"]


def _loader_lines(ld: dict | None, failed: bool) -> list[str]:
    if not ld:
        return ["  loader   FAILED (no JSON)"] if failed else []
    rows = ld.get("rows", {})
    base = _rate(rows.get("baseline"), "samples_per_s")
    parts = []
    for name in ("dali", "dali uint8", "baseline", "lightly"):
        rate = _rate(rows.get(name), "samples_per_s")
        if name in rows:
            parts.append(f"{name} {rate:.0f}" + (f" ({rate / base:.2f}x)" if base and name != "baseline" else "")
                         if rate else f"{name} FAILED")
    return ["  loader   two-view samples/s: " + ", ".join(parts)] if parts else ["  loader   FAILED (no rows)"]


def _e2e_lines(e: dict | None, failed: bool) -> list[str]:
    if not e:
        return ["  e2e      FAILED (no JSON)"] if failed else []
    rows = {r.get("name"): r for r in e.get("rows", []) if isinstance(r, dict)}
    base, eng = _rate(rows.get("baseline")), _rate(rows.get("engine"))
    if not eng:
        return [f"  e2e      engine FAILED{'' if base is None else f'; baseline {base:.0f} views/s'}"]
    ratio = f" = {eng / base:.2f}x baseline" if base else " (baseline FAILED)"
    h_eng = _rate(rows.get("engine"), "projected_hours_50_epochs")
    h_base = _rate(rows.get("baseline"), "projected_hours_50_epochs")
    proj = f"; 50 epochs: {h_eng:.2f} h vs {h_base:.2f} h" if h_eng and h_base else ""
    return [f"  e2e      engine {eng:.0f} views/s{ratio}{proj}"]


@entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    from base.cli import OneLineParser

    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "gpu", help="JSON and the log")
    p.add_argument("--work", type=Path, default=Path("/tmp/faceclr-gpu-check"), help="scratch data")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, budgets, skips) and stop")
    p.add_argument("--json", type=Path, default=None, help="with --dry-run: also write the plan here")
    a = p.parse_args(argv)
    wheelhouse = Path(os.environ["FACECLR_WHEELHOUSE"]) if os.environ.get("FACECLR_WHEELHOUSE") else None
    if wheelhouse is not None and not any(wheelhouse.glob("*.whl")):
        raise UsageError(f"FACECLR_WHEELHOUSE={wheelhouse} holds no wheels (make it with ./launch.sh wheelhouse DIR "
                         "on a machine with network access)")
    missing = missing_packages()
    stages = plan(a.out, a.work, missing, wheelhouse=wheelhouse)
    dali = not any(s.name == "loader" and s.skip for s in stages)
    limit = LIMIT_WITH_DALI if dali else LIMIT_WITHOUT_DALI
    the_plan = plan_json(stages)
    the_plan["limit_s"] = limit
    if a.dry_run:
        for s in stages:
            print(f"  {s.name:<10} {s.budget_s:>4} s  {'skip: ' + s.skip if s.skip else 'runs'}")
            for cmd in [] if s.skip else s.commands:
                print(f"               $ {shlex.join(cmd)}")
        print(f"  total of the stages that run: {the_plan['budget_total_s']} s (limit {limit} s)")
        if a.json:
            a.json.write_text(json.dumps(the_plan, indent=1))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    log = a.out / "gpu_check.log"
    log.write_text("")
    head = header(missing)
    print(head, flush=True)
    summary: dict = {"header": head, "missing_packages": missing, "plan": the_plan, "stages": {}}
    shutil.rmtree(a.work, ignore_errors=True)
    for s in stages:
        absent = missing_packages(s.needs)  # the install stage did not bring them
        if s.skip is None and s.name != "install" and absent:
            s.skip = f"needs {', '.join(absent)} (the wheelhouse install did not provide it)"
        if s.skip:
            print(f"== {s.name}: skipped: {s.skip}", flush=True)
            summary["stages"][s.name] = {"ok": None, "skipped": s.skip}
        else:
            run_stage(s, log)
            summary["stages"][s.name] = s.result
        (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    failed = tuple(s.name for s in stages if s.result and not s.result["ok"])
    print("\n== gpu-check summary\n" + head)
    for s in stages:
        r = summary["stages"][s.name]
        state = f"skipped: {s.skip}" if s.skip else ("ok" if r["ok"] else "FAILED")
        print(f"  {s.name:<10} {state}  {r.get('seconds', '')}{'s' if 'seconds' in r else ''}")
    print(f"\n== headline figures (full JSON in {a.out})")
    print(headlines(a.out, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""./launch.sh gpu-check: on a GPU machine, the GPU tests and every benchmark at full size, within ~8 minutes.

Uses the machine's own Python and packages (no venv, no network). Each stage runs in a subprocess with its
own time limit, so one slow or failing stage cannot take the others down; without DALI the DALI stages are
reported as skipped. Full JSON lands in --out; a short table is printed last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def stage(name: str, cmd: list[str], limit: int, results: dict, log: Path) -> bool:
    t0 = time.perf_counter()
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        ok, tail = r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        ok, tail = False, f"timed out after {limit}s\n{(e.stdout or b'')[-2000:]!r}"
    results[name] = {"ok": ok, "seconds": round(time.perf_counter() - t0, 1)}
    with open(log, "a") as f:
        f.write(f"\n===== {name} (ok={ok})\n{tail}\n")
    print(tail[-1500:], flush=True)
    return ok


PACKAGES = ("torch", "torchvision", "triton", "accelerate", "numpy", "scipy", "PIL", "safetensors", "tqdm",
            "matplotlib", "pytest", "nvidia.dali", "webdataset")
"""What the stages import; a GPU machine's own Python may lack some (its DALI-free torch install, say)."""


def missing_packages(names: tuple[str, ...] = PACKAGES) -> list[str]:
    """Names that this Python cannot import, found without importing them."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a dotted name whose parent package is absent
            found = False
        if not found:
            missing.append(name)
    return missing


def headlines(out: Path) -> str:
    """One line per benchmark from the JSON files it wrote: the figures the issues' targets name."""
    lines = []

    def load(name: str) -> dict | None:
        f = out / f"{name}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    if k := load("kernels"):
        rows = k["rows"]
        size = max(r["size"] for r in rows)
        for dtype in sorted({r["dtype"] for r in rows if r["size"] == size}):
            by = {r["impl"]: r for r in rows if r["size"] == size and r["dtype"] == dtype}
            if "fused" in by and "eager" in by:
                lines.append(f"  kernels  2N={size} {dtype}: fused {by['fused']['ms']:.2f} ms vs eager "
                             f"{by['eager']['ms']:.2f} ms = {by['eager']['ms'] / by['fused']['ms']:.2f}x, memory "
                             f"{by['fused']['peak_mem_mb']:.0f} / {by['eager']['peak_mem_mb']:.0f} MB")
    if st := load("step"):
        best = max(st["rows"], key=lambda r: r["views_per_s"])
        base = st["rows"][0]
        lines.append(f"  step     best {best['name']}: {best['views_per_s']:.0f} views/s = "
                     f"{best['views_per_s'] / base['views_per_s']:.2f}x {base['name']}")
    if ld := load("loader"):
        lines.append(f"  loader   DALI {ld['dali']['samples_per_s']:.0f} two-view samples/s = {ld['ratio']:.2f}x "
                     f"the PIL/torchvision baseline")
    if e := load("e2e"):
        rows = {r["name"]: r for r in e["rows"]}
        eng, hours = rows.get("engine"), e.get("projected_hours_50_epochs", {})
        nan = float("nan")
        if eng:
            lines.append(f"  e2e      engine {eng['views_per_s']:.0f} views/s = {eng['speedup']:.2f}x baseline; "
                         f"50 epochs: {hours.get('engine', nan):.2f} h vs {hours.get('baseline', nan):.2f} h")
    return "\n".join(lines) or "  (no benchmark wrote its JSON)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench.gpu_check")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "gpu")
    p.add_argument("--work", type=Path, default=Path("/tmp/faceclr-gpu-check"))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    log = a.out / "gpu_check.log"
    log.write_text("")
    py = sys.executable
    missing = missing_packages()
    dali = "nvidia.dali" not in missing
    results: dict = {"dali_installed": dali, "missing_packages": missing}
    print(f"== python {sys.version.split()[0]}; missing: {', '.join(missing) or 'nothing'}", flush=True)
    if "pytest" in missing:
        results["gpu tests"] = {"ok": False, "skipped": "pytest is not installed"}
    else:
        stage("gpu tests", [py, "-m", "pytest", "-q", "-m", "gpu", "tests/test_ntxent.py", "tests/test_data.py"],
              150, results, log)
    stage("kernels.bench", [py, "-m", "kernels.bench", "--json", str(a.out / "kernels.json")], 120, results, log)
    stage("engine.bench step", [py, "-m", "engine.bench", "step", "--steps", "10", "--json",
                                str(a.out / "step.json")], 200, results, log)
    data = a.work / "shards"
    if dali:
        shutil.rmtree(a.work, ignore_errors=True)
        made = stage("synth + pack", [py, "-m", "pack.synth", "--out", str(a.work / "raw"), "--identities", "200",
                                      "--no-progress"], 60, results, log) and \
            stage("pack", [py, "-m", "pack", "--src", str(a.work / "raw" / "imdb_crop"), "--out", str(data),
                           "--min-images", "5", "--no-progress"], 60, results, log)
        if made:
            stage("engine.bench loader", [py, "-m", "engine.bench", "loader", "--data", str(data), "--steps", "20",
                                          "--json", str(a.out / "loader.json")], 90, results, log)
            stage("engine.bench e2e", [py, "-m", "engine.bench", "e2e", "--data", str(data), "--steps", "8",
                                       "--batch-size", "128", "--json", str(a.out / "e2e.json")], 240, results, log)
    else:
        results["dali stages"] = {"ok": False, "skipped": "DALI is not installed: loader and e2e benches skipped"}
    (a.out / "summary.json").write_text(json.dumps(results, indent=1))
    print("\n== gpu-check summary")
    for name, r in results.items():
        if isinstance(r, dict):
            print(f"  {name:<22} {'ok' if r.get('ok') else r.get('skipped', 'FAILED')}  {r.get('seconds', '')}s")
    print("\n== headline figures (full JSON in " + str(a.out) + ")")
    print(headlines(a.out))
    return 0 if all(r.get("ok") for r in results.values() if isinstance(r, dict) and "skipped" not in r) else 1


if __name__ == "__main__":
    sys.exit(main())

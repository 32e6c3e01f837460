"""./launch.sh gpu-check and ./launch.sh wheelhouse, on the CPU: the plan and its budgets with packages
hidden, the closing table with failed rows, the exit code, and the wheelhouse's commands (nothing is
downloaded or installed here)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from engine.bench import gpu_check
from engine.bench.gpu_check import LIMIT_WITH_DALI, LIMIT_WITHOUT_DALI, PACKAGES, Stage, headlines, missing_packages

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = '''
import importlib.abc, sys

class _Hide(importlib.abc.MetaPathFinder):
    """Makes {names} unimportable, as on a GPU node that lacks them."""
    def find_spec(self, name, path=None, target=None):
        if any(name == n or name.startswith(n + ".") for n in {names!r}):
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None

sys.meta_path.insert(0, _Hide())
'''


def launch(*args: str, hide: tuple[str, ...] = (), tmp: Path | None = None, **env: str
           ) -> subprocess.CompletedProcess:
    environ = {**os.environ, "FACECLR_PYTHON": sys.executable, **env}
    if hide:
        site = tmp / "hide"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(BLOCKER.format(names=list(hide)))
        environ["PYTHONPATH"] = f"{site}:{environ.get('PYTHONPATH', '')}"
    return subprocess.run([str(ROOT / "launch.sh"), *args], capture_output=True, text=True, cwd=ROOT, env=environ,
                          timeout=120)


def test_dry_run_without_dali_and_webdataset_skips_their_stages_within_360_s(tmp_path: Path) -> None:
    r = launch("gpu-check", "--dry-run", "--json", str(tmp_path / "plan.json"), hide=("nvidia.dali", "webdataset"),
               tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    stages = {s["name"]: s for s in plan["stages"]}
    assert set(stages) == {"gpu tests", "kernels", "step", "data", "loader", "e2e"}
    assert "nvidia.dali" in stages["loader"]["skip"] and "pip install nvidia-dali-cuda130" in stages["loader"]["skip"]
    assert "webdataset" in stages["e2e"]["skip"] and "FACECLR_WHEELHOUSE" in stages["e2e"]["skip"]
    for name in ("gpu tests", "kernels", "step", "data"):
        assert stages[name]["skip"] is None, name
    total = sum(s["budget_s"] for s in plan["stages"] if s["skip"] is None)
    assert total == plan["budget_total_s"] <= LIMIT_WITHOUT_DALI == 360
    assert "skip: needs nvidia.dali" in r.stdout


def test_dry_run_with_everything_importable_runs_every_stage_within_540_s(tmp_path: Path) -> None:
    r = launch("gpu-check", "--dry-run", "--json", str(tmp_path / "plan.json"))
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert all(s["skip"] is None for s in plan["stages"]), plan
    assert plan["budget_total_s"] <= LIMIT_WITH_DALI == 540 and plan["limit_s"] == 540


def test_dry_run_with_a_wheelhouse_installs_first_and_counts_its_packages(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl", "webdataset-1.0.2-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    r = launch("gpu-check", "--dry-run", "--json", str(tmp_path / "plan.json"), hide=("nvidia.dali", "webdataset"),
               tmp=tmp_path, FACECLR_WHEELHOUSE=str(wheels))
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["stages"][0]["name"] == "install" and all(s["skip"] is None for s in plan["stages"]), plan
    assert plan["budget_total_s"] <= LIMIT_WITH_DALI
    assert f"-m pip install --no-index --find-links {wheels} nvidia-dali-cuda130 'webdataset>=" in r.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    r = launch("gpu-check", "--dry-run", FACECLR_WHEELHOUSE=str(empty))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "holds no wheels" in r.stderr


def test_wheelhouse_commands_fetch_binary_wheels_for_the_node_python_and_leave_torch_alone(tmp_path: Path) -> None:
    target = tmp_path / "W"
    r = launch("wheelhouse", str(target), "--python", "3.12", "--dry-run")
    assert r.returncode == 0, r.stderr
    commands = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and not target.exists(), "printed, not run"
    for cmd in commands:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in cmd
        assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("--dest") + 1] == str(target)
    names = {c.split(">")[0].split("=")[0] for c in commands[0][8:]}
    assert {"nvidia-dali-cuda130", "webdataset", "safetensors", "tqdm", "pytest", "setuptools"} <= names
    assert not names & {"torch", "torchvision", "triton", "accelerate"}
    assert "--no-deps" in commands[1] and commands[1][-1].startswith("accelerate")
    assert f"FACECLR_WHEELHOUSE={target} ./launch.sh gpu-check" in r.stdout
    bad = launch("wheelhouse", str(target), "--python", "twelve", "--dry-run")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_closing_table_reads_every_bench_json_and_marks_failed_rows(tmp_path: Path) -> None:
    """Built from JSON files in the benches' own formats (the CPU runs in bench_results/), then from
    partial ones: a failed row is named, never a crash."""
    assert "no benchmark" in headlines(tmp_path)
    for name in ("kernels", "e2e", "loader"):
        (tmp_path / f"{name}.json").write_text((ROOT / "bench_results" / f"{name}_cpu.json").read_text())
    (tmp_path / "step.json").write_text(json.dumps({"rows": [
        {"name": "fp32 NCHW eager", "views_per_s": 100.0}, {"name": "bf16 NHWC compile", "views_per_s": 250.0}]}))
    table = headlines(tmp_path)
    kernels = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    big = {r["impl"]: r for r in kernels if r["size"] == 16384 and r["dtype"] == "float32"}
    assert f"= {big['eager']['ms'] / big['fused']['ms']:.2f}x" in table
    assert "best bf16 NHWC compile: 250 views/s = 2.50x fp32 NCHW eager" in table
    loader = json.loads((tmp_path / "loader.json").read_text())["rows"]
    assert f"baseline {loader['baseline']['samples_per_s']:.0f}" in table and "FAILED" not in table
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    engine = next(r for r in e2e["rows"] if r["name"] == "engine")
    assert f"= {engine['views_per_s'] / e2e['rows'][0]['views_per_s']:.2f}x baseline" in table

    (tmp_path / "step.json").write_text(json.dumps({"rows": [
        {"name": "fp32 NCHW eager", "views_per_s": 100.0}, {"name": "bf16 NHWC compile", "views_per_s": None}]}))
    (tmp_path / "e2e.json").write_text(json.dumps({"rows": [{"name": "baseline", "views_per_s": 50.0},
                                                            {"name": "engine", "views_per_s": None}],
                                                   "projected_hours_50_epochs": {"baseline": 1.0, "engine": None}}))
    (tmp_path / "loader.json").write_text(json.dumps({"rows": {"dali": {"samples_per_s": None},
                                                               "baseline": {"samples_per_s": 20.0}}}))
    (tmp_path / "kernels.json").unlink()
    table = headlines(tmp_path, failed=("kernels",))
    assert "kernels  FAILED" in table and "FAILED: bf16 NHWC compile" in table
    assert "engine FAILED; baseline 50 views/s" in table and "dali FAILED" in table
    (tmp_path / "e2e.json").write_text("{not json")
    assert "e2e      FAILED" in headlines(tmp_path, failed=("e2e",))


def test_exit_code_and_summary_after_each_stage(tmp_path: Path, monkeypatch, capsys) -> None:
    py = sys.executable
    stages = [Stage("passes", [[py, "-c", "print('fine')"]], 30),
              Stage("fails", [[py, "-c", "import sys; sys.exit(3)"]], 30),
              Stage("too slow", [[py, "-c", "import time; time.sleep(30)"]], 2),
              Stage("skipped", [[py, "-c", "pass"]], 30, skip="needs nothing_here: pip install nothing_here")]
    monkeypatch.setattr(gpu_check, "plan", lambda *a, **k: stages)
    monkeypatch.setattr(gpu_check, "header", lambda missing: "GPU: test double")
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["passes"]["ok"] is True and summary["stages"]["fails"]["ok"] is False
    assert summary["stages"]["too slow"]["ok"] is False and summary["stages"]["skipped"]["ok"] is None
    out = capsys.readouterr().out
    assert "fails      FAILED" in out and "skipped: needs nothing_here" in out
    assert "timed out: the stage's budget is 2 s" in (tmp_path / "out" / "gpu_check.log").read_text()
    monkeypatch.setattr(gpu_check, "plan", lambda *a, **k: [stages[0], stages[3]])
    assert gpu_check.main(["--out", str(tmp_path / "out2"), "--work", str(tmp_path / "work")]) == 0


def test_missing_packages_are_found_without_importing_them() -> None:
    assert missing_packages() == []  # this venv has everything the stages import
    assert missing_packages(("json", "no_such_package_xyz", "no_such_parent.child")) == [
        "no_such_package_xyz", "no_such_parent.child"]
    assert "nvidia.dali" in PACKAGES and "webdataset" in PACKAGES and "pytest" in PACKAGES


@pytest.mark.slow
def test_gpu_stage_data_tests_collect_and_skip_cleanly_without_dali(tmp_path: Path) -> None:
    """The gpu stage's data tests on a Python without DALI: collected and skipped, not an error."""
    site = tmp_path / "hide"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(names=["nvidia.dali"]))
    env = {**os.environ, "PYTHONPATH": f"{site}:{ROOT}"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        "tests/test_data.py"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode in (0, 5), r.stdout[-2000:]
    assert "error" not in r.stdout.lower().split("short test summary")[0][-200:], r.stdout[-2000:]
    assert "skipped" in r.stdout, r.stdout[-2000:]

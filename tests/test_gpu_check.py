"""./launch.sh gpu-check and ./launch.sh wheelhouse, on the CPU: the plan and its budgets with packages
hidden, what each stage needs (derived by hiding packages), an overrunning stage stopped with every process
it started, rows kept from a bench that was killed, the closing table, the exit code, and the wheelhouse's
commands (nothing is downloaded or installed here)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.bench import gpu_check
from engine.bench.gpu_check import (
    LIMIT_WITH_DALI,
    LIMIT_WITHOUT_DALI,
    PACKAGES,
    Stage,
    headlines,
    missing_packages,
    plan,
    session_processes,
)
from measure.record import read_rows, speed

from .cli import one_line_error
from .harness import wait_for

ROOT = Path(__file__).resolve().parents[1]

HIDE = '''
import sys

class _Hide:
    """Wraps each import finder so that {names} are not found, as on a GPU node that lacks them:
    an import raises ModuleNotFoundError and importlib.util.find_spec returns None."""
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if any(name == n or name.startswith(n + ".") for n in {names!r}):
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self.inner, attr)

sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
'''

CANDIDATES = (*PACKAGES, "matplotlib", "tensorboard")
"""What a node may lack: every package some stage needs, and two that none should."""


def hiding(tmp: Path, names: tuple[str, ...] | list[str]) -> dict:
    """The environment of a Python that cannot import `names` (a sitecustomize on PYTHONPATH)."""
    site = tmp / f"hide-{abs(hash(tuple(names)))}"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(HIDE.format(names=list(names)))
    return {**os.environ, "PYTHONPATH": f"{site}:{ROOT}"}


def all_but(*keep: str) -> tuple[str, ...]:
    return tuple(n for n in CANDIDATES if n not in keep)


def launch(*args: str, hide: tuple[str, ...] = (), tmp: Path | None = None, **env: str
           ) -> subprocess.CompletedProcess:
    environ = {**(hiding(tmp, hide) if hide else os.environ), "FACECLR_PYTHON": sys.executable, **env}
    return subprocess.run([str(ROOT / "launch.sh"), *args], capture_output=True, text=True, cwd=ROOT, env=environ,
                          timeout=180)


def dry_plan(tmp: Path, *hide: str, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    r = launch("gpu-check", "--dry-run", "--json", str(tmp / "plan.json"), hide=hide, tmp=tmp, **env)
    assert r.returncode == 0, r.stderr
    return r, json.loads((tmp / "plan.json").read_text())


EAGER = ("gpu-tests", "kernels", "step", "data", "dali-tests", "loader", "e2e")
COMPILED = ("kernels-compile", "step-compile")


def test_dry_run_with_only_torch_and_triton_plans_the_kernel_stages_and_exits_0(tmp_path: Path) -> None:
    r, the_plan = dry_plan(tmp_path, *all_but("torch", "triton"))
    stages = {s["name"]: s for s in the_plan["stages"]}
    assert [s["name"] for s in the_plan["stages"]] == [*EAGER, *COMPILED], "eager stages first, compiles last"
    assert {n for n, s in stages.items() if s["skip"] is None} == {"kernels", "kernels-compile"}
    assert "needs pytest: pip install pytest" in stages["gpu-tests"]["skip"]
    assert "needs numpy, scipy, PIL, tqdm: pip install numpy scipy pillow tqdm" in stages["data"]["skip"]
    assert "accelerate" in stages["step-compile"]["skip"] and "FACECLR_WHEELHOUSE" in stages["step"]["skip"]
    assert the_plan["budget_total_s"] <= the_plan["limit_s"] == LIMIT_WITHOUT_DALI
    assert "Traceback" not in r.stderr and "skip: needs pytest" in r.stdout


def test_dry_run_without_dali_runs_everything_else_within_360_s(tmp_path: Path) -> None:
    r, the_plan = dry_plan(tmp_path, "nvidia.dali")
    stages = {s["name"]: s for s in the_plan["stages"]}
    for name in ("dali-tests", "loader"):
        assert "nvidia.dali" in stages[name]["skip"] and "pip install nvidia-dali-cuda130" in stages[name]["skip"]
    assert all(s["skip"] is None for n, s in stages.items() if n not in ("dali-tests", "loader"))
    assert the_plan["budget_total_s"] == LIMIT_WITHOUT_DALI == the_plan["limit_s"] == 360
    assert stages["step-compile"]["budget_s"] >= 55
    assert "--rows baseline,engine " in r.stdout and "--no-compile" in r.stdout


def test_dry_run_with_everything_importable_runs_every_stage_within_540_s(tmp_path: Path) -> None:
    _, the_plan = dry_plan(tmp_path)
    assert all(s["skip"] is None for s in the_plan["stages"]), the_plan
    assert the_plan["budget_total_s"] <= LIMIT_WITH_DALI == the_plan["limit_s"] == 540


def _wheels(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / f"{name}-1.0-py3-none-any.whl").write_bytes(b"")
    return folder


WITHOUT_DALI = ("webdataset", "accelerate", "numpy", "scipy", "pillow", "tqdm", "tensorboard", "matplotlib",
                "safetensors", "pytest", "setuptools", "wheel")


def test_budgets_fit_the_limits_and_leave_the_compile_its_share_in_every_configuration(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    houses = {"no wheelhouse": None, "without DALI": _wheels(tmp_path / "w1", *WITHOUT_DALI),
              "with DALI": _wheels(tmp_path / "w2", *WITHOUT_DALI, "nvidia_dali_cuda130")}
    for label, house in houses.items():
        for missing in ([], ["nvidia.dali"]):
            stages = plan(out, work, missing, wheelhouse=house)
            dali = "nvidia.dali" not in missing or label == "with DALI"
            run = [s for s in stages if s.skip is None]
            assert sum(s.budget_s for s in run) <= (LIMIT_WITH_DALI if dali else LIMIT_WITHOUT_DALI), label
            assert run[-1].name == "step-compile" and 55 <= run[-1].budget_s <= gpu_check.STEP_COMPILE_MAX_S
            assert [s.name for s in run][:1] == (["install"] if house else ["gpu-tests"]), label
    alone = {s.name: s for s in plan(out, work, [], only=["step-compile"])}
    assert alone["step-compile"].budget_s == gpu_check.STEP_COMPILE_MAX_S and alone["step-compile"].skip is None
    assert all(s.skip for n, s in alone.items() if n != "step-compile") and alone["step"].skip == "not in --only"
    scaled = plan(out, work, [], scale=0.01)
    assert [s.budget_s for s in scaled] == [round(s.budget_s * 0.01, 2) for s in plan(out, work, [])]


def test_dry_run_with_a_wheelhouse_installs_first_and_counts_what_it_holds(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl", "webdataset-1.0.2-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    r, the_plan = dry_plan(tmp_path, "nvidia.dali", "webdataset", FACECLR_WHEELHOUSE=str(wheels))
    assert the_plan["stages"][0]["name"] == "install" and all(s["skip"] is None for s in the_plan["stages"])
    assert the_plan["budget_total_s"] <= LIMIT_WITH_DALI
    assert f"-m pip install --no-index --find-links {wheels} nvidia-dali-cuda130 'webdataset>=0.2.100'\n" in r.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    r = launch("gpu-check", "--dry-run", FACECLR_WHEELHOUSE=str(empty))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "holds no wheels" in r.stderr


def test_bad_options_are_one_line_and_exit_2() -> None:
    for args, words in ((["--only", "step,nonsense"], "unknown stage(s) nonsense"),
                        (["--budget-scale", "0"], "must be positive"), (["--budget-scale", "x"], "not a number"),
                        (["--json", "/nonexistent-folder/plan.json"], "no such folder /nonexistent-folder")):
        r = launch("gpu-check", "--dry-run", *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr


def _command_modules(cmd: list[str]) -> set[str]:
    """The modules a stage's command imports first: `-m X` (X.__main__ for a package) and pytest's files."""
    import importlib.util

    module = cmd[cmd.index("-m") + 1]
    if importlib.util.find_spec(module).submodule_search_locations is not None:  # a package: -m runs __main__
        module += ".__main__"
    return {module} | {"tests." + Path(c).stem for c in cmd if c.startswith("tests/") and c.endswith(".py")}


def test_each_stage_declares_the_modules_its_commands_import(tmp_path: Path) -> None:
    for s in plan(tmp_path / "out", tmp_path / "work", []):
        if s.name == "install":
            continue
        for cmd in s.commands:
            assert _command_modules(cmd) <= set(s.modules), (s.name, cmd)
        assert set(s.at_run) <= set(s.needs), s.name
        assert set(s.needs) <= set(PACKAGES), s.name


def _import_needs(modules: tuple[str, ...], tmp: Path) -> list[str]:
    """The packages among CANDIDATES that importing `modules` cannot do without: start with all of them
    hidden (torch aside) and let back, one at a time, each that an import names as missing."""
    hidden, needed = [n for n in CANDIDATES if n != "torch"], []
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    while True:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env=hiding(tmp, hidden), timeout=300)
        if r.returncode == 0:
            return needed
        last = r.stderr.strip().splitlines()[-1]
        named = [n for n in hidden if f"No module named '{n}'" in last or f"No module named '{n}." in last]
        assert named, f"importing {modules} failed otherwise: {last}"
        needed.append(named[0])
        hidden.remove(named[0])


@pytest.mark.slow
def test_each_stage_needs_exactly_what_its_imports_need_and_what_it_runs(tmp_path: Path) -> None:
    """Derived, not declared: for every stage, the packages its modules cannot be imported without, plus
    those only running imports (at_run: a loader's webdataset, DALI, the Triton kernels) are its `needs`.
    Neither matplotlib nor tensorboard is among them."""
    derived: dict[tuple[str, ...], list[str]] = {}
    for s in plan(tmp_path / "out", tmp_path / "work", []):
        if s.name == "install":
            assert s.needs == ("pip",)
            continue
        if s.modules not in derived:
            derived[s.modules] = _import_needs(s.modules, tmp_path)
        assert set(s.needs) == set(derived[s.modules]) | set(s.at_run), (s.name, derived[s.modules], s.at_run)


def test_gpu_tests_stage_runs_where_only_torch_triton_and_pytest_are(tmp_path: Path) -> None:
    """Its own command, on the CPU: the GPU tests are collected and skip; tests/conftest.py no longer
    imports pack.synth (scipy, tqdm) for them."""
    (stage,) = [s for s in plan(tmp_path, tmp_path / "work", []) if s.name == "gpu-tests"]
    (cmd,) = stage.commands
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=hiding(tmp_path, all_but(*stage.needs,
                       "torch")), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = read_rows(tmp_path / "gpu-tests.rows.jsonl")
    assert len(rows) == 6 and {r["outcome"] for r in rows} == {"skipped"}, rows
    assert "6 skipped" in r.stdout


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_a_stage_past_its_budget_is_stopped_with_every_process_it_started(tmp_path: Path, monkeypatch,
                                                                          capsys) -> None:
    """The stage's shell starts a child in its process group, one that ignores SIGTERM, and one in a
    process group of its own (job control); at the budget all are gone, checked by pid and by session,
    the next stage runs, and one that takes the slack gets the seconds the first stages left."""
    pids = tmp_path / "pids"
    pids.mkdir()
    script = (f"sleep 300 & echo $! > {pids}/child; (trap '' TERM; exec sleep 300) & echo $! > {pids}/deaf; "
              f"set -m; sleep 300 & echo $! > {pids}/own_group; wait")
    stages = [Stage("quick", [["sh", "-c", "exit 0"]], 20),
              Stage("overruns", [["sh", "-c", script]], 4),
              Stage("after", [["sh", "-c", "exit 0"]], 20),
              Stage("slow compile", [["sh", "-c", "sleep 3"]], 1, takes_slack=True)]
    monkeypatch.setattr(gpu_check, "plan", lambda *a, **k: stages)
    monkeypatch.setattr(gpu_check, "header", lambda missing: "GPU: test double")
    monkeypatch.setattr(gpu_check, "STOP_GRACE_S", 1.0)
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["stages"]
    assert summary["overruns"]["ok"] is False and summary["overruns"]["timed_out"] is True
    assert summary["overruns"]["left_running"] == []
    assert sorted(p.name for p in pids.iterdir()) == ["child", "deaf", "own_group"], "the shell got that far"
    for name in ("child", "deaf", "own_group"):
        assert not _alive(int((pids / name).read_text())), name
    (sid,) = summary["overruns"]["sessions"]
    assert session_processes(sid) == []
    assert summary["after"]["ok"] is True and summary["slow compile"]["ok"] is True
    assert summary["slow compile"]["budget_s"] > 3
    assert "overruns         FAILED (timed out)" in capsys.readouterr().out


def test_exit_code_summary_after_each_stage_and_no_stage_run(tmp_path: Path, monkeypatch, capsys) -> None:
    py = sys.executable
    stages = [Stage("passes", [[py, "-c", "print('fine')"]], 30),
              Stage("fails", [[py, "-c", "import sys; sys.exit(3)"]], 30),
              Stage("skipped", [[py, "-c", "pass"]], 30, skip="needs nothing_here: pip install nothing_here")]
    monkeypatch.setattr(gpu_check, "plan", lambda *a, **k: stages)
    monkeypatch.setattr(gpu_check, "header", lambda missing: "GPU: test double")
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["passes"]["ok"] is True and summary["stages"]["fails"]["ok"] is False
    assert summary["stages"]["skipped"]["ok"] is None
    out = capsys.readouterr().out
    assert "fails            FAILED" in out and "skipped: needs nothing_here" in out
    assert "fine" in (tmp_path / "out" / "gpu_check.log").read_text()
    monkeypatch.setattr(gpu_check, "plan", lambda *a, **k: [stages[0], stages[2]])
    assert gpu_check.main(["--out", str(tmp_path / "out2"), "--work", str(tmp_path / "work")]) == 0
    monkeypatch.setattr(gpu_check, "plan", lambda *a, **k: [stages[2]])
    assert gpu_check.main(["--out", str(tmp_path / "out3"), "--work", str(tmp_path / "work")]) == 1
    assert "no stage ran" in capsys.readouterr().err
    data = [Stage("data", [[py, "-c", "import sys; sys.exit(1)"]], 30), Stage("e2e", [[py, "-c", "pass"]], 30)]
    monkeypatch.setattr(gpu_check, "plan", lambda *a, **k: data)
    assert gpu_check.main(["--out", str(tmp_path / "out4"), "--work", str(tmp_path / "work")]) == 1
    e2e = json.loads((tmp_path / "out4" / "summary.json").read_text())["stages"]["e2e"]
    assert e2e["ok"] is None and "data stage" in e2e["skipped"]


def test_closing_table_reads_rows_files_json_records_and_marks_failed_rows(tmp_path: Path) -> None:
    """From JSON records in the benches' own formats (the CPU runs in bench_results/), then from rows files
    as killed stages leave them (a last line cut short): a failed row is named, never a crash."""
    assert "no benchmark" in headlines(tmp_path)
    for name in ("kernels", "e2e", "loader"):
        (tmp_path / f"{name}.json").write_text((ROOT / "bench_results" / f"{name}_cpu.json").read_text())
    (tmp_path / "step.json").write_text(json.dumps({"rows": [{"name": "fp32 NCHW eager", "views_per_s": 100.0}]}))
    (tmp_path / "step_compile.json").write_text(json.dumps({"rows": [
        {"name": "bf16 NHWC compile", "views_per_s": 250.0}]}))
    table = headlines(tmp_path)
    kernels = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    fp32 = [r for r in kernels if r["dtype"] == "float32"]
    size = max(r["size"] for r in fp32 if r["impl"] == "eager")
    big = {r["impl"]: r for r in fp32 if r["size"] == size}
    assert f"(fused {speed(big['eager']['ms'] / big['fused']['ms'])})" in table
    assert "best bf16 NHWC compile: 250 views/s = 2.50x fp32 NCHW eager" in table
    loader = json.loads((tmp_path / "loader.json").read_text())["rows"]
    assert f"baseline {loader['baseline']['samples_per_s']:.0f}" in table and "FAILED" not in table
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    engine = next(r for r in e2e["rows"] if r["name"] == "engine")
    assert f"= {engine['views_per_s'] / e2e['rows'][0]['views_per_s']:.2f}x baseline" in table

    def rows(name: str, *lines: dict, cut: str = "") -> None:
        (tmp_path / f"{name}.rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + cut)

    rows("step", {"name": "fp32 NCHW eager", "views_per_s": 100.0}, {"name": "bf16 NHWC eager", "views_per_s": None},
         cut='{"name": "bf16 NHWC comp')
    rows("e2e", {"name": "baseline", "views_per_s": 50.0})
    rows("loader", {"name": "dali", "round": 1, "samples_per_s": None}, {"name": "baseline", "samples_per_s": 20.0})
    rows("kernels", {"size": 4096, "impl": "fused", "dtype": "bfloat16", "ms": 2.0},
         {"size": 4096, "impl": "eager", "dtype": "bfloat16", "ms": 1.0, "other_dtype": "float32"},
         {"size": 16384, "impl": "compiled", "dtype": "bfloat16", "ms": 5.0},
         {"size": 512, "impl": "fused", "dtype": "float16", "ms": None, "error": "OutOfResources"})
    rows("gpu-tests", {"test": "a", "outcome": "passed"}, {"test": "b", "outcome": "failed"})
    table = headlines(tmp_path, failed=("step-compile",))
    assert "best fp32 NCHW eager: 100 views/s = 1.00x fp32 NCHW eager; FAILED: bf16 NHWC eager" in table
    assert "engine not measured; baseline 50 views/s" in table and "dali FAILED" in table
    assert "bfloat16: 2N=4096: fused 2.00 ms vs eager 1.00 ms (fused 2.00x slower)" in table
    assert "float16: fused not measured; FAILED: fused at 2N=512" in table and "faster" not in table
    assert "gpu-tests  1 failed, 1 passed: b" in table and "step-compile FAILED" in table
    (tmp_path / "e2e.rows.jsonl").write_text("{not json\n")
    assert "e2e" not in headlines(tmp_path)


def test_missing_packages_are_found_without_importing_them() -> None:
    assert missing_packages() == []  # this venv has everything the stages import
    assert missing_packages(("json", "no_such_package_xyz", "no_such_parent.child")) == [
        "no_such_package_xyz", "no_such_parent.child"]
    assert {"nvidia.dali", "webdataset", "pytest", "scipy", "tqdm"} <= set(PACKAGES)


def test_looking_for_pip_leaves_setuptools_importable() -> None:
    """find_spec("pip") would make setuptools' distutils shim stand aside for the whole process, and a later
    import of setuptools (a CPU torch.compile's) fail; the probe asks pip's metadata instead."""
    code = ("from engine.bench.gpu_check import missing_packages\n"
            "assert 'pip' not in missing_packages()\nimport setuptools")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]


def test_wheelhouse_commands_fetch_binary_wheels_for_the_node_python_and_leave_torch_alone(tmp_path: Path) -> None:
    target = tmp_path / "W"
    for without in ((), ("--without", "dali")):
        r = launch("wheelhouse", str(target), "--python", "3.12", "--dry-run", *without)
        assert r.returncode == 0, r.stderr
        commands = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("$ ")]
        assert len(commands) == 2 and not target.exists(), "printed, not run"
        for cmd in commands:
            assert cmd[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in cmd
            assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("--dest") + 1] == str(target)
        names = {c.split(">")[0].split("=")[0] for c in commands[0][8:]}
        assert {"webdataset", "safetensors", "tqdm", "pytest", "setuptools", "tensorboard"} <= names
        assert ("nvidia-dali-cuda130" in names) == (not without)
        assert not names & {"torch", "torchvision", "triton", "accelerate"}
        assert "--no-deps" in commands[1] and commands[1][-1].startswith("accelerate")
        assert f"FACECLR_WHEELHOUSE={target} ./launch.sh gpu-check" in r.stdout
    for bad in (("--python", "twelve"), ("--without", "dali,cuda")):
        r = launch("wheelhouse", str(target), *bad, "--dry-run")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_wheelhouse_without_dali_installs_everything_else(tmp_path: Path) -> None:
    """--install asks pip only for what the folder holds (it used to ask for DALI and install nothing);
    gpu-check then runs every stage but the DALI ones."""
    house = _wheels(tmp_path / "W", *WITHOUT_DALI)
    script = [sys.executable, "-m", "engine.bench.wheelhouse", str(house), "--install"]
    r = subprocess.run([*script, "--editable", "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    install, editable = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("$ ")]
    assert install[1:7] == ["-m", "pip", "install", "--no-index", "--find-links", str(house)]
    asked = {c.split(">")[0] for c in install[7:]}
    assert asked == {"webdataset", "accelerate", "numpy", "scipy", "pillow", "tqdm", "tensorboard", "matplotlib",
                     "pytest"}
    assert "left out: nvidia-dali-cuda130" in r.stdout
    assert editable[-3:] == ["--no-deps", "-e", str(ROOT)] and "--no-index" in editable
    empty = subprocess.run([*script[:3], str(tmp_path), "--install"], capture_output=True, text=True, cwd=ROOT,
                           timeout=60)
    assert empty.returncode == 2 and len(empty.stderr.strip().splitlines()) == 1 and "holds no wheels" in empty.stderr
    _, the_plan = dry_plan(tmp_path, "nvidia.dali", "webdataset", FACECLR_WHEELHOUSE=str(house))
    skipped = {s["name"] for s in the_plan["stages"] if s["skip"]}
    assert skipped == {"dali-tests", "loader"} and the_plan["budget_total_s"] <= LIMIT_WITHOUT_DALI


def test_rows_out_or_json_in_a_missing_folder_is_one_line_before_any_work(capsys, tmp_path: Path) -> None:
    """Read with the arguments (base.cli.output_file), not when the bench ends: `--data` is an empty folder,
    so a bench that got past its arguments would fail on that instead."""
    from engine.bench.__main__ import main as bench
    from kernels.bench import main as kernels
    from pack.bench import main as pack_bench

    for flag in ("--rows-out", "--json"):
        nowhere = str(tmp_path / "absent" / "out.json")
        for main, argv, prog in ((bench, ["step", "--cpu", flag, nowhere], "python -m engine.bench step"),
                                 (bench, ["loader", "--data", str(tmp_path), flag, nowhere],
                                  "python -m engine.bench loader"),
                                 (bench, ["e2e", "--data", str(tmp_path), flag, nowhere], "python -m engine.bench e2e"),
                                 (kernels, ["--cpu", flag, nowhere], "python -m kernels.bench")):
            assert f"no such folder {tmp_path / 'absent'}" in one_line_error(main, argv, capsys, prog), argv
    message = one_line_error(pack_bench, ["--src", str(tmp_path), "--json", nowhere], capsys, "python -m pack.bench")
    assert f"no such folder {tmp_path / 'absent'}" in message


@pytest.mark.slow
def test_benches_append_each_row_before_they_end(tmp_path: Path) -> None:
    """kernels.bench and engine.bench step: the first row is in the rows file while the bench still runs
    (its JSON record not yet written), so a kill at that moment keeps it."""
    benches = {"kernels": ["-m", "kernels.bench", "--cpu", "--sizes", "64,128", "--impls", "fused,eager"],
               "step": ["-m", "engine.bench", "step", "--cpu", "--steps", "2", "--warmup", "1",
                        "--rows", "fp32 NCHW eager,bf16 NCHW eager"]}
    for name, args in benches.items():
        rows, record = tmp_path / f"{name}.rows.jsonl", tmp_path / f"{name}.json"
        p = subprocess.Popen([sys.executable, *args, "--json", str(record), "--rows-out", str(rows)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            wait_for(lambda rows=rows, p=p: read_rows(rows) or p.poll() is not None, 300, f"{name}'s first row",
                     every=0.05)
            first = read_rows(rows)
            assert not record.exists() and p.poll() is None, f"{name} ended before its first row was read"
        finally:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        assert len(first) == 1 and (first[0].get("ms") or first[0].get("views_per_s")), first


def _session_members(marker: str, seen: dict[int, str], stop) -> None:
    """Until `stop` is set: every process in the session of the one whose command line holds `marker`."""
    while not stop.is_set():
        leaders = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline") if _cmdline(p).count(marker)]
        for sid in leaders:
            for pid in session_processes(sid):
                seen.setdefault(pid, _cmdline(Path(f"/proc/{pid}/cmdline")))
        time.sleep(0.05)


def _cmdline(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_a_real_stage_killed_at_its_budget_leaves_no_process(tmp_path: Path) -> None:
    """`gpu-check --only step` with its budget cut to 5.5 s on the CPU: the bench (and any process it started)
    is stopped; every process seen in the stage's session is gone, and the exit code says the stage failed.
    The stage must overrun: it took 18.9 s on a quiet 2-core CI machine (22 s was once cut here, and the stage
    finished). On one thread (OMP_NUM_THREADS=1: 19.5 s on a quiet 2-core machine here, 15.8 s on both cores) a
    machine with more cores cannot run its steps much faster, so 5.5 s is out of reach of one up to 3x faster."""
    import threading

    out = tmp_path / "out"
    seen: dict[int, str] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_session_members, args=(str(out / "step.rows.jsonl"), seen, stop))
    watcher.start()
    try:
        r = launch("gpu-check", "--only", "step", "--budget-scale", "0.1", "--out", str(out), "--work",
                   str(tmp_path / "work"), OMP_NUM_THREADS="1")
    finally:
        stop.set()
        watcher.join()
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    step = json.loads((out / "summary.json").read_text())["stages"]["step"]
    assert step["timed_out"] is True and step["left_running"] == [] and step["budget_s"] == 5.5
    (sid,) = step["sessions"]
    assert sid in seen and session_processes(sid) == []
    assert [pid for pid in seen if _alive(pid)] == [], seen
    assert "timed out: the stage's budget is 5.5 s" in (out / "gpu_check.log").read_text()

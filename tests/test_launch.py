"""launch.sh: the single entry point lists its verbs, refuses unknown ones, and set-up is idempotent."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, active: Path | str = sys.prefix) -> subprocess.CompletedProcess:
    """launch.sh with `active` as the activated environment (by default the one running these tests)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CONDA_PREFIX", "FACECLR_VENV")}
    return subprocess.run([str(ROOT / "launch.sh"), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**env, "VIRTUAL_ENV": str(active)})


def venv_seeing_these_packages(where: Path) -> Path:
    """A new venv whose python sees this interpreter's packages (torch included) through a .pth file, as a
    cluster user's environment sees a module-provided torch."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    own = subprocess.run([str(where / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "zz-outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return where


def test_help_lists_every_verb() -> None:
    r = run("--help")
    assert r.returncode == 0
    for verb in ("setup", "test", "demo", "synth", "pack", "train", "eval", "bench"):
        assert f"\n  {verb}" in r.stdout, verb


def test_unknown_verb_exits_2() -> None:
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown verb" in r.stderr


def test_second_setup_installs_nothing() -> None:
    """The suite runs after `./launch.sh setup`, so this is at least the second run."""
    r = run("setup")
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout
    assert "installing" not in r.stdout


def test_an_active_environment_without_torch_is_passed_over_with_one_line(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    r = run("setup", active=bare)
    assert f"the active environment {bare} has no torch >= 2.11; using {ROOT / '.venv'}" in r.stdout, r.stdout
    assert not (bare / ".faceclr-setup").exists(), "nothing is installed into it"


@pytest.mark.slow
def test_an_active_environment_with_torch_is_used_and_keeps_its_torch(tmp_path: Path) -> None:
    """`./launch.sh setup` in an activated environment that has torch installs faceclr into it (editable) and
    leaves its torch alone: no .venv of its own, no second torch."""
    env = venv_seeing_these_packages(tmp_path / "cluster-env")
    r = run("setup", active=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"using the active environment {env}" in r.stdout and "installing torch" not in r.stdout
    where = subprocess.run([str(env / "bin" / "python"), "-c", "import engine, torch; print(engine.__file__); "
                            "print(torch.__file__)"], capture_output=True, text=True, cwd=tmp_path, check=True)
    engine_file, torch_file = where.stdout.split()
    assert Path(engine_file).is_relative_to(ROOT) and not Path(torch_file).is_relative_to(env), where.stdout
    again = run("setup", active=env)
    assert "up to date" in again.stdout and "installing" not in again.stdout


def test_ci_calls_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./launch.sh test" in ci
    readme = (ROOT / "README.md").read_text()
    assert "./launch.sh demo" in readme and "./launch.sh test" in readme


def test_help_names_gpu_check_wheelhouse_and_their_environment() -> None:
    r = run("--help")
    assert "\n  gpu-check" in r.stdout and "\n  wheelhouse DIR" in r.stdout and "FACECLR_WHEELHOUSE" in r.stdout


def test_slurm_script_keeps_the_launcher_alive_and_requeues_on_75_or_the_marker(tmp_path: Path) -> None:
    flags = ["--", "--data", "/d", "--out", "/runs/a b"]
    multi = run("slurm", "--nodes", "2", "--gpus-per-node", "4", "--dry-run", *flags)
    assert multi.returncode == 0, multi.stderr
    assert 'trap "" USR1 TERM; PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT exec "$1" launch --multi_gpu' in multi.stdout
    assert "faceclr .venv/bin/accelerate engine/train.py --resume auto" in multi.stdout.replace(str(ROOT) + "/", "")
    assert "trap 'scancel --signal=USR1 \"$SLURM_JOB_ID\"' USR1" in multi.stdout
    assert "[[ $status -eq 75 || -f /runs/a\\ b/requeue.json ]]" in multi.stdout
    assert "#SBATCH --signal=B:USR1@180" in multi.stdout and "--out /runs/a\\ b" in multi.stdout
    (tmp_path / "job.sh").write_text(multi.stdout)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0
    single = run("slurm", "--nodes", "1", "--gpus-per-node", "1", "--dry-run", *flags)
    assert "--multi_gpu" not in single.stdout and "/bin/python engine/train.py --resume auto" in single.stdout
    for bad in (["--nodes", "0", "--dry-run", *flags], ["--dry-run", "--", "--data", "/d"], ["--frobnicate"]):
        r = run("slurm", *bad)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr, bad

"""launch.sh: the single entry point lists its verbs, refuses unknown ones, and set-up is idempotent."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "launch.sh"), *args], capture_output=True, text=True, cwd=ROOT)


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

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

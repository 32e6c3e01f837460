"""python -m engine.bench quality: rows over seeds, the optional lightly row, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from engine.bench import quality
from engine.bench.__main__ import main as bench_main
from engine.bench.quality import FIGURES, lightly_available

from .cli import one_line_error
from .probe_data import checker_image, write_split

ROOT = Path(__file__).resolve().parents[1]


def _one_line(args: list[str], capsys: pytest.CaptureFixture) -> str:
    return one_line_error(bench_main, ["quality", *args], capsys, "python -m engine.bench quality")


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert "manifest.json not found" in _one_line(["--data", str(tmp_path / "empty"), "--cpu"], capsys)
    assert "--steps: must be at least 1" in _one_line(["--data", str(tmp_path), "--steps", "0"], capsys)
    assert "--seeds: not an integer" in _one_line(["--data", str(tmp_path), "--seeds", "two"], capsys)
    assert "the following arguments are required: --data" in _one_line([], capsys)


@pytest.fixture
def tiny_pack(tmp_path: Path) -> Path:
    """A train and an eval split of 16 px checkerboards: enough for every check before the first training run."""
    data = tmp_path / "data"
    for split in ("train", "eval"):
        write_split(data, [checker_image(16, seed=i) for i in range(12)], [i % 3 for i in range(12)], split)
    return data


def test_a_read_only_runs_or_json_folder_is_one_line_before_any_training(tiny_pack: Path, small_disk,
                                                                          capsys: pytest.CaptureFixture) -> None:
    disk = small_disk(64, readonly=True)
    base = ["--data", str(tiny_pack), "--cpu", "--steps", "1", "--seeds", "1"]
    assert f"cannot write to --runs {disk / 'runs'}: Read-only" in _one_line([*base, "--runs", str(disk / "runs")],
                                                                             capsys)
    assert f"cannot write to --json {disk}: Read-only" in _one_line([*base, "--json", str(disk / "q.json")], capsys)


def test_a_failed_training_run_leaves_no_temporary_folder(tiny_pack: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's own one-line refusal (exit 2: a full disk) is the bench's, exit 2; any other failure exits 1.
    Either way the temporary runs folder goes (it used to stay in /tmp with whatever the runs had written)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    line = "python engine/train.py: error: the disk holding /runs is full (writing /runs/x): free some space"
    for code, stderr in ((2, line), (1, "Traceback ...\nRuntimeError: boom")):
        monkeypatch.setattr(quality.subprocess, "run", lambda cmd, code=code, stderr=stderr, **kw:
                            subprocess.CompletedProcess(cmd, code, "", stderr + "\n"))
        argv = ["quality", "--data", str(tiny_pack), "--cpu", "--steps", "1", "--seeds", "1", "--no-lightly"]
        if code == 2:
            err = one_line_error(bench_main, argv, capsys, "python -m engine.bench quality")
            assert "training seed 0: the disk holding /runs is full" in err
        else:
            assert bench_main(argv) == 1
            assert "training seed 0 exited 1: RuntimeError: boom" in capsys.readouterr().err
        assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.slow
def test_rows_over_two_seeds(pack_synth, tmp_path: Path) -> None:
    """Two seeds of 2 steps each (the machinery, not the learning): faceclr's rows come from real runs of
    engine/train.py, every mean and std is that of the per-seed figures, and the lightly row is present
    exactly when lightly is importable."""
    data = pack_synth("quality", "--min-images", "10", "--eval-identities", "0.5")
    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, "-m", "engine.bench", "quality", "--data", str(data), "--steps", "2", "--seeds",
                        "2", "--cpu", "--workers", "1", "--json", str(out), "--runs", str(tmp_path / "runs")],
                       capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == ["faceclr", *(["lightly"] if lightly_available() else []), "random init", "pixels"]
    assert (result["lightly_skipped"] is None) == lightly_available()
    for row in result["rows"]:
        assert len(row["per_seed"]) == (1 if row["name"] == "pixels" else 2)
        for k in FIGURES:
            values = [s[k] for s in row["per_seed"]]
            assert row[k]["mean"] == pytest.approx(np.mean(values))
            assert row[k]["std"] == pytest.approx(np.std(values, ddof=1) if len(values) > 1 else 0.0)
            assert 0 <= row[k]["mean"] <= 1
    for seed in (0, 1):
        run = tmp_path / "runs" / f"faceclr-seed{seed}"
        assert json.loads((run / "config.json").read_text())["schedule"]["seed"] == seed
        assert (run / "backbone.safetensors").is_file()
    faceclr = result["rows"][0]["per_seed"]
    assert faceclr[0]["precision_at_1"] != faceclr[1]["precision_at_1"]  # two seeds, two networks
    assert "faceclr" in r.stdout and "±" in r.stdout

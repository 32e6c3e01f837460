"""python -m engine.bench quality: rows over seeds, the optional lightly row, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.bench.__main__ import main as bench_main
from engine.bench.quality import FIGURES, lightly_available

from .cli import one_line_error

ROOT = Path(__file__).resolve().parents[1]


def _one_line(args: list[str], capsys: pytest.CaptureFixture) -> str:
    return one_line_error(bench_main, ["quality", *args], capsys, "python -m engine.bench quality")


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert "manifest.json not found" in _one_line(["--data", str(tmp_path / "empty"), "--cpu"], capsys)
    assert "--steps: must be at least 1" in _one_line(["--data", str(tmp_path), "--steps", "0"], capsys)
    assert "--seeds: not an integer" in _one_line(["--data", str(tmp_path), "--seeds", "two"], capsys)
    assert "the following arguments are required: --data" in _one_line([], capsys)


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

"""The benchmarks run on the CPU and their rows are consistent (ratios from the same run, settings named)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .probe_data import checker_image, write_split

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("benchdata")
    write_split(root, [checker_image(32, cell=2 + i % 4, seed=i) for i in range(80)], [i % 4 for i in range(80)])
    return root


def test_e2e_rows_are_consistent(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "engine.bench", "e2e", "--data", str(shards), "--cpu", "--steps", "2",
                        "--warmup", "1", "--image-size", "32", "--batch-size", "8", "--workers", "1", "--no-compile",
                        "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows)[0] == "baseline" and list(rows)[-1] == "engine"
    assert {"+ DALI loader", "+ bf16", "+ channels-last", "+ fused loss"} <= set(rows)
    base = rows["baseline"]["views_per_s"]
    for row in rows.values():
        assert row["speedup"] == pytest.approx(row["views_per_s"] / base, rel=1e-2)
        assert 0 <= row["data_wait_frac"] <= 1 and row["peak_mem_gb"] > 0
        assert result["projected_hours_50_epochs"][row["name"]] == pytest.approx(
            50 * 2 * 80 / row["views_per_s"] / 3600, rel=1e-2)
    won = [name for name, row in rows.items() if name.startswith("+") and row["speedup"] > 1]
    settings = rows["engine"]["settings"]
    assert ("NHWC" in settings) == ("+ channels-last" in won)
    assert ("fused loss" in settings) == ("+ fused loss" in won)
    assert ("dali loader" in settings) == ("+ DALI loader" in won)
    assert "engine row settings" in r.stdout


def test_step_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "engine.bench", "step", "--cpu", "--steps", "1", "--warmup", "1",
                        "--image-size", "32", "--batch-size", "2", "--no-compile", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    names = [row["name"] for row in json.loads(out.read_text())["rows"]]
    assert names == ["fp32 NCHW eager", "fp32 NHWC eager", "bf16 NCHW eager", "bf16 NHWC eager"]

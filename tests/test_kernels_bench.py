"""`python -m kernels.bench`: training-shaped sizes, and a failing row that does not end the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import bench

ROOT = Path(__file__).resolve().parents[1]


def test_training_sizes_are_measured_by_default() -> None:
    for device in ("cuda", "cpu"):
        sizes = [int(s) for s in bench.SIZES[device].split(",")]
        assert {512, 1024, 4096} <= set(sizes) and 16384 in sizes


def test_a_triton_error_is_a_failed_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    """A kernel that does not fit raises OutOfResources, a TritonError and not a RuntimeError: that row
    fails, the other implementations still run."""
    from triton.runtime.errors import OutOfResources

    def fake(size: int, dim: int, impl: str, dtype: str, repeats: int) -> dict:
        if impl == "fused":
            raise OutOfResources(393216, 232448, "shared memory")
        return {"size": size, "dim": dim, "impl": impl, "dtype": dtype, "ms": 2.0, "peak_mem_mb": 1.0}

    monkeypatch.setattr(bench, "_measure_in_child", fake)
    out = tmp_path / "k.json"
    assert bench.main(["--cpu", "--sizes", "512,1024", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["size"], r["impl"]) for r in rows] == [(s, i) for s in (512, 1024) for i in bench.IMPLS]
    failed = [r for r in rows if r["impl"] == "fused"]
    assert all(r["ms"] is None and r["error"].startswith("OutOfResources: out of resource") for r in failed)
    assert all(r["ms"] == 2.0 for r in rows if r["impl"] != "fused")
    assert "fused FAILED: OutOfResources" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [(["--sizes", "511"], "even and at least 2"),
                                               (["--impls", "fused,fast"], "unknown --impls fast"),
                                               (["--dim", "0"], "must be at least 1")])
def test_bad_arguments_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    code = bench.main(["--cpu", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_cpu_run_at_a_training_size(tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    r = subprocess.run([sys.executable, "-m", "kernels.bench", "--cpu", "--sizes", "512", "--impls", "fused,eager",
                        "--repeats", "2", "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["size"], row["impl"]) for row in rows] == [(512, "fused"), (512, "eager")]
    assert all(row["ms"] > 0 for row in rows)

"""`python -m kernels.bench`: like with like (every comparison names both sides' dtypes), honest speed words,
training-shaped sizes, and a failing row that does not end the run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import bench

ROOT = Path(__file__).resolve().parents[1]

FAKE_MS = {("fused", "bfloat16"): 12.5, ("eager", "bfloat16"): 2.0, ("compiled", "bfloat16"): 25.0,
           ("fused", "float32"): 12.5, ("eager", "float32"): 2.0, ("compiled", "float32"): 50.0}
"""Fused 6.25x slower than eager in both dtypes and 2x (4x) faster than compiled; bf16 buys nothing for the
fused and eager sides and 2x for the compiled one."""


def fake_child(size: int, dim: int, impl: str, dtype: str, repeats: int) -> dict:
    return {"size": size, "dim": dim, "impl": impl, "dtype": dtype, "ms": FAKE_MS[impl, dtype], "peak_mem_mb": 4.0}


def test_training_sizes_are_measured_by_default() -> None:
    cpu = [int(s) for s in bench.SIZES["cpu"].split(",")]
    cuda = [int(s) for s in bench.SIZES["cuda"].split(",")]
    assert cpu == [512, 1024, 4096] and {512, 1024, 4096, 16384, 65536} <= set(cuda)


def test_speed_words_follow_the_ratio() -> None:
    assert bench.speed(2.0) == "2.00x faster"
    assert bench.speed(0.16) == "6.25x slower"
    assert bench.speed(1.0) == bench.speed(0.999) == bench.speed(1.004) == "1.00x, the same speed"
    assert bench.speed(1.006) == "1.01x faster" and bench.speed(0.99) == "1.01x slower"


def test_no_line_claims_faster_for_a_ratio_below_one(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """The fused side six times slower than eager is printed as slower, never as "0.16x faster"."""
    monkeypatch.setattr(bench, "_measure_in_child", fake_child)
    assert bench.main(["--cpu", "--sizes", "512"]) == 0
    out = capsys.readouterr().out
    claims = re.findall(r"(\d+\.\d+)x (faster|slower)", out)
    assert claims and all(float(x) > 1 or (word == "slower" and float(x) == 1) for x, word in claims), out
    assert ("6.25", "slower") in claims


def test_every_comparison_names_both_sides_dtypes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    """Fusion rows compare fused with the reference in the same dtype; precision rows each implementation in
    bf16 with itself in fp32; both sides' implementation and dtype are on every row, with its own ratio."""
    monkeypatch.setattr(bench, "_measure_in_child", fake_child)
    out = tmp_path / "k.json"
    assert bench.main(["--cpu", "--sizes", "512,1024", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["dtypes"] == ["bfloat16", "float32"] and record["seconds"] >= 0 and len(record["load_average"]) == 2
    rows = record["comparisons"]
    pairs = {(r["size"], r["kind"], r["impl"], r["dtype"], r["baseline_impl"], r["baseline_dtype"]) for r in rows}
    want = {(s, "fusion", "fused", d, base, d) for s in (512, 1024) for d in ("bfloat16", "float32")
            for base in ("eager", "compiled")}
    want |= {(s, "precision", impl, "bfloat16", impl, "float32") for s in (512, 1024) for impl in bench.IMPLS}
    assert pairs == want and len(rows) == len(want)
    for r in rows:
        assert r["ms"] == FAKE_MS[r["impl"], r["dtype"]] and r["baseline_ms"] == FAKE_MS[r["baseline_impl"],
                                                                                         r["baseline_dtype"]]
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["ms"], rel=1e-3)
        assert r["speed"] == bench.speed(r["speedup"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "fusion fused bfloat16 eager bfloat16 6.25x slower" in printed
    assert "precision compiled bfloat16 compiled float32 2.00x faster" in printed
    assert [(r["impl"], r["dtype"]) for r in record["rows"]] == [(i, d) for d in ("bfloat16", "float32")
                                                                 for i in bench.IMPLS] * 2


def test_the_reference_runs_in_the_inputs_dtype() -> None:
    """The bench's reference on bf16 views is bf16 throughout (the accuracy reference upcasts to fp32)."""
    z1, z2 = (torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    for impl in ("eager", "compiled"):
        loss = bench._loss_fn(impl)(z1, z2, 0.1)
        loss.backward()
        assert loss.dtype == torch.bfloat16 and z1.grad.dtype == torch.bfloat16, impl
    assert bench.nt_xent_reference(z1, z2, 0.1).dtype == torch.float32


def test_a_triton_error_is_a_failed_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    """A kernel that does not fit raises OutOfResources, a TritonError and not a RuntimeError: that row
    fails, the other implementations still run, and no comparison uses the failed side."""
    from triton.runtime.errors import OutOfResources

    def fake(size: int, dim: int, impl: str, dtype: str, repeats: int) -> dict:
        if impl == "fused":
            raise OutOfResources(393216, 232448, "shared memory")
        return {"size": size, "dim": dim, "impl": impl, "dtype": dtype, "ms": 2.0, "peak_mem_mb": 1.0}

    monkeypatch.setattr(bench, "_measure_in_child", fake)
    out = tmp_path / "k.json"
    assert bench.main(["--cpu", "--sizes", "512,1024", "--dtypes", "float32", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [(r["size"], r["impl"]) for r in rows] == [(s, i) for s in (512, 1024) for i in bench.IMPLS]
    failed = [r for r in rows if r["impl"] == "fused"]
    assert all(r["ms"] is None and r["error"].startswith("OutOfResources: out of resource") for r in failed)
    assert all(r["ms"] == 2.0 for r in rows if r["impl"] != "fused")
    assert record["comparisons"] == []
    assert "fused   float32 FAILED: OutOfResources" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [(["--sizes", "511"], "even and at least 2"),
                                               (["--impls", "fused,fast"], "unknown --impls fast"),
                                               (["--dtypes", "bfloat16,float64"], "unknown --dtypes float64"),
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
    record = json.loads(out.read_text())
    assert [(row["impl"], row["dtype"]) for row in record["rows"]] == [
        ("fused", "bfloat16"), ("eager", "bfloat16"), ("fused", "float32"), ("eager", "float32")]
    assert all(row["ms"] > 0 for row in record["rows"])
    kinds = [(c["kind"], c["impl"], c["dtype"], c["baseline_impl"], c["baseline_dtype"]) for c in record["comparisons"]]
    assert kinds == [("fusion", "fused", "bfloat16", "eager", "bfloat16"), ("fusion", "fused", "float32", "eager",
                                                                              "float32"),
                     ("precision", "fused", "bfloat16", "fused", "float32"),
                     ("precision", "eager", "bfloat16", "eager", "float32")]

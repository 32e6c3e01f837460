"""`python -m kernels.compile_check`: the kernels compiled for sm_80 and sm_90 on a machine without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from kernels import compile_check, tiles  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_one_variant_reports_its_resources() -> None:
    tile = tiles.configs("fwd", "bfloat16", 128)[0]
    row = compile_check.compile_variant("fwd", "bfloat16", 128, tile, 90)
    assert {"kernel", "dtype", "d", "arch", "config", "shared_bytes", "registers", "spill_bytes", "fits"} <= set(row)
    assert row["arch"] == "sm_90" and row["config"] == tile.name("fwd")
    assert 0 < row["shared_bytes"] <= compile_check.SHARED_LIMIT[90] and 0 < row["registers"] <= 255
    assert row["fits"] and row["tensor_cores"] and row["spill_bytes"] < 1024


def test_a_variant_over_the_limit_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    """The check can fail: with a 1 KB shared-memory limit the same kernel does not fit, and the run exits 1."""
    monkeypatch.setattr(compile_check, "SHARED_LIMIT", {80: 1024, 90: 1024})
    monkeypatch.setattr(compile_check, "variants", lambda archs, dims: [
        ("fwd", "bfloat16", 128, tiles.configs("fwd", "bfloat16", 128)[0], 90)])
    out = tmp_path / "cc.json"
    assert compile_check.main(["--arch", "sm_90", "--d", "128", "--workers", "1", "--json", str(out)]) == 1
    (row,) = json.loads(out.read_text())["rows"]
    assert row["fits"] is False and row["shared_bytes"] > 1024
    assert "DOES NOT FIT" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [(["--arch", "sm_75"], "unknown --arch"),
                                               (["--d", "4096"], "--d values must lie in"),
                                               (["--d", "x"], "comma-separated integers"),
                                               (["--json", "/no/such/dir/x.json"], "no such folder")])
def test_bad_arguments_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    code = compile_check.main(args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("python -m kernels.compile_check: error: ")


@pytest.mark.slow
def test_every_launchable_variant_fits_sm80_and_sm90(tmp_path: Path) -> None:
    """The full check as CI runs it: fp32, bf16 and fp16, d = 16 ... 2048 and 700, every tile, both
    architectures. The variants training launches by default (bf16, d=128) run on tensor cores and spill
    under 1 KB per thread. Takes minutes on 2 CPU cores."""
    out = tmp_path / "cc.json"
    r = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "sm_80", "--arch", "sm_90",
                        "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert all(row["fits"] for row in rows)
    covered = {(row["arch"], row["dtype"], row["d"], row["kernel"]) for row in rows}
    for arch in ("sm_80", "sm_90"):
        for dtype in ("float32", "bfloat16", "float16"):
            for d in (16, 32, 64, 128, 256, 512, 700, 1024, 2048):
                for kernel in ("fwd", "bwd_rows", "bwd_cols"):
                    assert (arch, dtype, d, kernel) in covered
                    configs = {row["config"] for row in rows if (row["arch"], row["dtype"], row["d"],
                                                                  row["kernel"]) == (arch, dtype, d, kernel)}
                    assert configs == {t.name(kernel) for t in tiles.configs(kernel, dtype, d)}
    default = [row for row in rows if row["dtype"] == "bfloat16" and row["d"] == 128]
    assert len(default) >= 6 and all(row["spill_bytes"] < 1024 and row["tensor_cores"] for row in default)

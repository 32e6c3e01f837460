"""Shared fixtures: synthetic downloads made once per session, in the real layout.

pack.synth and pack (scipy, PIL, tqdm) are imported inside the fixtures, so a test that uses none of them
runs where only torch, triton and pytest are installed (./launch.sh gpu-check's GPU-tests stage).
`--rows-out FILE.jsonl` appends each test's outcome as it ends, as the benches append their rows."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--rows-out", default=None, metavar="FILE.jsonl",
                     help="append one JSON line per test (id, outcome, seconds) as each test ends")


class _RowsOut:
    def __init__(self, path: Path) -> None:
        self.path = path

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """One line per test: its call, or the setup or teardown that failed or skipped it."""
        if report.when == "call" or report.outcome != "passed":
            from measure.record import append_row

            append_row(self.path, {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                                   "seconds": round(report.duration, 3)})


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--rows-out"):
        config.pluginmanager.register(_RowsOut(Path(config.getoption("--rows-out"))), "faceclr-rows-out")


@pytest.fixture(scope="session")
def synth_download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m pack.synth --out DIR --identities 60 --tar`: the issue's own example, default dirt."""
    from pack import synth

    out = tmp_path_factory.mktemp("synth") / "s"
    assert synth.main(["--out", str(out), "--identities", "60", "--tar", "--workers", "2", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def synth_truth(synth_download: Path) -> dict:
    from pack import synth

    return json.loads((synth_download / synth.TRUTH).read_text())


@pytest.fixture(scope="session")
def pack_synth(synth_download: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`pack_synth(name, *flags)`: `python -m pack` on the synthetic download at 64 px, into a new folder."""
    from pack.__main__ import main as pack_main

    def run(name: str, *flags: str) -> Path:
        out = tmp_path_factory.mktemp(name) / "shards"
        assert pack_main(["--src", str(synth_download / "imdb_crop"), "--out", str(out), "--size", "64",
                          "--workers", "2", "--no-progress", *flags]) == 0
        return out

    return run


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """`small_disk(kib, readonly=False)`: a real tmpfs of that size mounted at a new folder, for full-disk and
    read-only faults as users meet them (root only: skipped with one line elsewhere); unmounted at teardown."""
    mounted: list[Path] = []

    def mount(kib: int, readonly: bool = False) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        options = f"size={kib}k" + (",ro" if readonly else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip() or r.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)

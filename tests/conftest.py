"""Shared fixtures: synthetic downloads made once per session, in the real layout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from pack import synth
from pack.__main__ import main as pack_main


@pytest.fixture(scope="session")
def synth_download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m pack.synth --out DIR --identities 60 --tar`: the issue's own example, default dirt."""
    out = tmp_path_factory.mktemp("synth") / "s"
    assert synth.main(["--out", str(out), "--identities", "60", "--tar", "--workers", "2", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def synth_truth(synth_download: Path) -> dict:
    return json.loads((synth_download / synth.TRUTH).read_text())


@pytest.fixture(scope="session")
def pack_synth(synth_download: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`pack_synth(name, *flags)`: `python -m pack` on the synthetic download at 64 px, into a new folder."""

    def run(name: str, *flags: str) -> Path:
        out = tmp_path_factory.mktemp(name) / "shards"
        assert pack_main(["--src", str(synth_download / "imdb_crop"), "--out", str(out), "--size", "64",
                          "--workers", "2", "--no-progress", *flags]) == 0
        return out

    return run

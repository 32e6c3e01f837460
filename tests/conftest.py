"""Shared fixtures: synthetic downloads made once per session, in the real layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pack import synth


@pytest.fixture(scope="session")
def synth_download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m pack.synth --out DIR --identities 60 --tar`: the issue's own example, default dirt."""
    out = tmp_path_factory.mktemp("synth") / "s"
    assert synth.main(["--out", str(out), "--identities", "60", "--tar", "--workers", "2", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def synth_truth(synth_download: Path) -> dict:
    return json.loads((synth_download / synth.TRUTH).read_text())

"""Entry points called in this process (a subprocess would import torch again), held to the error contract."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def one_line_error(main: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture,
                   prog: str) -> str:
    """`main(argv)` must return 2 with exactly one `prog: error: ...` line on stderr; returns that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"{prog}: error: "), err
    return err.strip()

"""Command-line conventions shared by faceclr's tools: a bad argument is one line and exit code 2."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


def fail(message: str, prog: str | None = None) -> NoReturn:
    """Print one `prog: error: message` line and exit 2."""
    print(f"{prog or 'faceclr'}: error: {message}", file=sys.stderr)
    sys.exit(2)


def fail_if_disk_full(error: OSError, out: Path, prog: str, kept: str = "") -> None:
    """A full disk or quota as the one-line error (`kept`: what the re-run reuses); any other OSError is a bug
    and goes on as it is."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise error
    fail(f"the disk holding {out} is full (writing {error.filename or 'a file'}): free some space and run the same "
         f"command again{kept}", prog)


def ensure_writable(out: Path, prog: str | None = None) -> None:
    """Create `out` if needed and prove it takes a file; otherwise one error line and exit 2."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_bytes(b"")
        (out / ".write-test").unlink()
    except OSError as e:
        fail(f"cannot write to --out {out}: {e.strerror or e}", prog)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is a single line (the usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)", self.prog)


def _number(kind: type, ok: Callable[[float], bool], requirement: str):
    """An argparse type: a number of `kind` for which `ok` holds; otherwise `must be <requirement>`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: '{text}'") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    return parse


def positive(kind: type):
    """An argparse type: a number of `kind` that must be > 0."""
    return _number(kind, lambda v: v > 0, "at least 1" if kind is int else "positive")


def non_negative(kind: type):
    """An argparse type: a number of `kind` that must be >= 0."""
    return _number(kind, lambda v: v >= 0, "0 or more")

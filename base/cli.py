"""argparse the faceclr way: a bad argument is a UsageError (one line, exit 2, through `entry_point`), and numbers
are checked where they are parsed."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from base.errors import UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error raises a UsageError of one line (the usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)", prog=self.prog)


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

"""argparse the faceclr way: a bad argument is a UsageError (one line, exit 2, through `entry_point`), and numbers
are checked where they are parsed."""

from __future__ import annotations

import argparse
import ast
import inspect
import textwrap
from collections.abc import Callable
from pathlib import Path
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


def output_file(text: str) -> Path:
    """An argparse type for a file a command will write (`--json`, `--rows-out`): its folder must exist, checked
    when the arguments are read rather than when a long benchmark ends."""
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder {path.parent} (create it first)")
    return path


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source, as Sphinx does): a field's help text is
    written once, beside the field, and flags are generated from it."""
    docs: dict[str, str] = {}
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs

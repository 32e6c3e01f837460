"""Command-line conventions shared by faceclr's tools: a bad argument is one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def fail(message: str, prog: str | None = None) -> NoReturn:
    """Print one `prog: error: message` line and exit 2."""
    print(f"{prog or 'faceclr'}: error: {message}", file=sys.stderr)
    sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is a single line (the usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)", self.prog)

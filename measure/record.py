"""Benchmark results that say where they came from.

`save(bench, result, path)` adds the git commit (and whether the tree had uncommitted changes), the
command line, the machine and the date to `result`, writes it to `path` (temp name, then rename), and
appends the same record as one line to `<bench>-history.jsonl` beside it, so a rerun never erases an
earlier figure. `append_row(path, row)` is the incremental twin behind every bench's `--rows-out FILE`: one
JSON line per row, on disk the moment the row is measured, so a bench killed mid-run (./launch.sh gpu-check's
time budgets) keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from base.cli import output_file
from base.files import append_line, write_atomic
from measure.hardware import describe, environment

ROOT = Path(__file__).resolve().parents[1]


def speed(speedup: float) -> str:
    """A ratio of rates in words every bench prints alike: 2.0 is "2.00x faster", 0.16 is "6.25x slower" (never
    "0.16x faster"), and one that rounds to 1.00 either way is "1.00x, the same speed"."""
    if round(speedup, 2) == 1 or round(1 / speedup, 2) == 1:
        return "1.00x, the same speed"
    return f"{speedup:.2f}x faster" if speedup > 1 else f"{1 / speedup:.2f}x slower"


def git_revision(root: Path = ROOT) -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the checkout the code runs from."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def provenance(device: object = "cpu", argv: list[str] | None = None) -> dict:
    # sys.orig_argv keeps "-m engine.bench" as typed; sys.argv would show the module's __main__.py path
    command = [Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]] if argv is None else ["python", *argv]
    env = environment(device)
    return {"date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": shlex.join(command), **git_revision(), "hardware": describe(env), "environment": env}


def append_row(path: Path | None, row: dict) -> None:
    """Append `row` as one JSON line and close the file (flushed), or do nothing without a path. A reader
    skips a last line that a kill cut short."""
    if path is not None:
        append_line(path, json.dumps(row))


def read_rows(path: Path) -> list[dict]:
    """The rows `append_row` wrote; a line cut short by a kill, or a non-object line, is left out."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def add_rows_out(parser: argparse.ArgumentParser) -> None:
    """The `--rows-out FILE.jsonl` option every bench shares."""
    parser.add_argument("--rows-out", type=output_file, default=None, metavar="FILE.jsonl",
                        help="also append each row to this file as soon as it is measured (a killed run keeps "
                             "its finished rows)")


def save(bench: str, result: dict, path: Path | None, device: object = "cpu") -> dict:
    """`result` plus provenance; written to `path` and appended to its bench's history when `path` is given."""
    record = {"bench": bench, **result, **provenance(device)}
    if path is not None:
        path = Path(path)
        write_atomic(path, json.dumps(record, indent=1).encode())
        append_line(path.parent / f"{bench}-history.jsonl", json.dumps(record))
    return record

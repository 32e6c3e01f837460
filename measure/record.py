"""Benchmark results that say where they came from.

`save(bench, result, path)` adds the git commit (and whether the tree had uncommitted changes), the
command line, the machine and the date to `result`, writes it to `path` (temp name, then rename), and
appends the same record as one line to `<bench>-history.jsonl` beside it, so a rerun never erases an
earlier figure.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from base.files import write_atomic
from measure.hardware import describe, environment

ROOT = Path(__file__).resolve().parents[1]


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
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": shlex.join(command), **git_revision(), "hardware": describe(env), "environment": env}


def save(bench: str, result: dict, path: Path | None, device: object = "cpu") -> dict:
    """`result` plus provenance; written to `path` and appended to its bench's history when `path` is given."""
    record = {"bench": bench, **result, **provenance(device)}
    if path is not None:
        path = Path(path)
        write_atomic(path, json.dumps(record, indent=1).encode())
        with open(path.parent / f"{bench}-history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return record

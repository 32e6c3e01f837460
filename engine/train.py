"""SimCLR training: `accelerate launch engine/train.py --config configs/demo.toml --data OUT --out RUN [flags]`
(or `python engine/train.py ...` on one device).

Parse and check the config, build the Trainer, train, exit. Exit codes: 0 done; 2 bad input or
configuration (one line each); 3 non-finite loss (the last good checkpoint is kept); 75 (EX_TEMPFAIL)
preempted by SIGTERM/SIGUSR1 after saving a checkpoint: requeue the job and it resumes (--resume auto).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch engine/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import parse, validate
from engine.trainer import EXIT_USAGE, Trainer, UsageError
from pack.cli import OneLineParser

PROG = "engine/train.py"


def error(message: str) -> None:
    """One line on stderr, from the first process of a job only (every rank finds the same problem)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{PROG}: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse(argv, OneLineParser)
    except ValueError as e:
        error(str(e))
        return EXIT_USAGE
    problems = validate(cfg)
    for problem in problems:
        error(problem)
    if problems:
        return EXIT_USAGE
    try:
        return Trainer(cfg).train()
    except UsageError as e:
        error(str(e))
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

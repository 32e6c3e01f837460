"""SimCLR training: `accelerate launch engine/train.py --config configs/demo.toml --data OUT --out RUN [flags]`
(or `python engine/train.py ...` on one device).

Parse and check the config, build the Trainer, train, exit. Exit codes: 0 done; 2 bad input or
configuration (one line each); 3 non-finite loss (the last good checkpoint is kept); 75 (EX_TEMPFAIL)
preempted by SIGTERM/SIGUSR1 after saving a checkpoint: requeue the job and it resumes (--resume auto);
130 stopped by Ctrl-C (after saving a checkpoint; a second Ctrl-C stops without one). torch is imported
only once the arguments are good, so `--help` and a bad flag answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch engine/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from base.cli import OneLineParser
from base.errors import UsageError, entry_point
from engine.config import parse, validate

PROG = "engine/train.py"


@entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv, OneLineParser)
    problems = validate(cfg)
    if problems:
        raise UsageError("\n".join(problems))
    from engine.trainer import Trainer

    return Trainer(cfg).train()


if __name__ == "__main__":
    sys.exit(main())

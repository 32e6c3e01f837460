"""python -m engine.bench {e2e,step,loader,quality} ...: each compares against a baseline in the same run."""

from __future__ import annotations

import sys

from base.cli import OneLineParser
from base.errors import UsageError, entry_point
from engine.bench import e2e, loader, quality

PROG = "python -m engine.bench"


@entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG)
    sub = p.add_subparsers(dest="what", required=True, parser_class=OneLineParser)
    e2e.add_arguments(sub.add_parser("e2e", help="training steps on real batches: the original way vs ours, "
                                                 "change by change"), True)
    e2e.add_arguments(sub.add_parser("step", help="the training step alone on synthetic views: precision, "
                                                  "layout, compile"), False)
    loader.add_arguments(sub.add_parser("loader", help="DALI loader vs the torch baseline"))
    quality.add_arguments(sub.add_parser("quality", help="learning quality over seeds: faceclr, lightly, references"))
    a = p.parse_args(argv)
    try:
        return {"e2e": e2e.run_cli, "step": e2e.run_cli, "loader": loader.run, "quality": quality.run}[a.what](a)
    except UsageError as e:  # a subcommand's problem is named by the subcommand
        e.prog = e.prog or f"{PROG} {a.what}"
        raise
    except ValueError as e:
        raise UsageError(str(e), prog=f"{PROG} {a.what}") from None


if __name__ == "__main__":
    sys.exit(main())

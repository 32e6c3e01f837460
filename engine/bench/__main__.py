"""python -m engine.bench {e2e,step,loader,quality} ...: each compares against a baseline in the same run."""

from __future__ import annotations

import argparse
import sys

from engine.bench import e2e, loader, quality


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench")
    sub = p.add_subparsers(dest="what", required=True)
    e2e.add_arguments(sub.add_parser("e2e", help="training steps: the original way vs ours, change by change"), True)
    e2e.add_arguments(sub.add_parser("step", help="model forward+backward alone: precision, layout, compile"), False)
    loader.add_arguments(sub.add_parser("loader", help="DALI loader vs the torch baseline"))
    quality.add_arguments(sub.add_parser("quality", help="learning quality over seeds: faceclr, lightly, references"))
    a = p.parse_args(argv)
    return {"e2e": e2e.run_e2e_cli, "step": e2e.run_step_cli, "loader": loader.run,
            "quality": quality.run}[a.what](a)


if __name__ == "__main__":
    sys.exit(main())

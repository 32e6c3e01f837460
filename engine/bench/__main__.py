"""python -m engine.bench loader ...  (more benchmarks join as their stages land)."""

from __future__ import annotations

import argparse
import sys

from engine.bench import loader


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench")
    sub = p.add_subparsers(dest="what", required=True)
    loader.add_arguments(sub.add_parser("loader", help="DALI loader vs the torch baseline"))
    a = p.parse_args(argv)
    return {"loader": loader.run}[a.what](a)


if __name__ == "__main__":
    sys.exit(main())

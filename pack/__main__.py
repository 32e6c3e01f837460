"""python -m pack --src SRC --out OUT [options]: filtered, pre-resized WebDataset shards from a face dataset.

SRC is IMDb-WIKI's `imdb_crop` folder or `imdb_crop.tar` (read in one sequential pass, never extracted), a
folder (or tar) holding one folder of images per identity, or with --list a folder and a path,identity CSV.
docs/data-format.md describes each layout; `--dry-run` explores thresholds without writing shards.
`python -m pack verify --data OUT [--decode]` checks a packed output against its manifest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tarfile
import typing
from pathlib import Path

from base.cli import OneLineParser, field_docs, positive
from base.errors import UsageError, entry_point, refusal
from base.files import ensure_writable, write_atomic
from pack.listing import IMDB_ONLY, LAYOUTS
from pack.selection import Params

PROG = "python -m pack"


def build_parser() -> argparse.ArgumentParser:
    """Where to read and write, by hand; every selection and output option from `Params`, its one declaration."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      epilog="python -m pack verify --help: check a packed output's shards against its manifest")
    p.add_argument("--src", type=Path, required=True,
                   help="imdb_crop folder or imdb_crop.tar; a folder (or tar) of identity folders; with --list, a "
                        "folder")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for shards, indexes and the manifest; needs about twice the output's size free "
                        "while packing")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="imdb: imdb.mat lists the images; folders: SRC/<identity>/<image>; csv: --list names them "
                        "(default: imdb where an imdb.mat is found, csv with --list, else folders)")
    p.add_argument("--meta", type=Path, default=None,
                   help="imdb layout: imdb.mat or imdb_meta.tar (default: imdb.mat in SRC, "
                        "else imdb/imdb.mat or imdb_meta.tar beside it)")
    p.add_argument("--list", type=Path, default=None, dest="list_file",
                   help="csv layout: rows of path,identity, paths relative to SRC (a header row is allowed)")
    hints, docs = typing.get_type_hints(Params), field_docs(Params)
    for f in dataclasses.fields(Params):
        flag = "--" + f.name.replace("_", "-")
        shown = "" if f.default is None or f.default is False else f" (default: {f.default})"
        help_text = (docs.get(f.name, "") + shown).replace("%", "%%")
        if hints[f.name] is bool:
            p.add_argument(flag, action="store_true", help=help_text)
            continue
        kind = f.metadata.get("check") or next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],)
                                               if t is not type(None))
        p.add_argument(flag, type=kind, default=f.default, help=help_text,
                       metavar=("N" if int in (hints[f.name], *typing.get_args(hints[f.name])) else "X"))
    p.add_argument("--workers", type=positive(int), default=os.cpu_count() or 1,
                   help="processes, also for --dry-run (default: all)")
    p.add_argument("--dry-run", action="store_true",
                   help="read the list and image headers only: funnel for these and nearby thresholds, OUT/explore.png")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_out(out: Path, params: dict, layout: str):
    """The manifest when OUT already holds this exact output; a UsageError when it holds anything we must not touch.

    The resume state in OUT/.work records the format and layout it was made for: an older packer's (other sample
    keys, no too_large check) or another layout's is refused rather than mixed with this one's.
    """
    from pack.format import MANIFEST_VERSION, Manifest, ShardError
    from pack.packer import WORK

    saved = out / WORK / "params.json"
    if Manifest.path(out).is_file():
        try:
            manifest = Manifest.read(out)
        except ShardError as e:
            raise UsageError(f"{e}; OUT holds it, so choose another --out or remove it") from None
        if manifest.version != MANIFEST_VERSION:
            raise UsageError(f"{out} holds shards of an older packer (format version {manifest.version}, this one "
                             f"writes {MANIFEST_VERSION} with other sample keys); choose another --out, or remove it "
                             "to re-pack")
        if manifest.params != params or manifest.layout != layout:
            raise UsageError(f"{out} holds shards made with other parameters; choose another --out or remove it")
        if all((out / s.name).is_file() and (out / s.name).stat().st_size == s.bytes and (out / s.index_name).is_file()
               for split in manifest.splits.values() for s in split.shards):
            return manifest
        return None
    if saved.is_file():
        try:
            state = json.loads(saved.read_text())
        except ValueError:
            state = None
        if not isinstance(state, dict) or state.get("format") != MANIFEST_VERSION:
            raise UsageError(f"{out} holds an unfinished run of an older packer (other sample keys, no too_large "
                             f"check); remove {out} to start over, or choose another --out")
        if state.get("params") != params or state.get("layout", "imdb") != layout:
            raise UsageError(f"{out} holds an unfinished run with other parameters; choose another --out or remove it")
    elif any(out.glob("*.tar")):
        raise UsageError(f"{out} holds .tar files that no manifest describes; choose another --out")
    write_atomic(saved, json.dumps({"format": MANIFEST_VERSION, "params": params, "layout": layout}).encode())
    return None


def _refuse_other_layouts(a: argparse.Namespace, layout: str) -> None:
    """A flag that means nothing for this layout is refused, never silently ignored."""
    given = ["--" + name.replace("_", "-") for name in IMDB_ONLY if getattr(a, name) not in (None, False)]
    if a.meta is not None:
        given.append("--meta")
    if layout != "imdb" and given:
        raise UsageError(f"{' and '.join(given)} read{'s' if len(given) == 1 else ''} imdb.mat, which the {layout} "
                         f"layout does not have (drop {'it' if len(given) == 1 else 'them'})")
    if layout != "csv" and a.list_file is not None:
        raise UsageError(f"--list names the images of the csv layout, not of the {layout} one (give --layout csv, or "
                         "drop --list)")


def _pack(a: argparse.Namespace, p: Params) -> int:
    from pack.format import Manifest
    from pack.listing import read_listing
    from pack.packer import LOCK, WORK, NothingLeft, funnel_table, pack
    from pack.tarscan import IncompleteTar

    if a.layout is not None:
        _refuse_other_layouts(a, a.layout)
    listing = read_listing(a.src, a.layout, a.meta, a.list_file)
    _refuse_other_layouts(a, listing.layout)
    if listing.src != a.src:
        print(f"{PROG}: reading the images from {listing.src}")
    ensure_writable(a.out)
    if a.dry_run:
        from pack.explore import explore

        print(explore(listing, p, a.out, a.workers, progress=not a.no_progress))
        return 0
    from base.lock import FolderLock

    lock = FolderLock(a.out / LOCK, kind="pack", verb="packs into",
                      warn=lambda message: print(f"{PROG}: {message}", file=sys.stderr, flush=True))
    with lock:
        manifest = _check_out(a.out, dataclasses.asdict(p), listing.layout)
        try:
            if manifest is not None:
                print(f"{PROG}: {a.out} already holds this output; nothing to do")
            else:
                report = pack(listing, a.out, p, a.workers, progress=not a.no_progress)
                manifest, n = report.manifest, report.manifest.funnel[0]["left"]
                print(f"packed {n} listed images from {listing.origin} in {report.seconds:.1f}s: {report.checked} "
                      f"files read and checked ({report.checked / report.seconds:.0f} images/s; the rest dropped "
                      "from the list or from doomed identities)")
        except NothingLeft:
            shutil.rmtree(a.out / WORK, ignore_errors=True)  # nothing to resume: another selection starts afresh
            raise
        except IncompleteTar as e:
            raise UsageError(f"{e} (finished identities are kept in {a.out / WORK} for the re-run)") from None
        except OSError as e:
            if (message := refusal(e, a.out)) is None:
                raise
            raise UsageError(f"{message}; finished work is kept") from None
    assert isinstance(manifest, Manifest)
    print(funnel_table(manifest.funnel))
    for split, info in manifest.splits.items():
        print(f"  {split:<6} {info.samples:>8} samples {info.identities:>6} identities {len(info.shards):>4} shards")
    print(f"  outlier flags on kept images: {manifest.flags or 'none'}")
    return 0


@entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:
        from pack.verify import main as verify_main

        return verify_main(argv[1:])
    a = build_parser().parse_args(argv)
    if not a.src.exists():
        raise UsageError(f"--src {a.src} does not exist")
    if a.src.is_file() and not tarfile.is_tarfile(a.src):
        raise UsageError(f"--src {a.src} is neither a folder nor a tar")
    p = Params(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Params)})
    return _pack(a, p)


if __name__ == "__main__":
    sys.exit(main())

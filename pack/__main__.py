"""python -m pack --src SRC --out OUT [options]: filtered, pre-resized WebDataset shards from IMDb-WIKI.

SRC is an extracted `imdb_crop` folder or `imdb_crop.tar` itself (read in one sequential pass, never
extracted). See README.md for every option; `--dry-run` explores thresholds without writing shards.
`python -m pack verify --data OUT [--decode]` checks a packed output against its manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from dataclasses import asdict
from pathlib import Path

from base.cli import OneLineParser, non_negative, positive
from base.errors import UsageError, entry_point, refusal
from base.files import ensure_writable, write_atomic
from pack.format import MANIFEST_VERSION, Manifest, ShardError
from pack.images import MAX_PIXELS
from pack.meta import locate, parse_mat
from pack.packer import WORK, funnel_table, pack
from pack.selection import Params
from pack.source import is_empty
from pack.tarscan import IncompleteTar

PROG = "python -m pack"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      epilog="python -m pack verify --help: check a packed output's shards against its manifest")
    p.add_argument("--src", type=Path, required=True, help="imdb_crop folder or imdb_crop.tar")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for shards, indexes and the manifest; needs about twice the output's size free "
                        "while packing")
    p.add_argument("--meta", type=Path, default=None,
                   help="imdb.mat or imdb_meta.tar (default: imdb.mat in SRC, "
                        "else imdb/imdb.mat or imdb_meta.tar beside it)")
    p.add_argument("--size", type=positive(int), default=224, help="stored side in pixels (default 224)")
    p.add_argument("--min-size", type=non_negative(int), default=100,
                   help="drop crops with a side under this (default 100)")
    p.add_argument("--max-pixels", type=positive(int), default=MAX_PIXELS,
                   help=f"drop images whose header declares more pixels, before decoding them (default {MAX_PIXELS})")
    p.add_argument("--min-images", type=positive(int), default=50,
                   help="drop identities with fewer images (default 50)")
    p.add_argument("--min-face-score", type=float, default=None,
                   help="drop face scores under this (default: only -inf)")
    p.add_argument("--keep-second-face", action="store_true", help="keep crops where a second face was detected")
    p.add_argument("--max-images-per-identity", type=positive(int), default=None, help="cap per identity (seeded)")
    p.add_argument("--identities", type=positive(int), default=None, help="deterministic sample of N identities")
    p.add_argument("--eval-identities", type=float, default=0.1,
                   help="identities held out for eval: a fraction if < 1, else a count (default 0.1)")
    p.add_argument("--shard-samples", type=positive(int), default=None, help="samples per shard (default: ~128 MB)")
    p.add_argument("--drop-flagged", action="store_true", help="drop images flagged as outliers")
    p.add_argument("--workers", type=positive(int), default=os.cpu_count() or 1,
                   help="processes, also for --dry-run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true",
                   help="read metadata and headers only: funnel for these and nearby thresholds, OUT/explore.png")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_out(out: Path, params: dict) -> Manifest | None:
    """The manifest when OUT already holds this exact output; a UsageError when it holds anything we must not touch.

    The resume state in OUT/.work records the format it was made for: an older packer's (other sample keys,
    no too_large check) is refused rather than mixed with this one's.
    """
    ensure_writable(out)
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
        if manifest.params != params:
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
        if state.get("params") != params:
            raise UsageError(f"{out} holds an unfinished run with other parameters; choose another --out or remove it")
    elif any(out.glob("*.tar")):
        raise UsageError(f"{out} holds .tar files that no manifest describes; choose another --out")
    write_atomic(saved, json.dumps({"format": MANIFEST_VERSION, "params": params}).encode())
    return None


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
    if a.eval_identities < 0 or (a.eval_identities >= 1 and a.eval_identities != int(a.eval_identities)):
        raise UsageError("--eval-identities must be a fraction in [0, 1) or a whole count")
    if is_empty(a.src):
        raise UsageError(f"--src {a.src} holds no image files")
    data, origin = locate(a.src, a.meta)
    rows = parse_mat(data, origin)
    if not rows:
        raise UsageError(f"{origin} lists no images")
    p = Params(size=a.size, min_size=a.min_size, max_pixels=a.max_pixels, min_images=a.min_images,
               min_face_score=a.min_face_score, keep_second_face=a.keep_second_face,
               max_images_per_identity=a.max_images_per_identity, identities=a.identities,
               eval_identities=a.eval_identities, shard_samples=a.shard_samples, drop_flagged=a.drop_flagged,
               seed=a.seed)
    try:
        if a.dry_run:
            from pack.explore import explore

            ensure_writable(a.out)
            print(explore(a.src, rows, p, a.out, a.workers, progress=not a.no_progress))
            return 0
        manifest = _check_out(a.out, asdict(p))
        if manifest is not None:
            print(f"{PROG}: {a.out} already holds this output; nothing to do")
        else:
            report = pack(a.src, a.out, rows, p, a.workers, progress=not a.no_progress)
            manifest, n = report.manifest, report.manifest.funnel[0]["left"]
            print(f"packed {n} listed images from {origin} in {report.seconds:.1f}s: {report.checked} files read "
                  f"and checked ({report.checked / report.seconds:.0f} images/s; the rest dropped from the metadata "
                  "or from doomed identities)")
    except IncompleteTar as e:
        raise UsageError(f"{e} (finished identities are kept in {a.out / WORK} for the re-run)") from None
    except OSError as e:
        if refusal(e) is None:
            raise
        raise UsageError(f"{refusal(e, a.out)}; finished work is kept") from None
    print(funnel_table(manifest.funnel))
    for split, info in manifest.splits.items():
        print(f"  {split:<6} {info.samples:>8} samples {info.identities:>6} identities {len(info.shards):>4} shards")
    print(f"  outlier flags on kept images: {manifest.flags or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

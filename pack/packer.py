"""The packer's stages, in the order data flows: list (pack/listing.py) -> select -> read and check -> decide ->
shard -> manifest.

Per-identity results are cached under OUT/.work (written atomically), so a killed run resumes where
it stopped and still writes the same bytes as an uninterrupted one. OUT needs about twice the final
size while packing: the spools in OUT/.work hold every kept image until the shards are written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from base.errors import UsageError
from base.files import PARTIAL, write_atomic
from pack.format import Manifest, ShardInfo, SplitInfo, encode_label, member_name, sample_keys
from pack.images import check
from pack.listing import Listing, Row
from pack.meta import finite_or_none
from pack.selection import REASONS, Params, cap, select_metadata, split_identities
from pack.shards import Sample, tar_bytes, write_shard
from pack.source import Job, folder_jobs, tar_jobs

WORK = ".work"
LOCK = ".lock.json"
"""OUT's lock (base/lock.py): one pack writes into an OUT at a time. Released at the end; a killed run's is taken
over by the next run."""
TARGET_SHARD_BYTES = 128 * 2**20
STORED_BYTES_PER_PIXEL = 0.5
"""Expected bytes of a stored image (baseline JPEG, quality 95) per pixel of its --size square, for the
free-space check before reading. Measured at 224 px with `pack.images.resize_square`: 0.52 on scikit-image's
`astronaut` portrait, 0.48 on its `coffee` and `chelsea` photographs, 0.22 on the synthetic faces."""
MEMBER_HEADER_BYTES = 3 * tarfile.BLOCKSIZE + 400
"""A sample's three tar headers, its cls and json, before block padding."""


class NotEnoughSpace(UsageError):
    """OUT's disk cannot hold what the run is about to write; the message says how much, in one line."""


class NothingLeft(UsageError):
    """The selection keeps no image; the message names the step that dropped the last ones and what to change."""


HINTS = {
    "no_face": "imdb.mat found no face in them (--min-face-score drops more)",
    "second_face": "imdb.mat found a second face in each (--keep-second-face keeps them)",
    "missing": "none of the listed files is there: is --src the folder the list's paths are relative to?",
    "too_small": "lower --min-size",
    "too_large": "raise --max-pixels",
    "corrupt": "no file decodes as an image",
    "flagged": "pack without --drop-flagged",
    "few_images": "no identity has --min-images {min_images} images left; lower --min-images",
}


def nothing_left(steps: list[dict], p: Params) -> NothingLeft:
    """Which step dropped the last images, from the funnel, in one line."""
    last = next((s for s in reversed(steps) if s["dropped"]), steps[0])
    if last["step"] == "listed":
        return NothingLeft("the source lists no images")
    hint = HINTS.get(last["step"], "").format(min_images=p.min_images)
    return NothingLeft(f"no image is left to pack: {last['step']} dropped the last {last['dropped']} of "
                       f"{steps[0]['left']} listed ({hint})")


_SAFE_SPOOL = re.compile(r"[a-z0-9_-]{1,100}")


def spool_name(identity: str) -> str:
    """The file name of an identity's spool in OUT/.work: the identity itself when it is short, lower-case ASCII
    (nm ids, numeric folders), else a hash of it (any name is safe, even on a case-insensitive disk)."""
    if _SAFE_SPOOL.fullmatch(identity):
        return identity
    return "@" + hashlib.sha256(identity.encode()).hexdigest()[:24]


@dataclass
class PackReport:
    manifest: Manifest
    seconds: float
    checked: int
    """Files read and checked, by this run or by the killed one it resumed."""


def process_identity(job: Job, p: Params, work: Path) -> dict:
    """Read and check one identity's candidates in path order; spool the kept JPEGs to OUT/.work."""
    results, spool, kept = [], io.BytesIO(), 0
    n = len(job.rows)
    for k, row in enumerate(job.rows):
        if kept + (n - k) < p.min_images:  # cannot reach --min-images: read nothing more
            results += [{"path": r.path, "reason": "few_images", "detail": "identity can no longer reach --min-images"}
                        for r in job.rows[k:]]
            break
        data = job.read(row.path)
        c = check(data, p.size, p.min_size, p.max_pixels)
        entry = {"path": row.path, "reason": c.reason, "detail": c.detail, "w": c.width, "h": c.height,
                 "flags": c.flags}
        if c.reason is None and p.drop_flagged and c.flags:
            entry.update(reason="flagged", detail=",".join(c.flags))
        if entry["reason"] is None:
            kept += 1
            entry.update(sha256=hashlib.sha256(data).hexdigest(), offset=spool.tell(), length=len(c.jpeg))
            spool.write(c.jpeg)
        results.append(entry)
    spool_file = spool_name(job.identity)
    write_atomic(work / f"{spool_file}.bin", spool.getvalue())
    record = {"identity": job.identity, "images": results}
    write_atomic(work / f"{spool_file}.json", json.dumps(record).encode())
    return record


def _worker(args: tuple[Job, Params, Path]) -> tuple[str, dict]:
    return args[0].identity, process_identity(*args)


def _cached(work: Path, identity: str, rows: list[Row]) -> dict | None:
    """A finished identity's record from a killed run, if it checked exactly these files (the tree or the list may
    have changed since)."""
    name = spool_name(identity)
    try:
        if not (work / f"{name}.bin").is_file():
            return None
        record = json.loads((work / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    images = record.get("images") if isinstance(record, dict) else None
    if not isinstance(images, list) or [e.get("path") for e in images] != [r.path for r in rows]:
        return None
    return record


def read_and_check(listing: Listing, groups: dict[str, list[Row]], p: Params, work: Path, workers: int,
                   progress: bool = True) -> dict[str, dict]:
    """Every identity's record, from the cache where a previous run finished it, else computed now."""
    records: dict[str, dict] = {}
    for identity, rows in groups.items():
        if (record := _cached(work, identity, rows)) is not None:
            records[identity] = record
    todo = {identity: rows for identity, rows in groups.items() if identity not in records}
    total = sum(len(r) for r in todo.values())
    bar = tqdm(total=total, unit="img", desc="pack", disable=not progress, smoothing=0.05)
    src = listing.src
    window = threading.Semaphore(4 * workers) if src.is_file() else None
    jobs = tar_jobs(src, todo, window, listing.strip) if window else folder_jobs(src, todo)
    args = ((job, p, work) for job in jobs)

    def done(result: tuple[str, dict]) -> None:
        identity, record = result
        records[identity] = record
        if window:
            window.release()
        bar.update(len(record["images"]))

    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            for record in pool.imap_unordered(_worker, args, chunksize=1):
                done(record)
    else:
        for a in args:
            done(_worker(a))
    bar.close()
    return records


def decide(groups: dict[str, list[Row]], records: dict[str, dict], p: Params) -> dict[str, dict]:
    """Final reason per candidate: duplicates flagged (or dropped), few_images, capped."""
    final = {e["path"]: e for nm in groups for e in records[nm]["images"]}
    first_of: dict[str, str] = {}
    for path in sorted(final):
        e = final[path]
        if e["reason"] is None:
            if e["sha256"] in first_of:
                e["flags"] = [*e["flags"], "duplicate"]
                if p.drop_flagged:
                    e.update(reason="flagged", detail=f"duplicate of {first_of[e['sha256']]}")
            else:
                first_of[e["sha256"]] = path
    for nm, rows in groups.items():
        alive = [r.path for r in rows if final[r.path]["reason"] is None]
        if len(alive) < p.min_images:
            for path in alive:
                final[path].update(reason="few_images", detail=f"{len(alive)} images left after checks")
            continue
        keep = cap(alive, p.max_images_per_identity, p.seed, nm)
        for path in alive:
            if path not in keep:
                final[path].update(reason="capped", detail=f"--max-images-per-identity {p.max_images_per_identity}")
    return final


def funnel(n_listed: int, reasons: list[str]) -> list[dict]:
    counts = {r: 0 for r in REASONS}
    for r in reasons:
        counts[r] += 1
    left, steps = n_listed, [{"step": "listed", "dropped": 0, "left": n_listed}]
    for r in REASONS:
        left -= counts[r]
        steps.append({"step": r, "dropped": counts[r], "left": left})
    return steps


def funnel_table(steps: list[dict]) -> str:
    lines = [f"  {'step':<14}{'dropped':>10}{'left':>10}"]
    lines += [f"  {s['step']:<14}{s['dropped']:>10}{s['left']:>10}" for s in steps]
    return "\n".join(lines)


def _sample_json(layout: str, row: Row, e: dict) -> bytes:
    """The sample's json: what the source says of the image, its size before resizing, its outlier flags."""
    if layout != "imdb":
        return json.dumps({"path": row.path, "identity": row.identity, "src_width": e["w"], "src_height": e["h"],
                           "flags": e["flags"]}, sort_keys=True).encode()
    return json.dumps({
        "path": row.path, "nm_id": row.identity, "name": row.name, "face_score": finite_or_none(row.face_score),
        "second_face_score": finite_or_none(row.second_face_score), "src_width": e["w"], "src_height": e["h"],
        "photo_taken": row.photo_taken, "dob": row.dob, "gender": finite_or_none(row.gender), "flags": e["flags"],
    }, sort_keys=True).encode()


ShardJob = tuple[Path, Path, list[tuple[str, str, int, int, bytes, bytes]]]
"""(shard path, spool folder, [(key, spool name, offset, length, cls, json)]) — all a worker needs to write it."""


def split_shards(out: Path, split: str, items: list[tuple[Row, dict, int]], work: Path, p: Params,
                 shard_samples: int, keys: dict[str, str], layout: str) -> list[ShardJob]:
    """Globally shuffle (seeded) and cut into shards of `shard_samples`; the last may be shorter."""
    items = sorted(items, key=lambda it: it[0].path)
    order = np.random.default_rng([p.seed, 0 if split == "train" else 1]).permutation(len(items))
    jobs = []
    for s, start in enumerate(range(0, len(order), shard_samples)):
        entries = []
        for i in order[start:start + shard_samples]:
            row, e, cls = items[i]
            entries.append((keys[row.path], spool_name(row.identity), e["offset"], e["length"], encode_label(cls),
                            _sample_json(layout, row, e)))
        jobs.append((out / f"{split}-{s:06d}.tar", work, entries))
    return jobs


def shard_bytes(job: ShardJob) -> int:
    """The exact size `write_shard` will give this shard, known before any spool is read."""
    _, _, entries = job
    return tar_bytes((member_name(key, ext), size) for key, _, _, length, cls, meta in entries
                     for ext, size in (("cls", len(cls)), ("jpg", length), ("json", len(meta))))


def ensure_space(out: Path, need: int, what: str) -> None:
    """NotEnoughSpace unless OUT's disk has `need` bytes free."""
    free = shutil.disk_usage(out).free
    if need > free:
        raise NotEnoughSpace(f"{out} needs about {need / 1e9:.2f} GB more disk for {what} and has {free / 1e9:.2f} "
                             "GB free (free some space or choose another --out; finished work is kept)")


def _bytes_in(paths: list[Path]) -> int:
    return sum(f.stat().st_size for f in paths if f.is_file())


def _write_shard_job(job: ShardJob) -> ShardInfo:
    path, work, entries = job
    with _Spools(work) as spools:
        samples = [Sample(key, [("cls", cls), ("jpg", spools.read(spool, offset, length)), ("json", meta)])
                   for key, spool, offset, length, cls, meta in entries]
    return write_shard(path, samples)


def write_shards(jobs: list[ShardJob], workers: int) -> list[ShardInfo]:
    """Write the shards, several at once: each holds one shard (about 2 x 128 MB) in memory."""
    if workers > 1 and len(jobs) > 1:
        with get_context("fork").Pool(min(workers, len(jobs))) as pool:
            return pool.map(_write_shard_job, jobs, chunksize=1)
    return [_write_shard_job(job) for job in jobs]


class _Spools:
    """Random reads from the per-identity spools in OUT/.work, keeping the most recent files open.

    The global shuffle visits identities in random order; opening a file per sample cost ~30 us each.
    """

    def __init__(self, work: Path, keep_open: int = 256) -> None:
        self.work, self.keep_open = work, keep_open
        self.fds: dict[str, int] = {}

    def read(self, spool: str, offset: int, length: int) -> bytes:
        fd = self.fds.pop(spool, None)
        if fd is None:
            if len(self.fds) >= self.keep_open:
                os.close(self.fds.pop(next(iter(self.fds))))
            fd = os.open(self.work / f"{spool}.bin", os.O_RDONLY)
        self.fds[spool] = fd  # re-inserted: the dict's order is least recently used first
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise OSError(f"{self.work / f'{spool}.bin'}: short read at {offset} ({len(data)} of {length} bytes)")
        return data

    def __enter__(self) -> _Spools:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            os.close(fd)


def pack(listing: Listing, out: Path, p: Params, workers: int, progress: bool = True) -> PackReport:
    """Run every stage and write OUT. Raises NotEnoughSpace before a stage whose output would not fit, and NothingLeft
    when the selection keeps no image; lets OSError (a full disk) and IncompleteTar (a cut-off tar) through: every
    finished identity and shard is kept, and the same call resumes."""
    t0 = time.perf_counter()
    rows = listing.rows
    groups, rejected = select_metadata(rows, p)
    if not groups:
        raise nothing_left(funnel(len(rows), [reason for reason, _ in rejected.values()]), p)
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    for leftover in [*out.glob("*" + PARTIAL), *work.glob("*" + PARTIAL)]:  # a killed run's half-written files
        if not leftover.name.startswith(LOCK):
            leftover.unlink()
    candidates = sum(len(g) for g in groups.values())
    expected = candidates * (STORED_BYTES_PER_PIXEL * p.size**2 + MEMBER_HEADER_BYTES)
    ensure_space(out, int(2 * expected) - _bytes_in([*work.glob("*.bin"), *out.glob("*.tar")]),
                 f"the spools and shards of up to {candidates} images (about twice the output)")
    records = read_and_check(listing, groups, p, work, workers, progress)
    final = decide(groups, records, p)
    for path, (reason, detail) in rejected.items():
        final[path] = {"reason": reason, "detail": detail}
    steps = funnel(len(rows), [e["reason"] for e in final.values() if e["reason"] is not None])
    if steps[-1]["left"] == 0:
        read = [e for identity in groups for e in records[identity]["images"] if "w" in e]
        if read and all(e["reason"] == "missing" for e in read):
            raise NothingLeft(f"none of the {len(read)} listed files looked for is in {listing.src}: is --src the "
                              "folder the list's paths are relative to?")
        raise nothing_left(steps, p)

    by_path = {r.path: r for r in rows}
    keys = sample_keys(by_path)
    kept_ids = sorted({by_path[path].identity for path, e in final.items() if e["reason"] is None})
    cls_of = {identity: i for i, identity in enumerate(kept_ids)}
    eval_ids = split_identities(kept_ids, p.eval_identities)
    items: dict[str, list] = {"train": [], "eval": []}
    for path, e in final.items():
        if e["reason"] is None:
            row = by_path[path]
            items["eval" if row.identity in eval_ids else "train"].append((row, e, cls_of[row.identity]))
    kept = [e for e in final.values() if e["reason"] is None]
    mean_bytes = np.mean([e["length"] for e in kept]) + 1536
    shard_samples = p.shard_samples or max(1, int(TARGET_SHARD_BYTES // mean_bytes))
    jobs = {split: split_shards(out, split, items[split], work, p, shard_samples, keys, listing.layout)
            for split in ("train", "eval")}
    ensure_space(out, sum(map(shard_bytes, jobs["train"] + jobs["eval"])) - _bytes_in(list(out.glob("*.tar"))),
                 f"{len(jobs['train']) + len(jobs['eval'])} shards")
    written = iter(write_shards(jobs["train"] + jobs["eval"], workers))
    splits = {}
    for split in ("train", "eval"):
        splits[split] = SplitInfo(len(items[split]), len({r.identity for r, _, _ in items[split]}),
                                  [next(written) for _ in jobs[split]])

    counts = {identity: 0 for identity in kept_ids}
    for e in kept:
        counts[by_path[e["path"]].identity] += 1
    split_of = {identity: "eval" if identity in eval_ids else "train" for identity in kept_ids}
    if listing.layout == "imdb":
        names = {r.identity: r.name for r in rows if r.name}
        _write_csv(out / "identities.csv", ["cls", "nm_id", "name", "split", "images"],
                   [[cls_of[nm], nm, names.get(nm, ""), split_of[nm], counts[nm]] for nm in kept_ids])
    else:
        _write_csv(out / "identities.csv", ["cls", "identity", "split", "images"],
                   [[cls_of[i], i, split_of[i], counts[i]] for i in kept_ids])
    _write_csv(out / "rejects.csv", ["path", "reason", "detail"],
               [[path, final[path]["reason"], final[path]["detail"]] for path in sorted(final)
                if final[path]["reason"] is not None])

    flag_counts: dict[str, int] = {}
    for e in kept:
        for fl in e["flags"]:
            flag_counts[fl] = flag_counts.get(fl, 0) + 1
    manifest = Manifest(image_size=p.size, num_classes=len(kept_ids), splits=splits, params=asdict(p),
                        shard_samples=shard_samples, funnel=steps, flags=dict(sorted(flag_counts.items())),
                        layout=listing.layout, identities=kept_ids)
    manifest.write(out)
    shutil.rmtree(work)
    checked = sum("w" in e for identity in groups for e in records[identity]["images"])
    return PackReport(manifest, time.perf_counter() - t0, checked)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    write_atomic(path, buf.getvalue().encode())

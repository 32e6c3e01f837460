"""Small packed datasets written directly (no packer run), for loader tests that need known pixels."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pack.format import Manifest, SplitInfo, encode_label, parse_index
from pack.shards import Sample, write_shard

from .harness import wait_for


def file_tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path, with its bytes: for "byte-identical output" comparisons."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_split(root: Path, images: list[np.ndarray], labels: list[int], split: str = "train",
                per_shard: int = 50) -> None:
    """Shards + indexes + a manifest in the packer's format for HxWx3 uint8 `images`."""
    root.mkdir(parents=True, exist_ok=True)
    if Manifest.path(root).exists():
        manifest = Manifest.read(root)
    else:
        manifest = Manifest(image_size=images[0].shape[0], num_classes=0, splits={})
    shards = []
    for s, start in enumerate(range(0, len(images), per_shard)):
        samples = []
        for i in range(start, min(len(images), start + per_shard)):
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, "JPEG", quality=95)
            key = f"{split}_{i:06d}"
            samples.append(Sample(key, [("cls", encode_label(labels[i])), ("jpg", buf.getvalue()),
                                        ("json", json.dumps({"path": key}).encode())]))
        shards.append(write_shard(root / f"{split}-{s:06d}.tar", samples))
    manifest.splits[split] = SplitInfo(len(images), len(set(labels)), shards)
    manifest.num_classes = max(manifest.num_classes, max(labels) + 1)
    manifest.write(root)


def ramp_image(size: int = 96) -> np.ndarray:
    """R grows with x, G with y, B constant: a view's R and G ranges give its crop, R's direction its flip."""
    x = np.linspace(0, 255, size)
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = x[None, :]
    img[..., 1] = x[:, None]
    img[..., 2] = 128
    return img


def checker_image(size: int = 96, cell: int = 2, seed: int = 0) -> np.ndarray:
    """Fine colour checkerboard of one contrast (cells differ by 70 per channel), random base colour:
    blur removes its high frequencies, jitter moves its colours."""
    rng = np.random.default_rng(seed)
    c0 = rng.integers(40, 146, 3)
    c1 = c0 + 70
    yy, xx = np.mgrid[:size, :size]
    board = ((yy // cell + xx // cell) % 2).astype(bool)
    return np.where(board[..., None], c0, c1).astype(np.uint8)


def checker_split(root: Path, count: int, identities: int, split: str = "train", per_shard: int = 50,
                  seed: int = 0) -> Path:
    """`count` 32 px checkerboards of four cell sizes, image i of identity i % `identities`, as a packed split:
    the small training and scoring sets the tests of the trainer, benches and launchers share."""
    write_split(root, [checker_image(32, cell=2 + i % 4, seed=seed + i) for i in range(count)],
                [i % identities for i in range(count)], split, per_shard)
    return root


def jpg_members(root: Path, shard: str) -> list[tuple[str, int, int]]:
    """(key, offset, size) of every jpg in a shard, from its index."""
    text = (root / shard).with_suffix(".idx").read_text()
    return [(key, m.offset, m.size) for key, ms in parse_index(text, shard) for m in ms if m.ext == "jpg"]


def flip_inside_every_jpeg(root: Path, shard: str, n: int = 48) -> None:
    """The lowest bit of `n` bytes flipped in the middle of each JPEG of the shard, sparing the bytes that mark
    or escape markers (0xFF, 0x00, 0xFE): size unchanged, the pixels change, the images still decode."""
    with open(root / shard, "r+b") as f:
        for _, offset, size in jpg_members(root, shard):
            f.seek(offset + size // 2)
            chunk = f.read(n)
            f.seek(offset + size // 2)
            f.write(bytes(b if b in (0x00, 0xFE, 0xFF) else b ^ 1 for b in chunk))


def zero_header(root: Path, shard: str, which: list[int]) -> list[str]:
    """Zero the first 64 bytes (SOI, APP0, the start of the tables) of some JPEGs; their keys."""
    members = jpg_members(root, shard)
    with open(root / shard, "r+b") as f:
        for i in which:
            f.seek(members[i][1])
            f.write(bytes(64))
    return [members[i][0] for i in which]


HOLD_AFTER = """import itertools, runpy, sys, time
from pathlib import Path
import pack.packer as packer
finished, held, calls, real = int(sys.argv[1]), Path(sys.argv[2]), itertools.count(1), packer.process_identity
def process_identity(*args, **kwargs):
    record = real(*args, **kwargs)
    if next(calls) == finished:
        held.touch()
        time.sleep(600)
    return record
packer.process_identity = process_identity
sys.argv[:3] = ["python -m pack"]
runpy.run_module("pack", run_name="__main__", alter_sys=True)
"""
"""`python -m pack ARGS` that stops for ten minutes once its `finished`-th identity is in OUT/.work and touches
`held`: a kill then finds the pack part-way on any machine. Following the files alone raced the pack's end (the rest
of a 12-identity pack took 0.2 s here)."""


def kill_mid_pack(args: list[str], out: Path, finished: int) -> None:
    """Run `python -m pack ARGS` (with `--workers 1`: the identities in turn, in that process) in a session of its
    own until `finished` identities are done, then kill -9 the whole session, as an out-of-memory killer or a lost
    node would."""
    held, log = out.parent / f"{out.name}.held", out.parent / f"{out.name}.stderr"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_AFTER, str(finished), str(held), *args],
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        wait_for(lambda: held.exists() or proc.poll() is not None, 300, f"{finished} identities to be packed",
                 every=0.02)
        assert proc.poll() is None, f"the pack ended before {finished} identities: {log.read_text()[-2000:]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

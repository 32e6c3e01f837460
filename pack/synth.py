"""A synthetic IMDb-WIKI download: the real layout, the real metadata format, the real dirt.

    python -m pack.synth --out DIR [--identities 120] [--seed 0] [--tar] [--workers N] [--layout folders]

writes `DIR/imdb_crop/NN/nm..._rm..._<dob>_<year>.jpg`, `DIR/imdb_crop/imdb.mat`,
`DIR/imdb/imdb.mat` (the real structure: docs/data-format.md), with `--tar` also the two
tars as downloaded, and `DIR/synth_truth.json`: each listed path's identity and the
dirt injected into it, so tests of later stages can assert exact outcomes.
The same arguments give the same bytes, whatever `--workers`.

`--layout folders` writes the same faces, with the same dirt and the same bytes, one folder per identity as
CASIA-WebFace and VGGFace2 come: `DIR/faces/<nm id>/<file name>` (with `--tar`, `DIR/faces.tar` of that
tree) and no imdb.mat. Without metadata, no_face and second_face images are files like any other, and a
missing image is simply not there.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

from base.cli import OneLineParser, positive
from base.errors import UsageError, entry_point, refusal
from base.files import atomic_path, ensure_writable, write_atomic
from pack.faces import Traits, add_streaks, background, make_traits, render

PROG = "python -m pack.synth"
LAYOUTS = ("imdb", "folders")
FOLDERS_ROOT = "faces"
"""`--layout folders` writes DIR/faces/<identity>/<file>."""
TRUTH = "synth_truth.json"
MARKER = ".synth-args.json"
MAT_HEADER = "MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: faceclr pack.synth"
TAR_MTIME = 1453030227  # 2016-01-17, when the real imdb.mat was written

DIRT_RATES = {
    "no_face": 0.05,
    "second_face": 0.12,
    "too_small": 0.08,
    "truncated": 0.004,
    "zero_byte": 0.002,
    "not_image": 0.002,
    "png_as_jpg": 0.004,
    "cmyk": 0.004,
    "grayscale": 0.03,
    "progressive": 0.04,
    "exif_rotated": 0.01,
    "streaks": 0.015,
    "missing": 0.004,
    "duplicate": 0.006,
}
"""Share of listed images given each kind of dirt (at most one kind per image)."""

CORRUPT_DIRT = ("truncated", "zero_byte", "not_image")
"""Files that no decoder can read in full."""


@dataclass
class SynthConfig:
    """Everything that decides the bytes written; saved in the truth file."""

    identities: int = 120
    seed: int = 0
    median_images: float = 25.0
    """Median images per identity; the count is log-normal, so a few identities have far more."""
    dirt: dict[str, float] = field(default_factory=lambda: dict(DIRT_RATES))


@dataclass
class ImagePlan:
    full_path: str
    rm_id: int
    photo_taken: int
    dirt: str | None
    width: int
    height: int
    name_empty: bool
    duplicate_of: int | None = None


@dataclass
class IdentityPlan:
    index: int
    nm_id: int
    name: str
    celeb_id: int
    dob: int
    gender: float
    traits: Traits
    second: Traits
    images: list[ImagePlan]


def _serial(d: date) -> int:
    """MATLAB serial date number, as in the `dob` field."""
    return d.toordinal() + 366


def _name(rng: np.random.Generator) -> str:
    syl = ["ka", "lo", "mi", "ren", "sa", "tor", "vel", "an", "dri", "el", "jo", "ma", "ri", "son", "ber", "ty",
           "na", "cel", "wen", "os"]
    part = lambda n: "".join(syl[i] for i in rng.integers(len(syl), size=n)).capitalize()
    return f"{part(int(rng.integers(1, 3)))} {part(int(rng.integers(2, 4)))}"


def _crop_size(rng: np.random.Generator, small: bool) -> tuple[int, int]:
    side = int(rng.uniform(60, 99)) if small else int(np.clip(rng.lognormal(np.log(260), 0.35), 100, 600))
    if rng.random() < 0.15:  # crops cut by the photo's border are not square
        other = max(40 if small else 100, int(side * rng.uniform(0.7, 0.98)))
        return (side, other) if rng.random() < 0.5 else (other, side)
    return side, side


def plan(cfg: SynthConfig) -> list[IdentityPlan]:
    """Decide every identity and image up front, so workers only render."""
    rng = np.random.default_rng(cfg.seed)
    nm_ids = rng.choice(np.arange(1, 9_000_000), size=cfg.identities, replace=False)
    nm_ids.sort()
    names: list[str] = []
    while len(names) < cfg.identities:
        n = _name(rng)
        if n not in names:
            names.append(n)
    celeb_names = sorted(names)
    kinds = list(cfg.dirt)
    probs = np.array([cfg.dirt[k] for k in kinds], dtype=float)
    if probs.sum() > 1:
        raise ValueError(f"dirt rates add up to {probs.sum():.3f} > 1")
    cum = np.cumsum(probs)
    traits = [make_traits(rng) for _ in range(cfg.identities)]
    used_rm: set[int] = set()
    out = []
    for i in range(cfg.identities):
        born = date(int(rng.integers(1920, 1996)), int(rng.integers(1, 13)), int(rng.integers(1, 29)))
        garbage_dob = rng.random() < 0.03
        if garbage_dob:  # the real set has ages below 0 and above 100
            born = date(int(rng.choice([1800, 1850, 2020, 2029])), int(rng.integers(1, 13)), int(rng.integers(1, 29)))
        gender = float("nan") if rng.random() < 0.05 else float(rng.integers(2))
        n = int(np.clip(round(rng.lognormal(np.log(cfg.median_images), 0.9)), 1, 60 * cfg.median_images))
        images = []
        for _ in range(n):
            rm = int(rng.integers(10_000_000, 4_000_000_000))
            while rm in used_rm:
                rm = int(rng.integers(10_000_000, 4_000_000_000))
            used_rm.add(rm)
            lo = born.year + 15 if not garbage_dob else 1960
            year = int(rng.integers(min(lo, 2014), min(max(lo + 1, born.year + 80), 2016)))
            u = rng.random()
            dirt = kinds[int(np.searchsorted(cum, u, side="right"))] if len(cum) and u < cum[-1] else None
            w, h = (1, 1) if dirt == "no_face" and rng.random() < 0.85 else _crop_size(rng, dirt == "too_small")
            path = f"{nm_ids[i] % 100:02d}/nm{nm_ids[i]:07d}_rm{rm}_{born.year}-{born.month}-{born.day}_{year}.jpg"
            images.append(ImagePlan(path, rm, year, dirt, w, h, name_empty=bool(rng.random() < 0.01)))
        images.sort(key=lambda im: im.full_path)
        clean = [k for k, im in enumerate(images) if im.dirt is None]
        for im in images:
            if im.dirt == "duplicate":
                if not clean:
                    im.dirt = None
                    continue
                im.duplicate_of = int(rng.choice(clean))
                im.width, im.height = images[im.duplicate_of].width, images[im.duplicate_of].height
        other = traits[(i + 1 + int(rng.integers(cfg.identities - 1 or 1))) % cfg.identities]
        out.append(IdentityPlan(i, int(nm_ids[i]), names[i], celeb_names.index(names[i]) + 1, _serial(born),
                                gender, traits[i], other, images))
    return out


def _jpeg(img: Image.Image, quality: int, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


EXIF_STORE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
"""How to store an upright image so that applying its EXIF orientation makes it upright again."""


def _encode(ident: IdentityPlan, im: ImagePlan, rng: np.random.Generator) -> bytes:
    """The file's bytes: a rendered face, then this image's dirt."""
    quality = int(rng.integers(60, 96))
    if im.dirt == "no_face":
        if im.width == 1:
            return _jpeg(Image.new("RGB", (1, 1), tuple(int(v) for v in rng.integers(0, 256, 3))), 90)
        return _jpeg(background(rng, 256).resize((im.width, im.height)), quality)
    img = render(ident.traits, rng, im.width, im.height, second=ident.second if im.dirt == "second_face" else None)
    match im.dirt:
        case "zero_byte":
            return b""
        case "not_image":
            return b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body></body></html>\n"
        case "truncated":
            data = _jpeg(img, quality)
            return data[: int(len(data) * rng.uniform(0.2, 0.8))]
        case "png_as_jpg":
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue()
        case "cmyk":
            return _jpeg(img.convert("CMYK"), quality)
        case "grayscale":
            return _jpeg(img.convert("L"), quality)
        case "progressive":
            return _jpeg(img, quality, progressive=True)
        case "exif_rotated":
            orientation = int(rng.choice(list(EXIF_STORE)))
            exif = Image.Exif()
            exif[0x0112] = orientation
            return _jpeg(img.transpose(EXIF_STORE[orientation]), quality, exif=exif.tobytes())
        case "streaks":
            return _jpeg(add_streaks(img, rng), quality)
    return _jpeg(img, quality)


def _face_location(im: ImagePlan, rng: np.random.Generator, face_found: bool) -> np.ndarray:
    """`[x1 y1 x2 y2]` in the uncropped photo, 1-based; dtype varies per row as in the real file."""
    if not face_found:
        return np.array([[1.0, 1.0, float(im.width), float(im.height)]])
    fw = im.width / 1.8
    x1, y1 = rng.uniform(1, 900, 2)
    box = np.array([[x1, y1, x1 + fw, y1 + fw * rng.uniform(0.95, 1.05)]])
    kind = rng.random()
    if kind < 0.06 and box.max() < 250:
        return np.round(box).astype(np.uint8)
    if kind < 0.12:
        return np.round(box).astype(np.uint16)
    return box


def layout_path(im: ImagePlan, ident: IdentityPlan, layout: str) -> str:
    """Where an image lies under the layout's root: imdb.mat's `full_path`, or `<nm id>/<file name>`."""
    if layout == "imdb":
        return im.full_path
    return f"nm{ident.nm_id:07d}/{im.full_path.rsplit('/', 1)[-1]}"


def _render_identity(job: tuple[SynthConfig, str, IdentityPlan, str]) -> list[dict]:
    """Write one identity's files; return its metadata rows in path order."""
    cfg, root, ident, layout = job
    crop = Path(root) / ("imdb_crop" if layout == "imdb" else FOLDERS_ROOT)
    written: dict[int, bytes] = {}
    rows = []
    order = sorted(range(len(ident.images)), key=lambda k: ident.images[k].dirt == "duplicate")
    for k in order:
        im = ident.images[k]
        rng = np.random.default_rng([cfg.seed, ident.index, k])
        face_found = im.dirt != "no_face"
        face_score = float(np.clip(rng.normal(3.2, 1.0), 0.3, 7.0)) if face_found else -np.inf
        second = float(face_score * rng.uniform(0.3, 0.95)) if im.dirt == "second_face" else np.nan
        if im.dirt == "duplicate":
            data = written[im.duplicate_of]
        elif im.dirt != "missing":
            data = _encode(ident, im, rng)
        if im.dirt != "missing":
            written[k] = data
            file = crop / layout_path(im, ident, layout)
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(data)
        rows.append({
            "k": k, "full_path": im.full_path, "dob": ident.dob, "photo_taken": im.photo_taken,
            "gender": ident.gender, "name": "" if im.name_empty else ident.name,
            "face_location": _face_location(im, rng, face_found), "face_score": face_score,
            "second_face_score": second, "celeb_id": ident.celeb_id,
        })
    rows.sort(key=lambda r: r["k"])
    return rows


def _cell(values: list) -> np.ndarray:
    """A MATLAB cell row: scipy writes each str as a char array, each array as itself."""
    arr = np.empty((1, len(values)), dtype=object)
    for i, v in enumerate(values):
        arr[0, i] = v
    return arr


def mat_bytes(rows: list[dict], celeb_names: list[str]) -> bytes:
    """`imdb.mat` as MATLAB v5 with the ten fields in the real order and dtypes."""
    col = lambda key, dtype: np.array([[r[key] for r in rows]], dtype=dtype)
    imdb = {
        "dob": col("dob", np.int32),
        "photo_taken": col("photo_taken", np.uint16),
        "full_path": _cell([r["full_path"] for r in rows]),
        "gender": col("gender", np.float64),
        "name": _cell([r["name"] for r in rows]),
        "face_location": _cell([r["face_location"] for r in rows]),
        "face_score": col("face_score", np.float64),
        "second_face_score": col("second_face_score", np.float64),
        "celeb_names": _cell(celeb_names),
        "celeb_id": col("celeb_id", np.uint16),
    }
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"imdb": imdb}, format="5", do_compression=True, oned_as="row")
    data = bytearray(buf.getvalue())
    data[:116] = MAT_HEADER.encode().ljust(116, b" ")  # scipy stamps the current time: keep bytes reproducible
    return bytes(data)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes | None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = TAR_MTIME, 0, 0, "", ""
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))


def _tar_tree(root: Path, top: str, name: str, extra: list[tuple[str, bytes]] = ()) -> None:
    """`root/name`: the folder `root/top` as `tar cf name top` stores it (folders, then their files, sorted), then
    `extra` members; written through a temp name."""
    with atomic_path(root / name) as tmp, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        _tar_add(tar, f"{top}/", None)
        for d in sorted(p for p in (root / top).iterdir() if p.is_dir()):
            _tar_add(tar, f"{top}/{d.name}/", None)
            for f in sorted(d.iterdir()):
                _tar_add(tar, f"{top}/{d.name}/{f.name}", f.read_bytes())
        for member, data in extra:
            _tar_add(tar, member, data)


def write_tars(root: Path, layout: str = "imdb") -> None:
    """`imdb_crop.tar` and `imdb_meta.tar` with the members the real downloads have; for the folders layout,
    `faces.tar` of the tree."""
    if layout != "imdb":
        _tar_tree(root, FOLDERS_ROOT, f"{FOLDERS_ROOT}.tar")
        return
    for top, name in (("imdb_crop", "imdb_crop.tar"), ("imdb", "imdb_meta.tar")):
        _tar_tree(root, top, name, [(f"{top}/imdb.mat", (root / top / "imdb.mat").read_bytes())])


def truth_entries(idents: list[IdentityPlan], layout: str = "imdb") -> dict[str, dict]:
    """What every planned image really is, by its path in the layout, for the packer's tests (`file`: False where
    the image is missing; `full_path`: its path in the imdb layout, whatever the layout)."""
    out = {}
    for ident in idents:
        for im in ident.images:
            out[layout_path(im, ident, layout)] = {
                "identity": ident.index, "nm_id": f"nm{ident.nm_id:07d}", "name": ident.name,
                "dirt": [im.dirt] if im.dirt else [], "width": im.width, "height": im.height,
                "file": im.dirt != "missing",
                "decodable": im.dirt not in (*CORRUPT_DIRT, "missing"),
                "duplicate_of": (layout_path(ident.images[im.duplicate_of], ident, layout)
                                 if im.duplicate_of is not None else None),
                **({} if layout == "imdb" else {"full_path": im.full_path}),
            }
    return out


def generate(cfg: SynthConfig, out: Path, workers: int = 1, tar: bool = False, progress: bool = True,
             layout: str = "imdb") -> dict:
    """Write the whole synthetic download into `out`, in `layout`; return the truth record."""
    t0 = time.perf_counter()
    idents = plan(cfg)
    crop = out / "imdb_crop"
    if layout == "imdb":
        for nn in range(100):
            (crop / f"{nn:02d}").mkdir(parents=True, exist_ok=True)
    else:
        (out / FOLDERS_ROOT).mkdir(parents=True, exist_ok=True)
    total = sum(len(i.images) for i in idents)
    jobs = [(cfg, str(out), ident, layout) for ident in idents]
    rows: list[dict] = []
    bar = tqdm(total=total, unit="img", desc="synth", disable=not progress)
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            for r in pool.imap(_render_identity, jobs, chunksize=1):
                rows.extend(r)
                bar.update(len(r))
    else:
        for job in jobs:
            r = _render_identity(job)
            rows.extend(r)
            bar.update(len(r))
    bar.close()
    mat = mat_bytes(rows, sorted(i.name for i in idents)) if layout == "imdb" else None
    if mat is not None:
        write_atomic(crop / "imdb.mat", mat)
        write_atomic(out / "imdb" / "imdb.mat", mat)
    if tar:
        write_tars(out, layout)
    counts = {k: 0 for k in cfg.dirt}
    for ident in idents:
        for im in ident.images:
            if im.dirt:
                counts[im.dirt] += 1
    sizes = np.array([len(i.images) for i in idents])
    truth = {
        "version": 1,
        "args": run_args(cfg, tar, layout),
        "n_images": total,
        "n_identities": len(idents),
        "dirt_counts": counts,
        "images_per_identity": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                                "max": int(sizes.max()), "at_least_50": int((sizes >= 50).sum())},
        "mat_sha256": hashlib.sha256(mat).hexdigest() if mat is not None else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "identities": [{"identity": i.index, "nm_id": f"nm{i.nm_id:07d}", "name": i.name,
                        "images": len(i.images)} for i in idents],
        "images": truth_entries(idents, layout),
    }
    write_atomic(out / TRUTH, json.dumps(truth, indent=1, sort_keys=True).encode())
    return truth


def run_args(cfg: SynthConfig, tar: bool, layout: str) -> dict:
    """What the truth file and the resume marker record of a run's arguments; the imdb layout's record is the one
    written before layouts existed, so a set made then is still reused."""
    return {**asdict(cfg), "tar": tar, **({} if layout == "imdb" else {"layout": layout})}


def summary(truth: dict, out: Path) -> str:
    """The table printed at the end of a run (and when a run is reused)."""
    ipi = truth["images_per_identity"]
    layout = truth["args"].get("layout", "imdb")
    lines = [
        f"synthetic IMDb-WIKI in {out}" if layout == "imdb" else
        f"synthetic faces in {out / FOLDERS_ROOT}, one folder per identity (no imdb.mat)",
        f"  {'identities':<22}{truth['n_identities']:>8}",
        f"  {'images listed':<22}{truth['n_images']:>8}",
        f"  {'images per identity':<22}min {ipi['min']} / median {ipi['median']:g} / max {ipi['max']}",
        f"  {'identities with >= 50':<22}{ipi['at_least_50']:>8}",
        "  dirt injected:",
    ]
    lines += [f"    {k:<20}{v:>8}" for k, v in sorted(truth["dirt_counts"].items()) if v]
    secs = truth["seconds"]
    lines.append(f"  {'time':<22}{secs:>7.1f}s ({truth['n_images'] / max(secs, 1e-9):.0f} images/s)")
    return "\n".join(lines)


def parse_dirt(text: str) -> dict[str, float]:
    """`streaks=0.05,missing=0` over the defaults."""
    rates = dict(DIRT_RATES)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in rates:
            raise argparse.ArgumentTypeError(f"unknown dirt '{key}' (known: {', '.join(rates)})")
        try:
            rates[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"dirt rate for '{key}' is not a number: '{value}'") from None
        if not 0 <= rates[key] <= 1:
            raise argparse.ArgumentTypeError(f"dirt rate for '{key}' must lie in [0, 1]")
    if sum(rates.values()) > 1:
        raise argparse.ArgumentTypeError(f"dirt rates add up to {sum(rates.values()):.3f}, more than 1")
    return rates


def _read_json(path: Path) -> dict:
    """The JSON object in `path`; {} (matching no arguments) if it is damaged."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _prepare_out(out: Path, args: dict) -> bool:
    """Make `out` ready; True when it already holds a complete set made with these arguments."""
    ensure_writable(out)
    truth = out / TRUTH
    marker = out / MARKER
    if truth.exists():
        if _read_json(truth).get("args") == args:
            return True
        raise UsageError(f"{out} holds a synthetic set made with other arguments; choose another --out or remove it")
    if marker.exists():
        if _read_json(marker) != args:
            raise UsageError(f"{out} holds an unfinished synthetic set made with other arguments; remove it first")
    elif any(out.iterdir()):
        raise UsageError(f"{out} is not empty and holds no synthetic set; choose an empty or new folder")
    write_atomic(marker, json.dumps(args, sort_keys=True).encode())
    return False


@entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder to write the synthetic download into")
    p.add_argument("--identities", type=positive(int), default=120, help="number of celebrities (default 120)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--median-images", type=positive(float), default=25.0,
                   help="median images per identity; counts are log-normal around it (default 25)")
    p.add_argument("--dirt", type=parse_dirt, default=dict(DIRT_RATES),
                   help=f"override dirt rates, e.g. streaks=0.05,missing=0 (known: {', '.join(DIRT_RATES)})")
    p.add_argument("--tar", action="store_true",
                   help="also write imdb_crop.tar and imdb_meta.tar (folders layout: faces.tar)")
    p.add_argument("--layout", choices=LAYOUTS, default="imdb",
                   help="imdb: IMDb-WIKI's layout and imdb.mat; folders: the same faces as "
                        "DIR/faces/<identity>/<file>, no metadata (default imdb)")
    p.add_argument("--workers", type=positive(int), default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    cfg = SynthConfig(identities=a.identities, seed=a.seed, median_images=a.median_images, dirt=a.dirt)
    args = run_args(cfg, a.tar, a.layout)
    if _prepare_out(a.out, args):
        print(f"faceclr: {a.out} already holds this synthetic set; reusing it")
        print(summary(json.loads((a.out / TRUTH).read_text()), a.out))
        return 0
    try:
        truth = generate(cfg, a.out, workers=a.workers, tar=a.tar, progress=not a.no_progress, layout=a.layout)
    except OSError as e:
        if (message := refusal(e, a.out)) is None:
            raise
        raise UsageError(message) from None
    (a.out / MARKER).unlink()
    print(summary(truth, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

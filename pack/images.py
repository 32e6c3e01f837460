"""One source file -> a checked, upright, RGB, pre-resized baseline JPEG, plus measured outlier flags.

Every stored image was decoded in full here: DALI cannot skip a bad JPEG mid-epoch.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pack.selection import MAX_PIXELS

GRAY_MAX_CHANNEL_DIFF = 2.0
"""`grayscale`: mean |R-G| + |G-B| at or below this (0-255 scale) on the stored image."""
LOW_CONTRAST_STD = 12.0
"""`low_contrast`: standard deviation of luminance below this (0-255 scale)."""
STREAK_EDGE = 40
"""`streaks`: a pixel crosses a band edge when its colour (sum over channels) changes by more than this
between neighbouring rows of the quarter-resolution image (rows four apart in the stored one, so a
resized, softened edge still counts)..."""
STREAK_ROW_SHARE = 0.6
"""...a row is a band edge when at least this share of its pixels do..."""
STREAK_MIN_EDGES = 2
"""...and an image has streaks when its rows, or its columns, hold at least this many separate band edges.
Faces and backgrounds rarely change abruptly across the whole width; colour streaks do so at both sides.
Measured on synthetic data (`python -m pack.synth --identities 250`: 172 streak images, 1,943 clean ones):
98.8% of streak images caught, 3 clean ones (0.15%) flagged. Tuned on the generator's streaks: check the
flag on real data before trusting it (tests/test_pack.py re-measures the rates on every run)."""
FLAG_SCALE = 4
"""The detectors read every FLAG_SCALE-th pixel of the stored image: at half resolution they cost as much
as the resize; at a quarter they took half the time and caught as many streak images (98.8%, 97.7% at half
resolution, on the 2,477 synthetic images above)."""


@dataclass
class Checked:
    """What reading one source file found. `reason` is None when the image is kept."""

    reason: str | None
    detail: str = ""
    width: int = 0
    height: int = 0
    jpeg: bytes = b""
    flags: list[str] = field(default_factory=list)


@contextlib.contextmanager
def own_pixel_limit() -> Iterator[None]:
    """PIL's decompression-bomb check off for the `with` body and restored after: the caller refuses an image over
    its own pixel limit from the header, before decoding, and PIL's check would refuse a large one at open as
    unreadable (or by its own, other limit)."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _open(data: bytes) -> tuple[Image.Image, int, tuple[int, int]] | None:
    """The opened (not yet decoded) image, its EXIF orientation and its upright (width, height); None if
    unreadable. The orientation is parsed once here and reused by `_decode`."""
    try:
        with own_pixel_limit():  # `check` applies --max-pixels from the header
            im = Image.open(io.BytesIO(data))
        w, h = im.size
    except Exception:
        return None
    try:
        orientation = im.getexif().get(0x0112, 1) if im.format == "JPEG" else 1
    except Exception:  # a damaged EXIF block does not make the image unreadable
        orientation = 1
    return im, orientation, ((h, w) if orientation in (5, 6, 7, 8) else (w, h))


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header alone, upright (EXIF rotation applied), or None if unreadable."""
    opened = _open(data)
    return opened[2] if opened else None


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
"""EXIF orientation -> the transpose that makes the image upright (the table `ImageOps.exif_transpose` uses;
applied here directly because `exif_transpose` parses the EXIF block again and copies upright images)."""


def _decode(im: Image.Image, orientation: int, size: int) -> Image.Image:
    """Decode in full, in draft (DCT-scaled) mode when the file is at least twice the target; upright RGB."""
    w, h = im.size
    if im.format == "JPEG" and min(w, h) >= 2 * size:
        scale = size / min(w, h)
        im.draft("RGB", (int(np.ceil(w * scale)), int(np.ceil(h * scale))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL only warns on some broken files: treat them as broken
        im.load()
    if orientation in _TRANSPOSE:
        im = im.transpose(_TRANSPOSE[orientation])
    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = im.convert("RGBA")
        flat = Image.new("RGB", im.size, (0, 0, 0))
        flat.paste(im, mask=im.getchannel("A"))
        return flat
    return im if im.mode == "RGB" else im.convert("RGB")


def resize_square(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, then the centre `size` x `size`, in one antialiased resample.

    Downscales average over each output pixel's area (PIL's BOX filter, OpenCV's INTER_AREA): antialiased
    and 1.5x cheaper than bilinear here; upscales, where BOX would repeat pixels, are bilinear. Resampling only
    the centre square (`box`) costs the output's pixels, not the whole resized image's.
    """
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    method = Image.Resampling.BOX if side > size else Image.Resampling.BILINEAR
    return im.resize((size, size), method, box=(left, top, left + side, top + side))


def _band_edges(diff_share: np.ndarray) -> int:
    """Separate runs of rows whose share of changed pixels reaches STREAK_ROW_SHARE."""
    hot = diff_share >= STREAK_ROW_SHARE
    return int(hot[0]) + int(np.count_nonzero(hot[1:] & ~hot[:-1]))


def outlier_flags(im: Image.Image) -> list[str]:
    """Measured detectors on the stored RGB image at 1/FLAG_SCALE resolution; see the thresholds above."""
    flags = []
    small = im.resize((im.width // FLAG_SCALE, im.height // FLAG_SCALE), Image.Resampling.NEAREST)
    a = np.asarray(small).astype(np.int16)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    if (np.abs(r - g) + np.abs(g - b)).mean() <= GRAY_MAX_CHANNEL_DIFF:
        flags.append("grayscale")
    if (0.299 * r + 0.587 * g + 0.114 * b).std() < LOW_CONTRAST_STD:
        flags.append("low_contrast")
    s = r + g + b
    rows = (np.abs(np.diff(s, axis=0)) > STREAK_EDGE).mean(axis=1)
    cols = (np.abs(np.diff(s, axis=1)) > STREAK_EDGE).mean(axis=0)
    if max(_band_edges(rows), _band_edges(cols)) >= STREAK_MIN_EDGES:
        flags.append("streaks")
    return flags


def size_reason(width: int, height: int, min_size: int, max_pixels: int) -> tuple[str, str] | None:
    """(too_small or too_large, detail) for an upright size the header declares; None when it passes both.
    The one statement of the size rule: `check` applies it before decoding, `--dry-run` to headers alone."""
    if min(width, height) < min_size:
        return "too_small", f"{width}x{height}"
    if width * height > max_pixels:
        return "too_large", (f"{width}x{height} = {width * height / 1e6:.1f} Mpx, over --max-pixels "
                             f"{max_pixels}")
    return None


def check(data: bytes | None, size: int, min_size: int, max_pixels: int = MAX_PIXELS) -> Checked:
    """Apply, in order: missing, too_small and too_large (header), corrupt (full decode); then resize, encode,
    flag. Nothing is decoded before the header's size passed both size checks."""
    if data is None:
        return Checked("missing")
    opened = _open(data)
    if opened is None:
        return Checked("corrupt", "not an image" if data else "empty file")
    im, orientation, (w, h) = opened
    if failed := size_reason(w, h, min_size, max_pixels):
        return Checked(*failed, w, h)
    try:
        im = _decode(im, orientation, size)
    except Exception as e:
        return Checked("corrupt", f"{type(e).__name__}: {str(e)[:80]}", w, h)
    out = resize_square(im, size)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=95, progressive=False, optimize=False)
    return Checked(None, "", w, h, buf.getvalue(), outlier_flags(out))

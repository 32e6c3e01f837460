"""The verification benchmarks face researchers report, read from the two forms they circulate in.

- insightface `.bin` (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...): a pickle of `(bins, issame)`, `bins`
  a list of encoded images (JPEG/PNG bytes of 112x112 aligned crops; some versions hold numpy arrays),
  pair k = `bins[2k], bins[2k+1]`; folds: 10 contiguous blocks in file order.
- LFW `pairs.txt` with its image folder: a header `S N`, then per set N matched lines `name n1 n2` and N
  mismatched lines `name1 n1 name2 n2`; images `DIR/name/name_NNNN.jpg`; each set is one fold.

A pickle runs code when loaded naively, and `.bin` files come from the internet: they are read with an
unpickler that builds only what the format holds (lists, tuples, bytes, bools, numbers, and plain numpy
arrays) and refuses every other global before anything is called.
"""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from base.errors import UsageError
from engine.metrics import file_order_folds
from pack.images import own_pixel_limit
from pack.selection import MAX_PIXELS

FOLDS = 10


class PairSetError(UsageError, ValueError):
    """A benchmark file that cannot be read as its format says; the message is one line."""


@dataclass
class PairSet:
    name: str
    """The file's name (`lfw.bin`, `pairs.txt`): the benchmark's key in the report."""
    path: Path
    layout: str
    images: list
    """One source per distinct image: encoded bytes, a uint8 array (HxWx3 pixels or 1-D encoded), or a path."""
    pairs: np.ndarray
    """(P, 2) indices into `images`."""
    issame: np.ndarray
    fold: np.ndarray


# -- the restricted unpickler ---------------------------------------------------------------------

class Refused(pickle.UnpicklingError):
    """The pickle asks for something a .bin does not hold; nothing it names has been called."""


def _numpy_module(name: str):
    import numpy

    core = getattr(numpy, "_core", None) or numpy.core
    return getattr(core, name)


def _plain_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise Refused("the pickle asks for a numpy array of Python objects")
    return dt


def _safe_dtype(obj, align=False, copy=False):
    if not isinstance(obj, (str, bytes)):
        raise Refused(f"the pickle builds a numpy dtype from {type(obj).__name__}")
    return _plain_dtype(np.dtype(obj.decode("latin1") if isinstance(obj, bytes) else obj, align, copy))


class _NdarrayClass:
    """What `numpy.ndarray` resolves to: a token `_reconstruct` accepts, not a class anything can call."""


def _safe_reconstruct(subtype, shape, typecode):
    if subtype is not _NdarrayClass:
        raise Refused("the pickle reconstructs an array of a class other than numpy.ndarray")
    return _numpy_module("multiarray")._reconstruct(np.ndarray, shape, typecode)


def _safe_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise Refused("the pickle builds a numpy scalar that is not plain bytes of a plain dtype")
    return _numpy_module("multiarray").scalar(dtype, data)


def _safe_frombuffer(buf, dtype, shape, order):
    if not isinstance(buf, (bytes, bytearray, memoryview)) or not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise Refused("the pickle builds a numpy array from something other than plain bytes")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _safe_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused("the pickle calls _codecs.encode other than to store bytes")
    return text.encode("latin1")


_ALLOWED = {
    ("_codecs", "encode"): _safe_encode,  # how protocol-2 pickles written by Python 3 store bytes
    ("numpy", "ndarray"): _NdarrayClass,
    ("numpy", "dtype"): _safe_dtype,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _safe_reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _safe_scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _safe_frombuffer for core in ("core", "_core")},
}
"""Every global a .bin may name, each mapped to a checked stand-in: no module is imported by name."""


class BinUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals in `_ALLOWED`; anything else is refused unrun."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise Refused(f"refused to load global '{module}.{name}' (a .bin holds only lists, "
                                         "bytes, booleans and numpy arrays)") from None

    def persistent_load(self, pid):
        raise Refused("refused a persistent id (not part of the .bin format)")


def _as_bool(x) -> bool:
    if isinstance(x, (bool, np.bool_)) or (isinstance(x, (int, np.integer)) and x in (0, 1)):
        return bool(x)
    raise ValueError(f"an issame entry is {type(x).__name__} {x!r}, not a boolean")


def _check_image_source(x, k: int):
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and (x.ndim == 1 or (x.ndim == 3 and x.shape[2] == 3)):
        return x
    raise ValueError(f"image {k} is {type(x).__name__}"
                     f"{' ' + str(x.dtype) + str(list(x.shape)) if isinstance(x, np.ndarray) else ''}, "
                     "not encoded bytes or a uint8 HxWx3 array")


def read_bin(path: Path) -> PairSet:
    """An insightface .bin, read without running anything it names; PairSetError if it is not one."""
    try:
        with open(path, "rb") as f:
            obj = BinUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise PairSetError(f"--bench {path}: cannot read it ({e.strerror or e})") from None
    except Refused as e:
        raise PairSetError(f"--bench {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a malformed pickle raises EOFError, ValueError, KeyError, ...
        raise PairSetError(f"--bench {path} is not a readable pickle ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:120]})") from None
    try:
        if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
            raise ValueError(f"it holds a {type(obj).__name__}, not the pair (images, issame)")
        bins, issame = obj
        if isinstance(bins, np.ndarray) and bins.dtype == np.uint8 and bins.ndim == 4:
            bins = list(bins)  # some conversions store one (N, H, W, 3) array
        if not isinstance(bins, (list, tuple)):
            raise ValueError(f"its images are a {type(bins).__name__}, not a list")
        if not isinstance(issame, (list, tuple, np.ndarray)):
            raise ValueError(f"its issame is a {type(issame).__name__}, not a list")
        issame = np.array([_as_bool(x) for x in issame], dtype=bool)
        if len(bins) != 2 * len(issame):
            raise ValueError(f"{len(bins)} images for {len(issame)} pairs (expected twice as many)")
        images = [_check_image_source(x, k) for k, x in enumerate(bins)]
        fold = file_order_folds(len(issame), FOLDS)
    except ValueError as e:
        raise PairSetError(f"--bench {path} is not an insightface .bin: {e}") from None
    pairs = np.arange(len(images)).reshape(-1, 2)
    return PairSet(path.name, path, "insightface .bin", images, pairs, issame, fold)


# -- LFW pairs.txt --------------------------------------------------------------------------------

def _lfw_image(images: Path, name: str, number: str) -> Path:
    return images / name / f"{name}_{int(number):04d}.jpg"


def read_lfw_pairs(path: Path, images: Path | None = None) -> PairSet:
    """LFW's pairs.txt (header `S N`: S sets of N matched then N mismatched lines; each set a fold), with
    images under `images` (default: `lfw/` beside pairs.txt if there is one, else pairs.txt's own folder)."""
    try:
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise PairSetError(f"--bench {path}: cannot read it as text ({getattr(e, 'strerror', None) or e})") from None
    bad = lambda what: PairSetError(f"--bench {path} is not an LFW pairs.txt: {what}")
    if not lines or not all(re.fullmatch(r"\d+", x) for x in lines[0]) or len(lines[0]) not in (1, 2):
        raise bad("the first line must be `SETS PAIRS` (e.g. `10 300`)")
    body = lines[1:]
    if len(lines[0]) == 2:
        sets, n = int(lines[0][0]), int(lines[0][1])
    elif int(lines[0][0]) * 2 == len(body):
        sets, n = 1, int(lines[0][0])  # pairsDevTrain / pairsDevTest: one set of N matched + N mismatched
    elif int(lines[0][0]) == len(body) and len(body) % (2 * FOLDS) == 0:
        sets, n = FOLDS, len(body) // (2 * FOLDS)  # a header that counts all pairs of the 10 sets
    else:
        raise bad(f"its one-number header ({lines[0][0]}) fits neither N matched + N mismatched lines nor 10 "
                  f"sets of them ({len(body)} pair lines); use the original `10 300` pairs.txt")
    if n == 0 or sets * 2 * n != len(body):
        raise bad(f"the header promises {sets} sets of {n} matched + {n} mismatched pairs, the file has "
                  f"{len(body)} pair lines")
    if sets < 2:
        raise bad("it holds one set (pairsDevTrain/pairsDevTest); the 10-fold protocol needs the 10-set pairs.txt")
    if images is None:
        images = path.parent / "lfw" if (path.parent / "lfw").is_dir() else path.parent
    index: dict[Path, int] = {}
    pairs, issame = [], []
    for k, f in enumerate(body):
        matched = (k % (2 * n)) < n
        if matched and not (len(f) == 3 and f[1].isdigit() and f[2].isdigit()):
            raise bad(f"line {k + 2} should be a matched pair `name n1 n2`, it is {' '.join(f)!r}")
        if not matched and not (len(f) == 4 and f[1].isdigit() and f[3].isdigit()):
            raise bad(f"line {k + 2} should be a mismatched pair `name1 n1 name2 n2`, it is {' '.join(f)!r}")
        a, b = ((f[0], f[1]), (f[0], f[2])) if matched else ((f[0], f[1]), (f[2], f[3]))
        pair = []
        for name, number in (a, b):
            p = _lfw_image(images, name, number)
            if p not in index:
                if not p.is_file():
                    raise PairSetError(f"--bench {path}: line {k + 2} names {p}, which does not exist (pass the "
                                       "folder holding the name/name_NNNN.jpg images with --images)")
                index[p] = len(index)
            pair.append(index[p])
        pairs.append(pair)
        issame.append(matched)
    fold = np.arange(len(body)) // (2 * n)
    return PairSet(path.name, path, "LFW pairs.txt", list(index), np.array(pairs), np.array(issame), fold)


def open_pairset(path: Path, images: Path | None = None) -> PairSet:
    """A .bin or a pairs.txt, by its suffix (anything else is refused)."""
    if not path.is_file():
        raise PairSetError(f"--bench {path} not found (pass an insightface .bin or an LFW pairs.txt)")
    if path.suffix == ".bin":
        return read_bin(path)
    if path.suffix == ".txt":
        return read_lfw_pairs(path, images)
    raise PairSetError(f"--bench {path}: unknown format '{path.suffix}' (pass an insightface .bin or an LFW pairs.txt)")


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than MAX_PIXELS; it was not decoded."""


def decode(source) -> Image.Image:
    """One benchmark image as RGB; ValueError if it cannot be decoded, ImageTooLarge (before decoding) if its
    header declares more than MAX_PIXELS pixels: the packer's rule, so a decompression bomb in a downloaded
    .bin is one line, not a gigabyte per DataLoader worker or PIL's DecompressionBombError."""
    try:
        if isinstance(source, np.ndarray) and source.ndim == 3:
            return Image.fromarray(source, "RGB")
        data = source.tobytes() if isinstance(source, np.ndarray) else source
        with own_pixel_limit():
            im = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        if im.width * im.height > MAX_PIXELS:
            raise ImageTooLarge(f"its header declares {im.width:,} x {im.height:,} pixels, over the limit of "
                                f"{MAX_PIXELS:,} (pack's --max-pixels default): not decoded")
        im.load()
        return im.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

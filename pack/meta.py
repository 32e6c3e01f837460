"""Read `imdb.mat` into plain rows, from a file or from inside a tar.

The file is MATLAB v5 holding one (1, 1) struct `imdb` whose fields are (1, N) rows, one column per
listed image: `full_path` (cells like `01/nm0000001_rm124825600_1899-5-10_1968.jpg`, relative to
`imdb_crop/`; the nm id names the identity), `name` (cells, some empty), `face_score` (float64, `-inf`
where no face was found: those crops are 1x1 placeholders), `second_face_score` (float64, NaN unless a
second face was found), `photo_taken` (uint16 year), `dob` (int32 MATLAB serial date number, often
garbage), `gender` (float64 1 male / 0 female / NaN), plus `face_location`, `celeb_names` and `celeb_id`,
which the packer does not use. docs/data-format.md shows the whole structure.
"""

from __future__ import annotations

import io
import math
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from base.errors import UsageError
from pack.listing import Row
from pack.tarscan import members

NM_RE = re.compile(r"nm\d+")


class MetaError(UsageError):
    """The metadata cannot be used; the message says why in one line."""


def _text(cell: np.ndarray) -> str:
    return str(cell[0]) if cell.size else ""


NEEDED = ("full_path", "name", "face_score", "second_face_score", "photo_taken", "dob", "gender")


def _unequal(lengths: dict[str, int]) -> str:
    """`name has 99 rows, dob 98, the other 5 fields 100`: the fields that differ from the most common length."""
    common = Counter(lengths.values()).most_common(1)[0][0]
    odd = [f"{f} {n}" for f, n in lengths.items() if n != common]
    others = sum(n == common for n in lengths.values())
    return f"{', '.join(odd)} rows, the other {others} field{'s' if others > 1 else ''} {common}"


def parse_mat(data: bytes, origin: str) -> list[Row]:
    """Every listed image of an imdb.mat's bytes; a MetaError (one line) for a file that is not one."""
    import scipy.io  # 0.2 s: only where a .mat is read

    try:
        mat = scipy.io.loadmat(io.BytesIO(data))
    except Exception as e:  # scipy raises several types for a file that is not MAT v5
        raise MetaError(f"{origin} is not a readable MATLAB v5 file ({type(e).__name__}: {e})") from None
    if "imdb" not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise MetaError(f"{origin} has no 'imdb' struct (variables: {found})")
    rec = mat["imdb"][0, 0]
    missing = [f for f in NEEDED if f not in (rec.dtype.names or ())]
    if missing:
        raise MetaError(f"{origin}: the 'imdb' struct lacks {', '.join(missing)}")
    col = {f: np.asarray(rec[f]).reshape(-1) for f in NEEDED}
    lengths = {f: len(c) for f, c in col.items()}
    if len(set(lengths.values())) > 1:
        raise MetaError(f"{origin}: the 'imdb' struct's fields differ in length ({_unequal(lengths)}); one row per "
                        "image is needed: the file is damaged or not IMDb-WIKI's (download imdb_meta.tar again)")
    rows = []
    for i, cell in enumerate(col["full_path"]):
        path = _text(cell)
        m = NM_RE.search(path.rsplit("/", 1)[-1])
        rows.append(Row(
            path=path,
            identity=m.group(0) if m else "",
            name=_text(col["name"][i]),
            face_score=float(col["face_score"][i]),
            second_face_score=float(col["second_face_score"][i]),
            photo_taken=int(col["photo_taken"][i]),
            dob=int(col["dob"][i]),
            gender=float(col["gender"][i]),
        ))
    return rows


def find_in_tar(tar_path: Path, basename: str) -> bytes | None:
    """The first `basename` at most one folder deep; headers are scanned, other members' data skipped."""
    for member in members(tar_path):
        parts = member.name.removeprefix("./").split("/")
        if parts[-1] == basename and len(parts) <= 2:
            return member.read()
    return None


def locate(src: Path, meta: Path | None) -> tuple[bytes, str]:
    """The .mat bytes and where they came from: `--meta`, else inside SRC, else beside it."""
    if meta is not None:
        if not meta.is_file():
            raise MetaError(f"--meta {meta} does not exist")
        if meta.suffix == ".tar":
            data = find_in_tar(meta, "imdb.mat")
            if data is None:
                raise MetaError(f"{meta} holds no imdb.mat")
            return data, f"{meta}:imdb.mat"
        return meta.read_bytes(), str(meta)
    if src.is_dir():
        if (src / "imdb.mat").is_file():
            return (src / "imdb.mat").read_bytes(), str(src / "imdb.mat")
    elif tarfile.is_tarfile(src):
        data = find_in_tar(src, "imdb.mat")
        if data is not None:
            return data, f"{src}:imdb.mat"
    beside = src.parent
    if (beside / "imdb" / "imdb.mat").is_file():
        return (beside / "imdb" / "imdb.mat").read_bytes(), str(beside / "imdb" / "imdb.mat")
    if (beside / "imdb_meta.tar").is_file():
        data = find_in_tar(beside / "imdb_meta.tar", "imdb.mat")
        if data is not None:
            return data, f"{beside / 'imdb_meta.tar'}:imdb/imdb.mat"
    raise MetaError(f"no imdb.mat found in {src}, {beside / 'imdb'} or {beside / 'imdb_meta.tar'}; pass --meta FILE "
                    "(or --layout folders, if SRC holds one folder per identity)")


def finite_or_none(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else x

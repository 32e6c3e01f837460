"""The packer's first stage: what to pack. Each layout lists the same rows (a path and its identity) from its own
kind of source, and the stages after this one cannot tell the layouts apart.

- `imdb`: IMDb-WIKI's `imdb_crop` (a folder or the downloaded tar) and its `imdb.mat` (pack/meta.py reads it).
- `folders`: `SRC/<identity>/<image>`, one folder per identity (CASIA-WebFace, VGGFace2, LFW, your own photos), or
  a tar of that tree.
- `csv`: a list of `path,identity` rows, paths relative to the folder SRC.

A layout that cannot be read as its rules say is a LayoutError naming the entry and what to do, in one line:
nothing is guessed, and no file in the tree is left out without a word.
"""

from __future__ import annotations

import csv
import errno
import io
import math
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path

from base.errors import UsageError
from pack.tarscan import members

LAYOUTS = ("imdb", "folders", "csv")
IMDB_ONLY = ("min_face_score", "keep_second_face")
"""Params fields that filter on imdb.mat's columns; the other layouts have no such columns."""


class LayoutError(UsageError):
    """SRC (or the list) is not laid out as its layout says; the message names the entry and what to do."""


@dataclass(frozen=True)
class Row:
    """One listed image. `path` is relative to the source root ('/'-separated); `identity` groups the images of one
    person: the nm id (imdb), the folder's name (folders), the list's identity column (csv). The other fields are
    imdb.mat's and stay at these defaults elsewhere."""

    path: str
    identity: str
    name: str = ""
    face_score: float = math.nan
    second_face_score: float = math.nan
    photo_taken: int = 0
    dob: int = 0
    gender: float = math.nan


@dataclass
class Listing:
    """Every listed image of one source, and where to read them."""

    layout: str
    rows: list[Row]
    src: Path
    """The folder or tar the rows' paths are read from (for imdb, perhaps the `imdb_crop` under --src)."""
    origin: str
    """Where the list came from, in words: the .mat, the list file, or the tree."""
    strip: int = 1
    """A tar source: leading folders of each member's name before the listed path (`imdb_crop/`)."""


def _name_parts(name: str) -> list[str]:
    """A tar member's name as folders and file, `./` and empty parts dropped."""
    return [p for p in name.split("/") if p not in ("", ".")]


def tar_path(name: str, strip: int) -> str:
    """A tar member's listed path: `./`, empty parts and the first `strip` folders dropped."""
    return "/".join(_name_parts(name)[strip:])


def _utf8(name: str, where: str) -> None:
    """Names become identities and sample keys: one that is not valid UTF-8 cannot be written into either."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape")
        raise LayoutError(f"{where} holds a name that is not valid UTF-8, {raw!r}: rename it (convmv renames a tree "
                          "from another encoding)") from None


# -- folders -------------------------------------------------------------------------------------------

def _kind(path: str) -> str:
    """'dir', 'file', 'special' or 'broken' (a link to nothing), following links; a loop is a LayoutError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken"
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LayoutError(f"{path} is a symbolic link loop: remove it or point it at a real file") from None
        raise LayoutError(f"cannot read {path}: {e.strerror}") from None
    return "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "special"


def _scan(folder: str) -> list[tuple[str, str]]:
    """(name, kind) of every entry, sorted by name; only links cost a stat (3.3M files for VGGFace2)."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise LayoutError(f"cannot read {folder}: {e.strerror}") from None
    out = []
    for e in entries:
        _utf8(e.name, folder)
        try:
            kind = (_kind(e.path) if e.is_symlink() else "dir" if e.is_dir() else "file" if e.is_file()
                    else "special")
        except OSError as err:
            raise LayoutError(f"cannot read {e.path}: {err.strerror}") from None
        if kind == "special":  # a fifo or a device: reading it could block or never end
            raise LayoutError(f"{e.path} is neither a file nor a folder: remove it")
        out.append((e.name, kind))
    return out


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _rows_from_tree(tree: dict[str, list[str]], top_files: list[str], nested: dict[str, str], src: Path,
                    what: str) -> list[Row]:
    """The rows of `identity -> [file names]`, after the checks every folder tree gets (folder or tar)."""
    if top_files:
        raise LayoutError(f"{what} holds files beside its identity folders ({_few(top_files)}): the folders layout is "
                          "SRC/<identity>/<image>; move them out, or list what to pack with --layout csv --list FILE")
    if nested:
        identity, inner = next(iter(nested.items()))
        hint = (f"is --src one level too high? then try --src {src / identity}" if src.is_dir() else
                "the tar holds one folder level more than that")
        raise LayoutError(f"{what}: {identity}/{inner} is a folder inside identity folder {identity}: the folders "
                          f"layout is SRC/<identity>/<image> ({hint})")
    if not tree:
        raise LayoutError(f"{what} holds no identity folders (the folders layout is SRC/<identity>/<image>)")
    empty = [identity for identity, files in tree.items() if not files]
    if empty:
        raise LayoutError(f"{what}: identity folder {_few(empty)} holds no files; remove "
                          f"{'it' if len(empty) == 1 else 'them'}")
    return [Row(f"{identity}/{name}", identity) for identity in sorted(tree) for name in sorted(tree[identity])]


def list_folders(src: Path) -> Listing:
    """`SRC/<identity>/<file>`: every file in an identity folder is listed (one that is not an image is rejected
    as corrupt, a link to nothing as missing); anything else in the tree is a LayoutError naming it."""
    if src.is_file():
        return _list_tar_tree(src)
    tree: dict[str, list[str]] = {}
    top_files: list[str] = []
    nested: dict[str, str] = {}
    for name, kind in _scan(str(src)):
        if kind == "broken":
            raise LayoutError(f"{src / name} is a link to nothing: remove it, or point it at an identity folder")
        if kind == "file":
            top_files.append(name)
            continue
        files = []
        for inner, inner_kind in _scan(str(src / name)):
            if inner_kind == "dir":
                nested.setdefault(name, inner)
            else:
                files.append(inner)
        tree[name] = files
    rows = _rows_from_tree(tree, top_files, nested, src, f"--src {src}")
    return Listing("folders", rows, src, f"{len(tree)} identity folders in {src}")


@dataclass
class _TarScan:
    """One pass over a tar's headers: its files' and folders' name parts, its links, and an imdb.mat if any."""

    files: list[list[str]]
    dirs: list[list[str]]
    links: list[tuple[str, str]]
    mat: bytes | None


def _scan_tar(src: Path) -> _TarScan:
    """Python's tarfile reads about 7,000 headers a second here (a folder lists 30 times faster): one pass serves
    both telling the layout and listing the tree."""
    scan = _TarScan([], [], [], None)
    for m in members(src, every=True):
        parts = _name_parts(m.name)
        if not parts:
            continue
        if m.kind == "file":
            scan.files.append(parts)
            if parts[-1] == "imdb.mat" and len(parts) <= 2 and scan.mat is None:
                scan.mat = m.read()
        elif m.kind == "dir":
            scan.dirs.append(parts)
        else:
            scan.links.append((m.name, m.kind))
    return scan


def _list_tar_tree(src: Path, scan: _TarScan | None = None) -> Listing:
    """The same tree inside a tar: `tar cf x.tar TREE` (one top folder, stripped) or `tar cf x.tar -C TREE .`."""
    scan = scan or _scan_tar(src)
    for parts in scan.files + scan.dirs:
        _utf8("/".join(parts), str(src))
    if scan.links:
        name, kind = scan.links[0]
        raise LayoutError(f"{src} member {name} is a {kind}, which the packer does not follow inside a "
                          "tar: extract the tar and pass the folder (or make it with tar --dereference "
                          "--hard-dereference)")
    files, dirs = scan.files, scan.dirs
    tops = {p[0] for p in files + dirs}
    strip = 1 if len(tops) == 1 and any(len(p) >= 3 for p in files) else 0
    tree: dict[str, list[str]] = {}
    top_files: list[str] = []
    nested: dict[str, str] = {}
    for parts in dirs:
        rest = parts[strip:]
        if len(rest) == 1:
            tree.setdefault(rest[0], [])
        elif len(rest) > 1:
            nested.setdefault(rest[0], rest[1])
    for parts in files:
        rest = parts[strip:]
        if len(rest) == 1:
            top_files.append(rest[0])
        elif len(rest) == 2:
            tree.setdefault(rest[0], []).append(rest[1])
        else:
            nested.setdefault(rest[0], rest[1])
    listed = {identity: sorted(set(names)) for identity, names in tree.items()}
    rows = _rows_from_tree(listed, sorted(top_files), nested, src, f"--src {src}")
    return Listing("folders", rows, src, f"{len(listed)} identity folders in {src}", strip)


# -- csv -----------------------------------------------------------------------------------------------

HEADER = ("path", "identity")


def list_csv(src: Path, list_file: Path) -> Listing:
    """`path,identity` rows (a header row naming both columns is allowed, and then may name others too); paths are
    relative to the folder SRC and must stay inside it. A listed file that is not there is rejected as missing."""
    if not src.is_dir():
        raise LayoutError(f"--layout csv reads its images from a folder; --src {src} is not one (extract it)")
    if not list_file.is_file():
        raise LayoutError(f"--list {list_file} does not exist")
    try:
        text = list_file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LayoutError(f"--list {list_file} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[Row] = []
    first_line: dict[str, int] = {}
    cols, width = (0, 1), None
    try:
        for record in reader:
            line = reader.line_num
            if not record or not any(field.strip() for field in record):
                continue
            if width is None:
                width = len(record)
                named = [field.strip().lower() for field in record]
                if all(h in named for h in HEADER):
                    cols = (named.index("path"), named.index("identity"))
                    continue
                if width != 2:
                    raise LayoutError(f"--list {list_file} line {line} has {width} columns: give path,identity (or "
                                      "a header row naming the path and identity columns)")
            if len(record) <= max(cols) or not record[cols[0]] or not record[cols[1]]:
                missing = "path" if len(record) <= cols[0] or not record[cols[0]] else "identity"
                raise LayoutError(f"--list {list_file} line {line} has no {missing} column: every row is "
                                  "path,identity")
            path, identity = record[cols[0]], record[cols[1]]
            normal = posixpath.normpath(path.replace("\\", "/"))
            if posixpath.isabs(normal) or normal == ".." or normal.startswith("../"):
                raise LayoutError(f"--list {list_file} line {line}: {path} is outside --src {src} (paths are "
                                  "relative to --src and stay inside it)")
            if normal in first_line:
                raise LayoutError(f"--list {list_file} line {line} lists {path} again (first on line "
                                  f"{first_line[normal]}): list each file once")
            first_line[normal] = line
            rows.append(Row(normal, identity))
    except csv.Error as e:
        raise LayoutError(f"--list {list_file} line {reader.line_num}: {e}") from None
    if not rows:
        raise LayoutError(f"--list {list_file} lists no images")
    return Listing("csv", sorted(rows, key=lambda r: r.path), src, str(list_file))


# -- imdb, and telling the layouts apart ---------------------------------------------------------------

def imdb_root(src: Path) -> Path:
    """SRC itself, or its `imdb_crop/` when SRC is the folder above it (where the download was extracted)."""
    if src.is_dir() and not (src / "imdb.mat").is_file() and (src / "imdb_crop").is_dir():
        return src / "imdb_crop"
    return src


def list_imdb(src: Path, meta: Path | None, mat: tuple[bytes, str] | None = None) -> Listing:
    """imdb.mat's rows; the images are read from SRC, or from the `imdb_crop/` under it."""
    from pack.meta import locate, parse_mat

    root = imdb_root(src)
    data, origin = mat or locate(root, meta)
    rows = parse_mat(data, origin)
    if not rows:
        raise LayoutError(f"{origin} lists no images")
    if _holds_no_images(root):
        raise LayoutError(f"--src {root} holds no image files")
    return Listing("imdb", rows, root, origin)


def _holds_no_images(src: Path) -> bool:
    """True when SRC holds no file but imdb.mat; stops at the first other file, so it costs little."""
    if src.is_dir():
        return not any(p.is_file() for p in src.rglob("*") if p.name != "imdb.mat")
    return not any(not m.name.endswith("imdb.mat") for m in members(src))


def _beside_meta(src: Path) -> bool:
    beside = src.parent
    return (beside / "imdb" / "imdb.mat").is_file() or (beside / "imdb_meta.tar").is_file()


def read_listing(src: Path, layout: str | None, meta: Path | None = None, list_file: Path | None = None) -> Listing:
    """The rows of SRC in `layout`, or in the layout SRC is found to have (None): imdb where an imdb.mat is found
    (in SRC, beside it, under it, or --meta), csv with --list, folders otherwise."""
    if layout is None:
        if list_file is not None:
            layout = "csv"
        elif meta is not None:
            layout = "imdb"
        elif src.is_dir():
            root = imdb_root(src)
            if (root / "imdb.mat").is_file() or root != src or _beside_meta(src):
                layout = "imdb"
            elif (src / "imdb_crop.tar").is_file():
                raise LayoutError(f"--src {src} holds imdb_crop.tar: pass --src {src / 'imdb_crop.tar'} (or extract "
                                  "it and pass the imdb_crop folder)")
            else:
                layout = "folders"
        else:
            scan = _scan_tar(src)
            if scan.mat is not None:
                return list_imdb(src, None, (scan.mat, f"{src}:imdb.mat"))
            if not _beside_meta(src):
                return _list_tar_tree(src, scan)
            layout = "imdb"
    if layout == "imdb":
        return list_imdb(src, meta)
    if layout == "csv":
        if list_file is None:
            raise LayoutError("--layout csv needs --list FILE (rows of path,identity)")
        return list_csv(src, list_file)
    return list_folders(src)

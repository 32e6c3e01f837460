"""The synthetic download has the real layout, the real .mat conventions and the dirt it claims."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image, ImageOps

from pack import synth

FIELDS = ("dob", "photo_taken", "full_path", "gender", "name", "face_location", "face_score",
          "second_face_score", "celeb_names", "celeb_id")
PATH_RE = re.compile(r"^(\d\d)/nm(\d{7})_rm(\d+)_(\d+)-(\d+)-(\d+)_(\d{4})\.jpg$")


@pytest.fixture(scope="module")
def rec(synth_download: Path) -> np.void:
    mat = scipy.io.loadmat(synth_download / "imdb" / "imdb.mat")
    assert mat["imdb"].shape == (1, 1)
    return mat["imdb"][0, 0]


def column(rec: np.void, field: str) -> np.ndarray:
    return rec[field][0]


def test_mat_is_v5_with_ten_fields_in_order(synth_download: Path, rec: np.void) -> None:
    raw = (synth_download / "imdb" / "imdb.mat").read_bytes()
    assert raw.startswith(b"MATLAB 5.0 MAT-file")
    assert raw[126:128] == b"IM"  # v5 little-endian marker, not HDF5 (v7.3)
    assert rec.dtype.names == FIELDS
    assert (synth_download / "imdb_crop" / "imdb.mat").read_bytes() == raw


def test_field_dtypes_and_shapes(rec: np.void, synth_truth: dict) -> None:
    n = synth_truth["n_images"]
    expected = {"dob": np.int32, "photo_taken": np.uint16, "gender": np.float64, "face_score": np.float64,
                "second_face_score": np.float64, "celeb_id": np.uint16, "full_path": object, "name": object,
                "face_location": object, "celeb_names": object}
    for field, dtype in expected.items():
        assert rec[field].dtype == dtype, field
        want = (1, synth_truth["n_identities"]) if field == "celeb_names" else (1, n)
        assert rec[field].shape == want, field


def test_full_paths_follow_the_real_naming(rec: np.void, synth_truth: dict) -> None:
    dob, year = column(rec, "dob"), column(rec, "photo_taken")
    for i, cell in enumerate(column(rec, "full_path")):
        assert cell.shape == (1,) and cell.dtype.kind == "U"
        m = PATH_RE.match(cell[0])
        assert m, cell[0]
        folder, nm, _, y, mo, d, taken = m.groups()
        assert folder == nm[-2:]
        born = datetime.fromordinal(int(dob[i]) - 366)
        assert (born.year, born.month, born.day) == (int(y), int(mo), int(d))
        assert int(taken) == int(year[i])
        assert synth_truth["images"][cell[0]]["nm_id"] == f"nm{nm}"


def test_names_some_empty_and_celeb_id_is_one_based(rec: np.void) -> None:
    names, ids, celebs = column(rec, "name"), column(rec, "celeb_id"), column(rec, "celeb_names")
    empty = [n for n in names if n.size == 0]
    assert empty and all(n.shape == (0,) for n in empty)
    assert ids.min() >= 1 and ids.max() <= len(celebs)
    for n, cid in zip(names, ids, strict=True):
        if n.size:
            assert celebs[cid - 1][0] == n[0]


def test_face_location_rows_have_mixed_dtypes(rec: np.void) -> None:
    locs = column(rec, "face_location")
    assert {loc.dtype for loc in locs} == {np.dtype(np.float64), np.dtype(np.uint8), np.dtype(np.uint16)}
    assert all(loc.shape == (1, 4) for loc in locs)
    boxes = np.stack([loc.astype(float)[0] for loc in locs])
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all() and boxes.min() >= 1


def test_scores_gender_and_dob_conventions(synth_download: Path, rec: np.void, synth_truth: dict) -> None:
    paths = [c[0] for c in column(rec, "full_path")]
    dirt = [synth_truth["images"][p]["dirt"] for p in paths]
    score, second = column(rec, "face_score"), column(rec, "second_face_score")
    no_face = np.array(["no_face" in d for d in dirt])
    assert (np.isneginf(score) == no_face).all()
    assert np.isfinite(score[~no_face]).all()
    ones = [p for p, nf in zip(paths, no_face, strict=True) if nf
            and Image.open(synth_download / "imdb_crop" / p).size == (1, 1)]
    assert len(ones) > no_face.sum() / 2, "most no-face rows are 1x1 placeholders"
    two = np.array(["second_face" in d for d in dirt])
    assert two.any() and (np.isnan(second) == ~two).all()
    assert (second[two] < score[two]).all()
    gender = column(rec, "gender")
    assert np.isnan(gender).any() and set(gender[~np.isnan(gender)]) == {0.0, 1.0}
    age = column(rec, "photo_taken").astype(int) - np.array(
        [datetime.fromordinal(int(d) - 366).year for d in column(rec, "dob")])
    assert ((age < 0) | (age > 100)).any(), "some dob values are garbage, as in the real set"
    assert ((age >= 15) & (age <= 95)).mean() > 0.9


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def test_every_dirt_kind_is_present_and_real(synth_download: Path, synth_truth: dict) -> None:
    crop = synth_download / "imdb_crop"
    seen: set[str] = set()
    for path, t in synth_truth["images"].items():
        f = crop / path
        kind = t["dirt"][0] if t["dirt"] else None
        seen.add(kind)
        assert f.exists() == t["file"], path
        if not t["file"]:
            assert kind == "missing"
            continue
        data = f.read_bytes()
        assert _decodes(f) == t["decodable"], (path, kind)
        if kind == "zero_byte":
            assert data == b""
        elif kind == "not_image":
            assert data.lstrip().startswith(b"<")
        elif kind == "truncated":
            assert data[:2] == b"\xff\xd8" and not data.endswith(b"\xff\xd9")
        elif kind == "duplicate":
            assert data == (crop / t["duplicate_of"]).read_bytes()
            assert synth_truth["images"][t["duplicate_of"]]["identity"] == t["identity"]
        if not t["decodable"]:
            continue
        with Image.open(f) as im:
            upright = ImageOps.exif_transpose(im)
            assert upright.size == (t["width"], t["height"]), (path, kind)
            fmt, mode, progressive = im.format, im.mode, bool(im.info.get("progressive"))
            orientation = im.getexif().get(0x0112, 1)
        assert (fmt == "PNG") == (kind == "png_as_jpg")
        assert (mode == "CMYK") == (kind == "cmyk")
        assert (mode == "L") == (kind == "grayscale")
        assert progressive == (kind == "progressive")
        assert (orientation != 1) == (kind == "exif_rotated")
        if kind == "too_small":
            assert min(t["width"], t["height"]) < 100
        elif kind != "no_face":
            assert min(t["width"], t["height"]) >= 100
            assert 60 <= max(t["width"], t["height"]) <= 600
    assert seen >= set(synth.DIRT_RATES) | {None}


def test_unlisted_files_do_not_exist(synth_download: Path, synth_truth: dict) -> None:
    on_disk = {str(p.relative_to(synth_download / "imdb_crop")) for p in (synth_download / "imdb_crop").rglob("*.jpg")}
    listed = {p for p, t in synth_truth["images"].items() if t["file"]}
    assert on_disk == listed
    assert sorted(d.name for d in (synth_download / "imdb_crop").iterdir() if d.is_dir()) == [
        f"{i:02d}" for i in range(100)]


def test_tars_hold_the_same_bytes_as_the_folder(synth_download: Path) -> None:
    crop = synth_download / "imdb_crop"
    with tarfile.open(synth_download / "imdb_crop.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
        files = {n for n, m in members.items() if m.isfile()}
        want = {f"imdb_crop/{p.relative_to(crop)}" for p in crop.rglob("*") if p.is_file()}
        assert files == want
        for name in list(files)[:200] + ["imdb_crop/imdb.mat"]:
            assert tar.extractfile(members[name]).read() == (synth_download / name).read_bytes()
    with tarfile.open(synth_download / "imdb_meta.tar") as tar:
        assert [m.name for m in tar.getmembers() if m.isfile()] == ["imdb/imdb.mat"]
        assert tar.extractfile("imdb/imdb.mat").read() == (synth_download / "imdb" / "imdb.mat").read_bytes()


def test_images_per_identity_is_skewed(synth_truth: dict) -> None:
    counts = np.array([i["images"] for i in synth_truth["identities"]])
    assert (counts < 50).mean() > 0.5, "many identities have under 50 images"
    assert counts.max() > 3 * np.median(counts), "a few have far more"


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != synth.TRUTH}


def test_same_arguments_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    args = ["--identities", "6", "--median-images", "6", "--seed", "3", "--tar", "--no-progress"]
    assert synth.main(["--out", str(tmp_path / "a"), "--workers", "1", *args]) == 0
    assert synth.main(["--out", str(tmp_path / "b"), "--workers", "2", *args]) == 0
    a, b = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert a == b and len(a) > 20
    assert synth.main(["--out", str(tmp_path / "c"), "--workers", "2", *args[:-3], "4", "--tar",
                       "--no-progress"]) == 0
    assert _tree_digest(tmp_path / "c") != a, "another seed gives other bytes"


def test_rerun_with_same_arguments_reuses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--out", str(tmp_path / "s"), "--identities", "3", "--median-images", "3", "--no-progress"]
    assert synth.main(args) == 0
    before = _tree_digest(tmp_path / "s")
    capsys.readouterr()
    assert synth.main(args) == 0
    assert "reusing" in capsys.readouterr().out
    assert _tree_digest(tmp_path / "s") == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--identities", "0"], "must be at least 1"),
        (["--identities", "x"], "not an integer"),
        (["--median-images", "-3"], "must be positive"),
        (["--workers", "0"], "must be at least 1"),
        (["--dirt", "bogus=0.1"], "unknown dirt"),
        (["--dirt", "streaks=0.9,second_face=0.5"], "more than 1"),
    ],
)
def test_bad_arguments_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pack.synth", "--out", str(tmp_path / "o"), *args],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("python -m pack.synth: error: ")


def test_a_full_disk_is_one_line_and_the_same_command_then_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """Simulated: writing imdb.mat fails with ENOSPC (base.files's open patched; one worker)."""
    import builtins
    import errno
    import os

    import base.files


    def full_open(file, mode="r", *args, **kw):
        if "w" in mode and str(file).endswith("imdb.mat.partial"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return builtins.open(file, mode, *args, **kw)

    args = ["--out", str(tmp_path / "s"), "--identities", "2", "--median-images", "3", "--workers", "1",
            "--no-progress"]
    monkeypatch.setattr(base.files, "open", full_open, raising=False)
    code = synth.main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is full" in err, err
    assert err.startswith("python -m pack.synth: error: the disk holding")
    monkeypatch.undo()
    assert synth.main(args) == 0 and (tmp_path / "s" / synth.TRUTH).is_file()


def test_unwritable_or_foreign_out_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = subprocess.run([sys.executable, "-m", "pack.synth", "--out", str(blocker / "sub"), "--identities", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "cannot write to --out" in r.stderr and len(r.stderr.splitlines()) == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    r = subprocess.run([sys.executable, "-m", "pack.synth", "--out", str(foreign), "--identities", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (foreign / "thesis.tex").read_text() == "keep me"

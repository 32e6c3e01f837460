"""python -m pack against what goes wrong on real machines: a cut-off download, a full disk, odd file names,
huge images, bad flags, an OUT from an older packer. Each is one line and exit code 2, and resumes."""

from __future__ import annotations

import builtins
import csv
import errno
import io
import json
import os
import shutil
import subprocess
import tarfile
import zlib
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pack import bench, synth
from pack.__main__ import main as pack_main
from pack.format import Manifest, ShardInfo, decode_label, sample_keys
from pack.images import check
from pack.packer import ShardJob, shard_bytes
from pack.selection import REASONS
from pack.shards import Sample, write_shard
from pack.synth import mat_bytes
from pack.tarscan import IncompleteTar, members
from pack.verify import verify_shards

from .probe_data import file_tree

SMALL = ["--min-images", "10", "--identities", "8", "--shard-samples", "40", "--size", "64", "--no-progress"]


def run_main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = pack_main(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m pack: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def reference(synth_download: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 identities of the synthetic download at 64 px: what every interrupted run below must end up equal to."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert pack_main(["--src", str(synth_download / "imdb_crop"), "--out", str(out), "--workers", "2", *SMALL]) == 0
    return out


# -- a cut-off download -------------------------------------------------------------------------------

def small_tar(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, size in (("d/a.jpg", 3000), ("d/b.jpg", 5000), ("d/c.jpg", 700)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(range(256)) * (size // 256) + bytes(size % 256)))
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_tarscan_reads_a_whole_tar(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    infos = small_tar(path)
    got = [(m.name, len(m.read())) for m in members(path)]
    assert got == [(i.name, i.size) for i in infos]


@pytest.mark.parametrize("cut", ["inside_data", "at_header", "mid_header", "no_end_marker", "garbage_header"])
def test_a_cut_or_damaged_tar_raises_naming_where(tmp_path: Path, cut: str) -> None:
    """tarfile alone ends its iteration quietly at all of these but a member whose own bytes are read."""
    path = tmp_path / "t.tar"
    a, b, c = small_tar(path)
    data = path.read_bytes()
    end_b = f"{b.offset_data + b.size:,}"
    data, words = {
        "inside_data": (data[:b.offset_data + 100], f"ends at byte {b.offset_data + 100:,} (0.00 GB), inside "
                                                    f"member d/b.jpg (which runs to byte {end_b}): the download is "
                                                    "incomplete"),
        "at_header": (data[:c.offset], f"ends at byte {c.offset:,} (0.00 GB), after member d/b.jpg and before the "
                                       "end-of-archive marker: the download is incomplete"),
        "mid_header": (data[:c.offset + 100], "after member d/b.jpg and before the end-of-archive marker"),
        "no_end_marker": (data[:c.offset_data + 1024], "after member d/c.jpg and before the end-of-archive marker"),
        "garbage_header": (data[:c.offset] + b"\x01" * 512 + data[c.offset + 512:],
                           f"holds no valid tar header at byte {c.offset:,} (0.00 GB), after member d/b.jpg: the "
                           "file is damaged"),
    }[cut]
    path.write_bytes(data)
    with pytest.raises(IncompleteTar) as e:
        for m in members(path):
            m.read()
    assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(IncompleteTar):
        list(members(path))  # the same without reading any member's bytes


def cut_tar(src: Path, dst: Path, share: float, inside: bool) -> str:
    """Copy the first part of a tar: into the data of the member at `share` of the file, or right at its header.
    Returns that member's name."""
    size = src.stat().st_size
    with tarfile.open(src) as tar:
        info = next(i for i in tar if i.isfile() and i.offset_data > share * size)
    end = info.offset_data + info.size // 2 if inside else info.offset
    with open(src, "rb") as f:
        dst.write_bytes(f.read(end))
    return info.name


def test_a_truncated_tar_is_one_line_and_the_finished_work_is_kept(synth_download: Path, reference: Path,
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    cut = tmp_path / "dl" / "imdb_crop.tar"
    cut.parent.mkdir()
    member = cut_tar(synth_download / "imdb_crop.tar", cut, 0.6, inside=True)
    out = tmp_path / "out"
    code, _, err = run_main(["--src", str(cut), "--out", str(out), "--workers", "2", *SMALL], capsys)
    line = one_error_line(err)
    assert code == 2 and "the download is incomplete" in line, "imdb.mat sits at the tar's end: no metadata"
    meta = ["--meta", str(synth_download / "imdb" / "imdb.mat")]
    code, _, err = run_main(["--src", str(cut), "--out", str(out), "--workers", "2", *meta, *SMALL], capsys)
    line = one_error_line(err)
    assert code == 2 and f"inside member {member}" in line and "the download is incomplete" in line
    assert "kept in" in line and not list(out.glob("*.tar"))
    kept = {p.stem for p in (out / ".work").glob("nm*.json")}
    assert 0 < len(kept) < 8, "some identities were finished before the cut, not all"

    import pack.packer

    done: list[str] = []
    original = pack.packer.process_identity
    monkeypatch.setattr(pack.packer, "process_identity", lambda job, *a: done.append(job.identity) or original(job, *a))
    code, _, err = run_main(["--src", str(synth_download / "imdb_crop.tar"), "--out", str(out), "--workers", "1",
                             *meta, *SMALL], capsys)
    assert code == 0, err
    assert len(done) == 8 - len(kept) and not kept & set(done), "the re-run read only the unfinished identities"
    assert file_tree(out) == file_tree(reference)


def test_a_tar_cut_between_members_is_not_taken_for_a_whole_one(synth_download: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    cut = tmp_path / "imdb_crop.tar"
    member = cut_tar(synth_download / "imdb_crop.tar", cut, 0.5, inside=False)
    code, _, err = run_main(["--src", str(cut), "--out", str(tmp_path / "o"), "--workers", "1",
                             "--meta", str(synth_download / "imdb" / "imdb.mat"), *SMALL], capsys)
    line = one_error_line(err)
    assert code == 2 and "before the end-of-archive marker" in line and member not in line


# -- a full disk --------------------------------------------------------------------------------------

class FullDisk:
    """A file that takes half of the first write, then fails as a full disk does."""

    def __init__(self, f, name: str) -> None:
        self.f, self.name = f, name

    def write(self, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)

    def writelines(self, parts: list[bytes]) -> None:
        self.write(b"".join(parts))

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


@pytest.mark.parametrize("stage, suffix, nth", [("spools", ".bin.partial", 3), ("shards", ".tar.partial", 2),
                                                 ("manifest", "manifest.json.partial", 1)])
def test_a_full_disk_is_one_line_and_the_rerun_is_identical(synth_download: Path, reference: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture, stage: str, suffix: str,
                                                             nth: int) -> None:
    """Simulated: the packer's one write path (base.files) fails with ENOSPC at the nth write of a stage, after
    half the bytes. One worker, so the patch holds in every write."""
    import base.files

    seen: list[str] = []

    def full_open(file, mode="r", *args, **kw):
        f = builtins.open(file, mode, *args, **kw)  # noqa: SIM115 (returned open, as open does)
        if "w" in mode and str(file).endswith(suffix):
            seen.append(str(file))
            if len(seen) == nth:
                return FullDisk(f, str(file))
        return f

    out = tmp_path / "out"
    monkeypatch.setattr(base.files, "open", full_open, raising=False)
    code, _, err = run_main(["--src", str(synth_download / "imdb_crop"), "--out", str(out), "--workers", "1",
                             *SMALL], capsys)
    line = one_error_line(err)
    assert code == 2 and f"the disk holding {out} is full" in line and "run the same command again" in line
    assert len(seen) == nth and not list(out.rglob("*.partial")), "the failed write removed its temp file"
    assert not Manifest.path(out).exists()
    monkeypatch.undo()
    assert run_main(["--src", str(synth_download / "imdb_crop"), "--out", str(out), "--workers", "1", *SMALL],
                    capsys)[0] == 0
    assert file_tree(out) == file_tree(reference)


def test_free_space_is_checked_before_reading_and_before_sharding(synth_download: Path, reference: Path,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    import pack.packer

    usage = namedtuple("usage", "total used free")
    answers: list[int] = []
    monkeypatch.setattr(pack.packer.shutil, "disk_usage", lambda path: usage(10**12, 0, answers.pop(0)))
    out, args = tmp_path / "out", ["--src", str(synth_download / "imdb_crop"), "--workers", "2", *SMALL]
    answers[:] = [10**6]
    code, _, err = run_main([*args, "--out", str(out)], capsys)
    line = one_error_line(err)
    assert code == 2 and "more disk for the spools and shards of up to" in line and "0.00 GB free" in line
    assert not list((out / ".work").glob("nm*")), "refused before reading anything"

    answers[:] = [10**12, 10**4]
    code, _, err = run_main([*args, "--out", str(out)], capsys)
    line = one_error_line(err)
    shards = sum(len(s.shards) for s in Manifest.read(reference).splits.values())
    assert code == 2 and f"more disk for {shards} shards" in line and not list(out.glob("*.tar"))
    assert len(list((out / ".work").glob("nm*.json"))) == 8, "every identity was read and is kept"

    answers[:] = [10**12, 10**12]
    assert run_main([*args, "--out", str(out)], capsys)[0] == 0
    assert file_tree(out) == file_tree(reference)


def test_a_disk_that_fills_mid_run_is_one_line_and_the_rerun_on_more_space_is_identical(
        synth_download: Path, reference: Path, small_disk, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """A real full disk (a 256 KiB tmpfs), as when another process fills it after the free-space check passed:
    one line naming OUT, no temp file left, the finished identities kept; with more space the same command
    finishes with the same bytes."""
    import pack.packer

    disk = small_disk(256)
    out = disk / "out"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pack.packer.shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    args = ["--src", str(synth_download / "imdb_crop"), "--out", str(out), "--workers", "1", *SMALL]
    code, _, err = run_main(args, capsys)
    line = one_error_line(err)
    assert code == 2 and f"the disk holding {out} is full" in line and "finished work is kept" in line
    assert not list(out.rglob("*.partial")) and not list(out.glob("*.tar"))
    kept = list((out / ".work").glob("nm*.json"))
    assert 0 < len(kept) < 8, "the identities finished before the disk filled are kept"
    subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
    assert run_main(args, capsys)[0] == 0
    assert file_tree(out) == file_tree(reference)


def test_a_read_only_out_is_one_line_and_nothing_is_written(synth_download: Path, small_disk,
                                                            capsys: pytest.CaptureFixture) -> None:
    ro = small_disk(64, readonly=True)
    code, _, err = run_main(["--src", str(synth_download / "imdb_crop"), "--out", str(ro / "out"), *SMALL], capsys)
    assert code == 2 and f"cannot write to --out {ro / 'out'}: Read-only file system" in one_error_line(err)
    code = synth.main(["--out", str(ro / "synth"), "--identities", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"python -m pack.synth: error: cannot write to --out {ro / 'synth'}: Read-only file " \
                                "system"
    assert not any(ro.iterdir())


def test_a_full_disk_under_pack_synth_is_one_line_with_no_temp_file_left(small_disk, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    args = ["--identities", "3", "--tar", "--workers", "1", "--no-progress"]
    assert synth.main(["--out", str(tmp_path / "whole"), *args]) == 0
    capsys.readouterr()
    disk = small_disk(512)
    out = disk / "s"
    code = synth.main(["--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"python -m pack.synth: error: the disk holding {out} is full") and \
        len(err.splitlines()) == 1, err
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.partial"))
    subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
    assert synth.main(["--out", str(out), *args]) == 0, "the same command finishes once there is space"
    made, whole = file_tree(out), file_tree(tmp_path / "whole")
    assert made.pop(synth.TRUTH) and whole.pop(synth.TRUTH), "the truth records the seconds taken: all else is equal"
    assert made == whole


@pytest.mark.parametrize("key_len", [1, 94, 95, 96, 97, 200, 600])
def test_shard_bytes_is_exact(tmp_path: Path, key_len: int) -> None:
    """The size the shard stage checks for is the size write_shard writes, long (GNU) member names included."""
    rng = np.random.default_rng(key_len)
    entries, samples = [], []
    for i in range(5):
        key = (f"{i}" + "k" * key_len)[:key_len]
        jpg, meta = bytes(int(rng.integers(1, 3000))), json.dumps({"path": key}).encode()
        entries.append((key, "nm", 0, len(jpg), b"12", meta))
        samples.append(Sample(key, [("cls", b"12"), ("jpg", jpg), ("json", meta)]))
    job: ShardJob = (tmp_path / "s.tar", tmp_path, entries)
    info: ShardInfo = write_shard(tmp_path / "s.tar", samples)
    assert shard_bytes(job) == info.bytes == (tmp_path / "s.tar").stat().st_size


def test_an_imdb_mat_whose_fields_differ_in_length_is_one_line_naming_them(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """Issue 21: an IndexError traceback before."""
    import scipy.io

    src = tmp_path / "imdb_crop"
    (src / "01").mkdir(parents=True)
    (src / "01" / "nm0000001_rm1.jpg").write_bytes(face_like(0))
    paths = np.empty((1, 3), dtype=object)
    for i in range(3):
        paths[0, i] = f"01/nm0000001_rm{i}.jpg"
    names = np.empty((1, 2), dtype=object)
    names[0, 0], names[0, 1] = "A", "A"
    imdb = {"full_path": paths, "name": names, "face_score": np.full((1, 3), 3.0),
            "second_face_score": np.full((1, 3), np.nan), "photo_taken": np.full((1, 3), 2010, np.uint16),
            "dob": np.full((1, 2), 723000, np.int32), "gender": np.ones((1, 3))}
    scipy.io.savemat(src / "imdb.mat", {"imdb": imdb})
    code, _, err = run_main(["--src", str(src), "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    line = one_error_line(err)
    assert code == 2 and "the 'imdb' struct's fields differ in length (name 2, dob 2 rows, the other 5 fields 3)" \
        in line


# -- odd file names and huge images -------------------------------------------------------------------

ODD = ["01/nm0000001_rm1 with space.jpg", "01/nm0000001_rm1_with_space.jpg", "01/nm0000001_rm2.v2.final.jpg",
       "01/nm0000001_rm3_café.jpg", "01/nm0000001_rm4\ttab.jpg", "01/nm0000001_rm5.jpg",
       "02/nm0000002_rm6 (1).jpg", "02/nm0000002_rm7.jpg", "02/nm0000002_rm8.JPG", "02/nm0000002_rm9.jpg",
       "03/nm0000003_rm10 a.jpg", "03/nm0000003_rm11.b.jpg", "03/nm0000003_rm12.jpg"]
HUGE = "02/nm0000002_rm9.jpg"
"""A PNG named .jpg whose header declares 19,000 x 19,000 pixels (its data is 8 x 8: decoding it would fail)."""


def huge_png(side: int = 19_000) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = side.to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def face_like(i: int) -> bytes:
    rng = np.random.default_rng(i)
    y, x = np.mgrid[:120, :120]
    img = np.stack([(x * rng.uniform(0.5, 2) + i * 9) % 256, (y * rng.uniform(0.5, 2)) % 256,
                    np.full_like(x, 40 * (i % 6))], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def odd_packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A download whose paths hold spaces, dots, a tab, non-ASCII and a name that collides once made safe."""
    root = tmp_path_factory.mktemp("odd dir") / "imdb crop"
    rows = []
    for i, path in enumerate(ODD):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(huge_png() if path == HUGE else face_like(i))
        rows.append({"dob": 723000, "photo_taken": 2010, "full_path": path, "gender": 1.0, "name": f"P{path[4:6]}",
                     "face_location": np.array([[1.0, 1.0, 100.0, 100.0]]), "face_score": 3.0,
                     "second_face_score": np.nan, "celeb_id": int(path[:2])})
    (root / "imdb.mat").write_bytes(mat_bytes(rows, ["P01", "P02", "P03"]))
    out = root.parent / "packed out"
    assert pack_main(["--src", str(root), "--out", str(out), "--min-images", "3", "--min-size", "50", "--size",
                      "64", "--eval-identities", "1", "--workers", "1", "--no-progress"]) == 0
    return out


def wds_samples(out: Path, split: str) -> list[dict]:
    urls = [str(out / s.name) for s in Manifest.read(out).splits[split].shards]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_odd_names_get_safe_unique_keys_read_back_by_webdataset(odd_packed: Path) -> None:
    manifest = Manifest.read(odd_packed)
    got = {}
    for split in ("train", "eval"):
        samples = wds_samples(odd_packed, split)
        assert len(samples) == manifest.splits[split].samples > 0
        for s in samples:
            assert set(s) >= {"__key__", "jpg", "cls", "json"}
            got[json.loads(s["json"])["path"]] = (s["__key__"], decode_label(s["cls"]))
    assert set(got) == set(ODD) - {HUGE}
    keys = sample_keys(ODD)
    assert {p: k for p, (k, _) in got.items()} == {p: keys[p] for p in got}
    assert len({k for k, _ in got.values()}) == len(got)
    assert all(k.replace("_", "").replace("-", "").isalnum() and k.isascii() for k, _ in got.values())
    assert verify_shards(odd_packed, workers=1, decode=True, progress=False) == []


def test_odd_names_read_back_by_dali_with_the_index(odd_packed: Path) -> None:
    from nvidia.dali import fn, pipeline_def

    manifest = Manifest.read(odd_packed)
    paths = []
    for split in ("train", "eval"):
        shards = manifest.splits[split].shards
        tars = [str(odd_packed / s.name) for s in shards]

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe(tars=tars, shards=shards):
            jpg, cls, meta = fn.readers.webdataset(paths=tars, index_paths=[str(odd_packed / s.index_name)
                                                                            for s in shards],
                                                   ext=["jpg", "cls", "json"], missing_component_behavior="error",
                                                   name="Reader")
            return fn.decoders.image(jpg, device="cpu"), cls, meta

        p = pipe()
        p.build()
        assert p.epoch_size("Reader") == manifest.splits[split].samples
        for _ in range(manifest.splits[split].samples):
            img, cls, meta = p.run()
            assert img.at(0).shape == (64, 64, 3)
            decode_label(bytes(cls.at(0)))
            paths.append(json.loads(bytes(meta.at(0)))["path"])
    assert sorted(paths) == sorted(set(ODD) - {HUGE})


def test_too_large_is_rejected_from_the_header_in_its_place_in_the_funnel(odd_packed: Path) -> None:
    with open(odd_packed / "rejects.csv", newline="") as f:
        rejects = {r["path"]: (r["reason"], r["detail"]) for r in csv.DictReader(f)}
    assert rejects == {HUGE: ("too_large", "19000x19000 = 361.0 Mpx, over --max-pixels 40000000")}
    steps = [s["step"] for s in Manifest.read(odd_packed).funnel]
    assert steps == ["listed", *REASONS]
    assert REASONS.index("too_small") < REASONS.index("too_large") < REASONS.index("corrupt")


def test_the_size_check_comes_before_decoding() -> None:
    """With a limit above its declared size the fake PNG is decoded and fails as corrupt; under it, never tried."""
    data = huge_png(9000)
    assert check(data, 64, 50, max_pixels=40_000_000).reason == "too_large"
    assert check(data, 64, 50, max_pixels=100_000_000).reason == "corrupt"
    assert check(face_like(0), 64, 50, max_pixels=120 * 120).reason is None
    assert check(face_like(0), 64, 50, max_pixels=120 * 120 - 1).reason == "too_large"


# -- flags, --dry-run workers, an older OUT -----------------------------------------------------------

@pytest.mark.parametrize("flag, value, words", [
    ("--min-images", "-1", "must be at least 1"), ("--min-images", "0", "must be at least 1"),
    ("--min-size", "-5", "must be 0 or more"), ("--max-pixels", "0", "must be at least 1"),
    ("--workers", "0", "must be at least 1"), ("--size", "x", "not an integer"),
])
def test_out_of_range_flags_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str,
                                        words: str) -> None:
    code, _, err = run_main(["--src", str(tmp_path), "--out", str(tmp_path / "o"), flag, value], capsys)
    assert code == 2 and f"argument {flag}: {words}" in one_error_line(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("source", ["imdb_crop", "imdb_crop.tar"])
def test_dry_run_uses_the_workers_and_gives_the_same_answer(synth_download: Path, tmp_path: Path, source: str,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    import pack.explore

    pools: list[int] = []
    real = pack.explore.get_context

    class Recording:
        def __init__(self, method: str) -> None:
            self.ctx = real(method)

        def Pool(self, n: int):  # noqa: N802 (multiprocessing's name)
            pools.append(n)
            return self.ctx.Pool(n)

    monkeypatch.setattr(pack.explore, "get_context", Recording)
    outputs = []
    for workers in ("1", "2"):
        code, out, err = run_main(["--src", str(synth_download / source), "--out", str(tmp_path / workers),
                                   "--dry-run", "--workers", workers, "--no-progress"], capsys)
        assert code == 0, err
        outputs.append(out.replace(str(tmp_path / workers), "OUT"))
    assert pools == [2] and outputs[0] == outputs[1] and "<- chosen" in outputs[0]


def test_an_out_from_an_older_packer_is_refused_not_mixed(reference: Path, synth_download: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    args = ["--src", str(synth_download / "imdb_crop"), "--workers", "1", *SMALL]
    finished = tmp_path / "finished"
    shutil.copytree(reference, finished)
    m = json.loads(Manifest.path(finished).read_text())
    m["version"] = 1
    Manifest.path(finished).write_text(json.dumps(m))
    before = file_tree(finished)
    code, _, err = run_main([*args, "--out", str(finished)], capsys)
    assert code == 2 and "older packer (format version 1" in one_error_line(err)
    assert file_tree(finished) == before

    unfinished = tmp_path / "unfinished"
    (unfinished / ".work").mkdir(parents=True)
    (unfinished / ".work" / "params.json").write_text(json.dumps(m["params"]))
    (unfinished / ".work" / "nm0000001.json").write_text("{}")
    before = file_tree(unfinished)
    code, _, err = run_main([*args, "--out", str(unfinished)], capsys)
    assert code == 2 and "unfinished run of an older packer" in one_error_line(err)
    assert file_tree(unfinished) == before

    code, out, err = run_main([*args, "--out", str(reference)], capsys)
    assert code == 0 and "nothing to do" in out, "this packer's own output is still reused"


def test_pack_bench_one_line_errors_and_the_verify_cost(reference: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    for argv, words in [(["--src", str(tmp_path), "--workers", "-1"], "must be at least 1"),
                        (["--src", str(tmp_path / "none")], "is not a folder"),
                        (["verify", "--data", str(tmp_path), "--out", str(tmp_path / "v")], "manifest.json not found"),
                        (["verify", "--data", str(reference), "--out", str(tmp_path / "v"), "--gb", "-1"],
                         "must be positive")]:
        code = bench.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and words in err and len(err.splitlines()) == 1, err
    result = tmp_path / "r.json"
    assert bench.main(["verify", "--data", str(reference), "--out", str(tmp_path / "v"), "--gb", "0.002",
                       "--shard-mb", "0.5", "--workers", "2", "--json", str(result)]) == 0
    r = json.loads(result.read_text())
    assert list(r["rows"]) == ["sha256, cold cache", "sha256, warm cache", "decode, one process"]
    for row in r["rows"].values():
        assert row["gb"] > 0 and row["s_per_gb"] == pytest.approx(row["seconds"] / row["gb"])
    assert "s/GB" in capsys.readouterr().out

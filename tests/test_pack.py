"""python -m pack on the synthetic download: exact funnel, valid shards and indexes, determinism, resume."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pack.__main__ import main as pack_main
from pack.format import Manifest, decode_label, sample_keys

from .probe_data import file_tree, kill_mid_pack

MIN_IMAGES = 20
ARGS = ["--min-images", str(MIN_IMAGES), "--shard-samples", "150", "--workers", "2", "--no-progress"]
CORRUPT = {"zero_byte", "not_image", "truncated"}


@pytest.fixture(scope="module")
def packed(synth_download: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "out"
    assert pack_main(["--src", str(synth_download / "imdb_crop"), "--out", str(out), *ARGS]) == 0
    return out


def expected_reasons(truth: dict, min_images: int, min_size: int = 100) -> dict[str, str]:
    """The packer's rules, recomputed from what the generator says it injected."""
    reasons: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for path, t in truth["images"].items():
        kind = t["dirt"][0] if t["dirt"] else None
        if kind in ("no_face", "second_face"):
            reasons[path] = kind
        else:
            groups.setdefault(t["nm_id"], []).append(path)
    for paths in groups.values():
        paths.sort()
        if len(paths) < min_images:
            reasons.update(dict.fromkeys(paths, "few_images"))
            continue
        ok = []
        for k, path in enumerate(paths):
            if len(ok) + len(paths) - k < min_images:
                reasons.update(dict.fromkeys(paths[k:], "few_images"))
                break
            t = truth["images"][path]
            kind = t["dirt"][0] if t["dirt"] else None
            if kind == "missing":
                reasons[path] = "missing"
            elif min(t["width"], t["height"]) < min_size:
                reasons[path] = "too_small"
            elif kind in CORRUPT:
                reasons[path] = "corrupt"
            else:
                ok.append(path)
        if len(ok) < min_images:
            reasons.update(dict.fromkeys(ok, "few_images"))
    return reasons


def read_rejects(out: Path) -> dict[str, str]:
    with open(out / "rejects.csv") as f:
        return {r["path"]: r["reason"] for r in csv.DictReader(f)}


def read_samples(out: Path, split: str) -> list[dict]:
    urls = [str(p) for p in sorted(out.glob(f"{split}-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_funnel_and_rejects_match_the_truth_exactly(packed: Path, synth_truth: dict) -> None:
    want = expected_reasons(synth_truth, MIN_IMAGES)
    assert read_rejects(packed) == want
    manifest = Manifest.read(packed)
    dropped = {s["step"]: s["dropped"] for s in manifest.funnel}
    assert {k: v for k, v in dropped.items() if v} == dict(Counter(want.values()))
    kept = synth_truth["n_images"] - len(want)
    assert manifest.funnel[-1]["left"] == kept
    assert manifest.splits["train"].samples + manifest.splits["eval"].samples == kept


def test_shards_hold_every_kept_image_once_with_valid_fields(packed: Path, synth_truth: dict) -> None:
    rejects = read_rejects(packed)
    kept = {p for p in synth_truth["images"] if p not in rejects}
    seen: dict[str, str] = {}
    with open(packed / "identities.csv") as f:
        ids = {row["nm_id"]: row for row in csv.DictReader(f)}
    per_identity: Counter = Counter()
    keys = sample_keys(synth_truth["images"])
    for split in ("train", "eval"):
        for s in read_samples(packed, split):
            meta = json.loads(s["json"])
            assert meta["path"] not in seen
            seen[meta["path"]] = split
            assert s["__key__"] == keys[meta["path"]] == meta["path"][:-4].replace("/", "_")
            assert meta["nm_id"] == synth_truth["images"][meta["path"]]["nm_id"]
            assert decode_label(s["cls"]) == int(ids[meta["nm_id"]]["cls"])
            assert ids[meta["nm_id"]]["split"] == split
            assert {"path", "nm_id", "name", "face_score", "second_face_score", "src_width", "src_height",
                    "photo_taken", "flags"} <= set(meta)
            im = Image.open(io.BytesIO(s["jpg"]))
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (224, 224))
            assert not im.info.get("progressive") and not im.info.get("progression")
            per_identity[meta["nm_id"]] += 1
    assert set(seen) == kept
    assert min(per_identity.values()) >= MIN_IMAGES, "every identity keeps at least --min-images"
    assert {nm: int(r["images"]) for nm, r in ids.items()} == dict(per_identity)


def test_splits_are_identity_disjoint_and_shards_equal_sized(packed: Path) -> None:
    manifest = Manifest.read(packed)
    train = {json.loads(s["json"])["nm_id"] for s in read_samples(packed, "train")}
    evals = {json.loads(s["json"])["nm_id"] for s in read_samples(packed, "eval")}
    assert train and evals and not train & evals
    for split in ("train", "eval"):
        counts = [s.samples for s in manifest.splits[split].shards]
        assert all(c == 150 for c in counts[:-1]) and 0 < counts[-1] <= 150
        for s in manifest.splits[split].shards:
            data = (packed / s.name).read_bytes()
            assert len(data) == s.bytes and hashlib.sha256(data).hexdigest() == s.sha256
            index = (packed / s.index_name).read_bytes()
            assert hashlib.sha256(index).hexdigest() == s.index_sha256


def test_index_files_equal_wds2idx(packed: Path, tmp_path: Path) -> None:
    wds2idx = Path(sys.executable).with_name("wds2idx")
    for tar in sorted(packed.glob("*.tar")):
        out = tmp_path / (tar.stem + ".idx")
        subprocess.run([str(wds2idx), str(tar), str(out)], check=True, capture_output=True)
        assert out.read_text() == tar.with_suffix(".idx").read_text(), tar.name


def test_dali_cpu_reads_every_sample_once_with_the_index(packed: Path) -> None:
    from nvidia.dali import fn, pipeline_def

    tars = sorted(str(p) for p in packed.glob("train-*.tar"))

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        jpg, cls, meta = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                               ext=["jpg", "cls", "json"], name="Reader")
        return fn.decoders.image(jpg, device="cpu"), cls, meta

    p = pipe()
    p.build()
    n = p.epoch_size("Reader")
    paths = []
    for _ in range(n):
        img, _, meta = p.run()
        assert img.at(0).shape == (224, 224, 3)
        paths.append(json.loads(bytes(meta.at(0)))["path"])
    want = {json.loads(s["json"])["path"] for s in read_samples(packed, "train")}
    assert len(paths) == len(set(paths)) == len(want) and set(paths) == want


def test_streak_detector_catches_synthetic_streaks_and_spares_clean_images(packed: Path, synth_truth: dict) -> None:
    flags = {}
    for split in ("train", "eval"):
        for s in read_samples(packed, split):
            meta = json.loads(s["json"])
            flags[meta["path"]] = meta["flags"]
    kind = {p: (synth_truth["images"][p]["dirt"] or ["clean"])[0] for p in flags}
    streak = [("streaks" in flags[p]) for p in flags if kind[p] == "streaks"]
    clean = [("streaks" in flags[p]) for p in flags if kind[p] == "clean"]
    assert len(streak) >= 5 and np.mean(streak) >= 0.9
    assert np.mean(clean) <= 0.01
    gray = [("grayscale" in flags[p]) for p in flags if kind[p] == "grayscale"]
    assert np.mean(gray) == 1.0 and np.mean([("grayscale" in flags[p]) for p in flags if kind[p] == "clean"]) == 0
    pairs = [(p, synth_truth["images"][p]["duplicate_of"]) for p in flags if kind[p] == "duplicate"]
    pairs = [(a, b) for a, b in pairs if b in flags]
    assert pairs, "some duplicated images are kept"
    for a, b in pairs:  # identical bytes: the later path in sort order carries the flag
        later, first = max(a, b), min(a, b)
        assert "duplicate" in flags[later] and "duplicate" not in flags[first]


def test_same_output_twice_and_from_the_tar(packed: Path, synth_download: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert pack_main(["--src", str(synth_download / "imdb_crop"), "--out", str(again), *ARGS]) == 0
    assert file_tree(again) == file_tree(packed)
    from_tar = tmp_path / "tar"
    assert pack_main(["--src", str(synth_download / "imdb_crop.tar"), "--out", str(from_tar), *ARGS]) == 0
    assert file_tree(from_tar) == file_tree(packed)


def test_resume_after_kill_is_byte_identical(packed: Path, synth_download: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    kill_mid_pack(["--src", str(synth_download / "imdb_crop"), "--out", str(out), *ARGS[:-3], "--workers", "1",
                   "--no-progress"], out, 3)
    assert not Manifest.path(out).exists(), "killed before the end"
    (out / "train-000000.tar.partial").write_bytes(b"half a shard")
    (out / "train-000001.tar").write_bytes(b"a shard from an earlier, different attempt")
    assert pack_main(["--src", str(synth_download / "imdb_crop"), "--out", str(out), *ARGS]) == 0
    assert file_tree(out) == file_tree(packed)


def test_a_finished_output_is_reused_and_other_parameters_are_refused(packed: Path, synth_download: Path,
                                                                      tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    before = file_tree(copy)
    r = subprocess.run([sys.executable, "-m", "pack", "--src", str(synth_download / "imdb_crop"), "--out", str(copy),
                        *ARGS], capture_output=True, text=True)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    r = subprocess.run([sys.executable, "-m", "pack", "--src", str(synth_download / "imdb_crop"), "--out", str(copy),
                        "--min-images", "30"], capture_output=True, text=True)
    assert r.returncode == 2 and "other parameters" in r.stderr and len(r.stderr.splitlines()) == 1
    assert file_tree(copy) == before


@pytest.mark.parametrize("case", ["no_mat", "not_mat", "no_struct", "empty_src", "missing_src"])
def test_bad_input_one_line_exit_2(tmp_path: Path, synth_download: Path, case: str) -> None:
    import scipy.io

    src = tmp_path / "imdb_crop"
    src.mkdir()
    shutil.copy(next((synth_download / "imdb_crop" / "00").glob("*.jpg"), None) or
                next((synth_download / "imdb_crop").rglob("*.jpg")), src / "a.jpg")
    if case == "not_mat":
        (src / "imdb.mat").write_bytes(b"not a mat file")
    elif case == "no_struct":
        scipy.io.savemat(src / "imdb.mat", {"wiki": np.zeros(3)})
    elif case == "empty_src":
        (src / "a.jpg").unlink()
        shutil.copy(synth_download / "imdb" / "imdb.mat", src / "imdb.mat")
    elif case == "missing_src":
        src = tmp_path / "nowhere"
    r = subprocess.run([sys.executable, "-m", "pack", "--src", str(src), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list((tmp_path / "out").glob("*.tar")) if (tmp_path / "out").exists() else True


def test_options_sample_cap_drop_and_eval_count(synth_download: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert pack_main(["--src", str(synth_download / "imdb_crop"), "--out", str(out), "--min-images", "10",
                      "--identities", "6", "--max-images-per-identity", "12", "--drop-flagged",
                      "--eval-identities", "2", "--no-progress", "--workers", "2"]) == 0
    with open(out / "identities.csv") as f:
        ids = list(csv.DictReader(f))
    assert len(ids) <= 6 and sum(r["split"] == "eval" for r in ids) == 2
    assert all(10 <= int(r["images"]) <= 12 for r in ids)
    for split in ("train", "eval"):
        for s in read_samples(out, split):
            assert json.loads(s["json"])["flags"] == [], "--drop-flagged keeps no flagged image"
    reasons = set(read_rejects(out).values())
    assert {"not_sampled", "capped"} <= reasons


def test_dry_run_explores_without_writing_shards(synth_download: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pack", "--src", str(synth_download / "imdb_crop"), "--out",
                        str(tmp_path / "d"), "--dry-run", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "<- chosen" in r.stdout and "min-images" in r.stdout
    assert (tmp_path / "d" / "explore.png").stat().st_size > 10_000
    assert not list((tmp_path / "d").glob("*.tar"))


def test_no_file_is_read_for_metadata_drops_or_doomed_identities(synth_download: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import pack.source

    reads: list[str] = []
    original = pack.source.Job.read
    monkeypatch.setattr(pack.source.Job, "read", lambda self, path: reads.append(path) or original(self, path))
    out = tmp_path / "o"
    assert pack_main(["--src", str(synth_download / "imdb_crop"), "--out", str(out), *ARGS[:-3], "--workers", "1",
                      "--no-progress"]) == 0
    with open(out / "rejects.csv") as f:
        rejects = {r["path"]: r for r in csv.DictReader(f)}
    unread = {p for p, r in rejects.items() if r["reason"] in ("no_face", "second_face")
              or (r["reason"] == "few_images" and "metadata" in r["detail"])
              or (r["reason"] == "few_images" and "no longer reach" in r["detail"])}
    assert unread and len(reads) == len(set(reads)), "no file is read twice"
    assert not unread & set(reads)
    assert any("no longer reach" in r["detail"] for r in rejects.values()), "the early stop was exercised"


@pytest.mark.parametrize("name", ["a", "x" * 99, "x" * 100, "x" * 150, "nm0000001_rm1_1990-1-1_2010.jpg", "é/ü.json"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 10**6, 8**11 - 1, 8**11])
def test_fast_tar_header_equals_tarfiles(name: str, size: int) -> None:
    from pack.shards import _header, _tarfile_header

    assert _header(name, size) == _tarfile_header(name, size)


def test_pack_bench_reports_one_runs_figures(synth_download: Path, tmp_path: Path, capsys) -> None:
    from pack import bench

    out = tmp_path / "r.json"
    assert bench.main(["--src", str(synth_download / "imdb_crop"), "--limit", "6", "--per-bucket", "4",
                       "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    # ratios are kept to 2 decimals: below 0.25 (a machine busy while the packer runs) that rounding exceeds 2%
    assert r["ratio"] == pytest.approx(r["baseline"]["seconds"] / r["packer"]["seconds"], rel=0.02, abs=0.005)
    assert r["baseline"]["images_per_s"] == pytest.approx(r["images"] / r["baseline"]["seconds"], rel=0.02)
    assert [b["bucket"] for b in r["by_crop_side"]] == ["< 224", "224-447", ">= 448 (draft)"]
    for b in r["by_crop_side"]:
        assert 1 <= b["images"] <= 4 and b["ratio"] == pytest.approx(b["baseline_ms"] / b["packer_ms"], rel=0.02,
                                                                      abs=0.005)
    assert "ratio" in capsys.readouterr().out
    assert bench.main(["--src", str(tmp_path)]) == 2

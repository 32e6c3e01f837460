"""pack.verify: damaged shards are caught and named (shard, and key with --decode); the run-folder cache."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pack.format import Manifest, ShardError, parse_index
from pack.verify import Problem, ensure_verified, find_undecodable, main, verify_shards

from .probe_data import checker_image, flip_inside_every_jpeg, jpg_members, write_split, zero_header


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three train shards of 20 and one eval shard, 48 px JPEGs."""
    root = tmp_path_factory.mktemp("verify") / "data"
    write_split(root, [checker_image(48, seed=i) for i in range(60)], [i % 5 for i in range(60)], "train", 20)
    write_split(root, [checker_image(48, seed=100 + i) for i in range(12)], [5 + i % 2 for i in range(12)], "eval")
    return root


@pytest.fixture
def data(clean: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(clean, copy)
    return copy


def keep_mtime(path: Path):
    st = path.stat()
    return lambda: os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_clean_dataset_has_no_problems(clean: Path) -> None:
    assert verify_shards(clean, progress=False) == []
    assert verify_shards(clean, ["eval"], workers=2, decode=True, progress=False) == []
    assert find_undecodable(clean, "train") == []


def pixels(root: Path, shard: str, i: int) -> np.ndarray:
    _, offset, size = jpg_members(root, shard)[i]
    with open(root / shard, "rb") as f:
        return np.asarray(Image.open(io.BytesIO(os.pread(f.fileno(), size, offset))).convert("RGB"), np.int16)


def test_flipped_bytes_are_caught_by_the_hash_though_every_image_still_decodes(clean: Path, data: Path) -> None:
    flip_inside_every_jpeg(data, "train-000001.tar")
    assert find_undecodable(data, "train") == [], "the damage this test makes is invisible to a decoder"
    assert np.abs(pixels(clean, "train-000001.tar", 0) - pixels(data, "train-000001.tar", 0)).mean() > 5
    problems = verify_shards(data, progress=False)
    assert problems == [Problem(str(data / "train-000001.tar"), None, problems[0].what)]
    assert "sha256 differs" in problems[0].what
    assert verify_shards(data, ["eval"], progress=False) == []
    with pytest.raises(ShardError) as e:
        ensure_verified(data, ["train"], None, progress=False)
    msg = str(e.value)
    assert "train-000001.tar" in msg and "sha256 differs" in msg and "\n" not in msg and "other" not in msg


def test_every_bad_shard_counted_and_the_first_named(data: Path) -> None:
    flip_inside_every_jpeg(data, "train-000002.tar")
    flip_inside_every_jpeg(data, "train-000000.tar")
    (data / "train-000001.tar").unlink()
    with pytest.raises(ShardError) as e:
        ensure_verified(data, ["train", "eval"], None, workers=3, progress=False)
    assert str(e.value).startswith(f"shard {data / 'train-000000.tar'}: sha256 differs")
    assert "2 other shards are bad too" in str(e.value)
    assert [p.what for p in verify_shards(data, progress=False)][1] == "missing"


def test_a_damaged_or_truncated_index_is_named(data: Path) -> None:
    idx = data / "eval-000000.idx"
    idx.write_text(idx.read_text().replace(" 512 ", " 1024 ", 1))
    tar = data / "train-000002.tar"
    tar.write_bytes(tar.read_bytes()[:-10240])
    problems = verify_shards(data, progress=False)
    assert [(Path(p.shard).name, p.what.split(" (")[0]) for p in problems] == [
        ("train-000002.tar", f"has {tar.stat().st_size} bytes, the manifest says {tar.stat().st_size + 10240}"),
        ("eval-000000.tar", "index eval-000000.idx: sha256 differs from the manifest's"),
    ]


def test_decode_names_each_bad_key_and_find_undecodable_agrees(data: Path) -> None:
    bad = zero_header(data, "train-000001.tar", [3, 11])
    problems = verify_shards(data, workers=2, decode=True, progress=False)
    shard = str(data / "train-000001.tar")
    assert problems[0] == Problem(shard, None, problems[0].what) and "sha256" in problems[0].what
    assert [(p.shard, p.key) for p in problems[1:]] == [(shard, k) for k in bad]
    assert all("jpg does not decode" in p.what for p in problems[1:])
    found = find_undecodable(data, "train")
    assert [(p.shard, p.key) for p in found] == [(shard, k) for k in bad]
    assert find_undecodable(data, "train", shards=["train-000000.tar", "train-000002.tar"]) == []
    assert len(find_undecodable(data, "train", limit=1)) == 1
    with pytest.raises(ShardError, match="no shard train-000009.tar"):
        find_undecodable(data, "train", shards=["train-000009.tar"])


def test_decode_checks_labels_and_json(data: Path) -> None:
    """A cls past num_classes and a json that does not parse, written without changing the shard's size."""
    shard = "eval-000000.tar"
    entries = parse_index((data / shard).with_suffix(".idx").read_text(), shard)
    key, members = entries[4]
    by_ext = {m.ext: m for m in members}
    with open(data / shard, "r+b") as f:
        f.seek(by_ext["cls"].offset)
        f.write(b"9")
        f.seek(by_ext["json"].offset)
        f.write(b"#")
    whats = [p.what for p in verify_shards(data, ["eval"], workers=1, decode=True, progress=False) if p.key == key]
    assert whats == ["cls 9 is not below the manifest's num_classes 7", "json does not parse"]


def test_cache_answers_for_the_same_manifest_and_files(data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "run" / "verified.json"
    assert ensure_verified(data, ["train"], cache, progress=False) is True
    assert ensure_verified(data, ["train"], cache, progress=False) is False
    assert ensure_verified(data, ["eval"], cache, progress=False) is True, "eval was never hashed"
    assert ensure_verified(data, ["train", "eval"], cache, progress=False) is False
    assert not list(cache.parent.glob("*.partial"))

    restore = keep_mtime(data / "train-000001.tar")
    flip_inside_every_jpeg(data, "train-000001.tar")
    restore()
    assert ensure_verified(data, ["train"], cache, progress=False) is False, "same size and mtime: trusted"
    os.utime(data / "train-000001.tar")
    with pytest.raises(ShardError, match="train-000001.tar: sha256 differs"):
        ensure_verified(data, ["train"], cache, progress=False)


def test_cache_is_keyed_by_the_manifest_and_survives_garbage(data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "verified.json"
    assert ensure_verified(data, ["eval"], cache, progress=False) is True
    m = Manifest.read(data)
    m.flags = {"changed": 1}
    m.write(data)
    assert ensure_verified(data, ["eval"], cache, progress=False) is True, "another manifest: hashed again"
    assert json.loads(cache.read_text())["manifest_sha256"] != ""
    cache.write_text("{half")
    assert ensure_verified(data, ["eval"], cache, progress=False) is True
    assert ensure_verified(data, ["eval"], cache, progress=False) is False


def test_unknown_split_or_missing_manifest_is_a_shard_error(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="has no split 'test'"):
        ensure_verified(data, ["test"], None, progress=False)
    with pytest.raises(ShardError, match="manifest.json not found"):
        verify_shards(tmp_path / "nothing", progress=False)


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main([*args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exit_codes_and_summary(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["--data", str(data), "--workers", "2"], capsys)
    assert code == 0 and "all good" in out and err == ""
    assert "train" in out and "eval" in out and "sizes and sha256" in out
    bad = zero_header(data, "eval-000000.tar", [2])
    code, out, err = run_cli(["--data", str(data), "--decode", "--split", "eval"], capsys)
    assert code == 1 and err == ""
    assert f"BAD shard {data / 'eval-000000.tar'}, sample {bad[0]}: jpg does not decode" in out
    assert out.splitlines()[1].split() == ["eval", "1", "12", "0.000", "1", "1"]
    for args, words in [(["--data", str(tmp_path / "none")], "is not a folder"),
                        (["--data", str(tmp_path)], "manifest.json not found"),
                        (["--data", str(data), "--split", "test"], "invalid choice: 'test'"),
                        (["--data", str(data), "--workers", "0"], "must be at least 1")]:
        code, out, err = run_cli(args, capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("python -m pack verify: error: ")


def test_python_m_pack_verify_is_the_entry_point(data: Path) -> None:
    flip_inside_every_jpeg(data, "train-000000.tar")
    r = subprocess.run([sys.executable, "-m", "pack", "verify", "--data", str(data), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "sha256 differs" in r.stdout and r.stderr == ""
    m = json.loads(Manifest.path(data).read_text())
    m["version"] = 99
    Manifest.path(data).write_text(json.dumps(m))
    r = subprocess.run([sys.executable, "-m", "pack", "verify", "--data", str(data)], capture_output=True, text=True)
    assert r.returncode == 2 and "version 99" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_verify_is_independent_of_the_worker_count(data: Path) -> None:
    zero_header(data, "train-000002.tar", [0])
    flip_inside_every_jpeg(data, "train-000000.tar")
    one = verify_shards(data, workers=1, decode=True, progress=False)
    assert one == verify_shards(data, workers=3, decode=True, progress=False)
    assert sum(p.key is None for p in one) == 2


def test_decode_checks_each_image_against_the_manifests_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 21: shards of 1 x 1 images under a manifest that says 48 px passed `--decode`."""
    root = tmp_path / "tiny"
    write_split(root, [checker_image(48, seed=i)[:1, :1] for i in range(6)], [i % 2 for i in range(6)], "train")
    manifest = json.loads(Manifest.path(root).read_text())
    manifest["image_size"] = 48
    Manifest.path(root).write_text(json.dumps(manifest))
    assert verify_shards(root, progress=False) == [], "sizes and hashes are right: only decoding sees it"
    problems = verify_shards(root, decode=True, workers=1, progress=False)
    assert len(problems) == 6 and all("jpg is 1x1 pixels, the manifest's image_size says 48x48" in p.what
                                      for p in problems)
    assert main(["--data", str(root), "--decode", "--workers", "1", "--no-progress"]) == 1
    assert "BAD shard" in capsys.readouterr().out


def test_an_output_with_no_samples_is_not_all_good(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 21: a pack that kept nothing wrote 0 shards, and `pack verify` said "all good"."""
    from pack.format import SplitInfo

    root = tmp_path / "empty"
    root.mkdir()
    empty = {"train": SplitInfo(0, 0, []), "eval": SplitInfo(0, 0, [])}
    Manifest(image_size=64, num_classes=0, splits=empty).write(root)
    assert main(["--data", str(root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "splits train and eval hold no samples (nothing was packed: re-pack)" in out and "all good" not in out
    with pytest.raises(ShardError, match="split train holds no samples"):
        ensure_verified(root, ["train"], None, progress=False)


def test_an_empty_split_beside_a_full_one_is_fine(data: Path) -> None:
    """--eval-identities 0 packs no eval split: that alone is not a problem."""
    manifest = Manifest.read(data)
    manifest.splits["eval"] = type(manifest.splits["eval"])(0, 0, [])
    manifest.write(data)
    assert verify_shards(data, progress=False) == []

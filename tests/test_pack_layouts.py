"""python -m pack beyond imdb.mat: one folder per identity (or a tar of that tree), and a path,identity list.

The same synthetic faces, written by pack.synth in the imdb layout and in the folders layout, must pack to the same
images per identity apart from what only imdb.mat can tell (no face found, a second face, a listed file that is
missing); the folders layout must be byte-identical whatever --workers, from the folder or its tar, and after a
kill -9; every tree it cannot read as one folder per identity is one line and exit code 2.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from base.cli import field_docs
from base.lock import FolderLock
from pack import synth
from pack.__main__ import build_parser
from pack.__main__ import main as pack_main
from pack.format import Manifest, decode_label
from pack.listing import Row, list_folders
from pack.packer import LOCK
from pack.selection import Params

from .cli import one_line_error
from .probe_data import file_tree, kill_mid_pack

PROG = "python -m pack"
ARGS = ["--min-images", "1", "--size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same 12 synthetic identities in both layouts (the folders one also as faces.tar), and their truths."""
    root = tmp_path_factory.mktemp("twins")
    for layout in ("imdb", "folders"):
        assert synth.main(["--out", str(root / layout), "--identities", "12", "--layout", layout, "--workers", "2",
                           "--no-progress", *(["--tar"] if layout == "folders" else [])]) == 0
    return {"imdb": root / "imdb", "folders": root / "folders",
            "imdb_truth": json.loads((root / "imdb" / synth.TRUTH).read_text()),
            "folders_truth": json.loads((root / "folders" / synth.TRUTH).read_text())}


@pytest.fixture(scope="module")
def folders_packed(twins: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("folders") / "out"
    assert pack_main(["--src", str(twins["folders"] / "faces"), "--out", str(out), "--workers", "2", *ARGS]) == 0
    return out


def samples(out: Path) -> dict[str, dict]:
    """Every stored sample by its source path: split, class, its jpg's sha256, its json."""
    manifest = Manifest.read(out)
    got = {}
    for split, info in manifest.splits.items():
        urls = [str(out / s.name) for s in info.shards]
        for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            meta = json.loads(s["json"])
            got[meta["path"]] = {"split": split, "cls": decode_label(s["cls"]), "meta": meta,
                                 "jpg": hashlib.sha256(s["jpg"]).hexdigest()}
    return got


def rejects(out: Path) -> dict[str, str]:
    with open(out / "rejects.csv", newline="") as f:
        return {r["path"]: r["reason"] for r in csv.DictReader(f)}


def basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


# -- the same faces in both layouts ---------------------------------------------------------------------

def test_both_layouts_keep_the_same_images_per_identity_but_what_only_imdb_mat_knows(twins: dict,
                                                                                   folders_packed: Path,
                                                                                   tmp_path: Path) -> None:
    imdb_out = tmp_path / "imdb"
    assert pack_main(["--src", str(twins["imdb"] / "imdb_crop"), "--out", str(imdb_out), "--workers", "2",
                      *ARGS]) == 0
    from_imdb, from_folders = samples(imdb_out), samples(folders_packed)
    truth = {basename(p): t for p, t in twins["folders_truth"]["images"].items()}
    assert {basename(p): t["dirt"] for p, t in twins["imdb_truth"]["images"].items()} == \
        {k: t["dirt"] for k, t in truth.items()}, "pack.synth wrote the same images with the same dirt"

    # What only imdb.mat can tell: a face score of -inf (no_face), a second face, a listed file that is missing.
    # Without it, a no_face crop is kept unless its size fails (most are 1 x 1), a second_face crop is kept,
    # and a missing file is not listed at all. Everything else is the same image, bytes, class, split and flags.
    kept_imdb = {basename(p): s for p, s in from_imdb.items()}
    kept_folders = {basename(p): s for p, s in from_folders.items()}
    only_folders = set(kept_folders) - set(kept_imdb)
    assert not set(kept_imdb) - set(kept_folders)
    assert only_folders and {truth[k]["dirt"][0] for k in only_folders} == {"no_face", "second_face"}
    for k in only_folders:
        if truth[k]["dirt"] == ["no_face"]:
            assert min(truth[k]["width"], truth[k]["height"]) >= 100
    wanted = {k for k, t in truth.items() if t["dirt"] in (["second_face"], ["no_face"]) and t["decodable"]
              and min(t["width"], t["height"]) >= 100}
    assert only_folders == wanted
    for k, s in kept_imdb.items():
        f = kept_folders[k]
        assert (f["jpg"], f["cls"], f["split"], f["meta"]["flags"]) == (s["jpg"], s["cls"], s["split"],
                                                                         s["meta"]["flags"]), k
        assert f["meta"]["identity"] == s["meta"]["nm_id"] == truth[k]["nm_id"]
        assert set(f["meta"]) == {"path", "identity", "src_width", "src_height", "flags"}

    reasons_imdb = {basename(p): r for p, r in rejects(imdb_out).items()}
    reasons_folders = {basename(p): r for p, r in rejects(folders_packed).items()}
    for k, r in reasons_imdb.items():
        if r == "missing":
            assert k not in reasons_folders and k not in kept_folders, "a missing file is not listed at all"
        elif r == "no_face" and truth[k]["width"] == 1:
            assert reasons_folders[k] == "too_small", "the 1 x 1 placeholder fails the size check instead"
        elif r in ("no_face", "second_face"):
            assert k in kept_folders
        else:
            assert reasons_folders[k] == r, k
    assert set(reasons_folders) <= set(reasons_imdb)
    manifest = Manifest.read(folders_packed)
    assert manifest.layout == "folders" and Manifest.read(imdb_out).layout == "imdb"
    assert manifest.identities == sorted({t["nm_id"] for t in truth.values() if t["file"]})
    with open(folders_packed / "identities.csv", newline="") as f:
        ids = list(csv.DictReader(f))
    assert [r["identity"] for r in ids] == manifest.identities and list(ids[0]) == ["cls", "identity", "split",
                                                                                    "images"]


def test_folders_are_byte_identical_whatever_workers_and_from_their_tar(twins: dict, folders_packed: Path,
                                                                      tmp_path: Path) -> None:
    one = tmp_path / "one"
    assert pack_main(["--src", str(twins["folders"] / "faces"), "--out", str(one), "--workers", "1", *ARGS]) == 0
    assert file_tree(one) == file_tree(folders_packed)
    from_tar = tmp_path / "tar"
    assert pack_main(["--src", str(twins["folders"] / "faces.tar"), "--out", str(from_tar), "--workers", "2",
                      *ARGS]) == 0
    assert file_tree(from_tar) == file_tree(folders_packed)
    contents = tmp_path / "contents.tar"  # `tar cf contents.tar -C faces .`: no top folder to strip
    with tarfile.open(contents, "w") as tar:
        tar.add(twins["folders"] / "faces", arcname=".")
    again = tmp_path / "contents"
    assert pack_main(["--src", str(contents), "--out", str(again), "--workers", "1", *ARGS]) == 0
    assert file_tree(again) == file_tree(folders_packed)


def test_kill_9_mid_pack_then_the_same_command_gives_identical_shards(twins: dict, folders_packed: Path,
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "killed"
    kill_mid_pack(["--src", str(twins["folders"] / "faces"), "--out", str(out), "--workers", "1", *ARGS], out, 3)
    assert not Manifest.path(out).exists(), "killed before the end"
    assert (out / LOCK).is_file(), "the killed run's lock is left behind"
    assert pack_main(["--src", str(twins["folders"] / "faces"), "--out", str(out), "--workers", "2", *ARGS]) == 0
    assert "taking over" in capsys.readouterr().err, "the dead holder's lock is taken over, with a word"
    assert file_tree(out) == file_tree(folders_packed)


def test_the_csv_layout_packs_what_it_lists_and_names_a_missing_file(twins: dict, folders_packed: Path,
                                                                     tmp_path: Path) -> None:
    faces = twins["folders"] / "faces"
    listed = sorted(str(p.relative_to(faces)) for p in faces.rglob("*") if p.is_file())
    list_file = tmp_path / "list.csv"
    with open(list_file, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["identity", "path", "note"])  # a header may name the columns in any order, and others
        w.writerows([[p.split("/")[0], p, "x"] for p in listed])
        w.writerow(["nm0000000", "nm0000000/gone.jpg", "not on disk"])
    out = tmp_path / "csv"
    assert pack_main(["--src", str(faces), "--list", str(list_file), "--out", str(out), "--workers", "2",
                      *ARGS]) == 0
    manifest = Manifest.read(out)
    assert manifest.layout == "csv" and manifest.funnel[0]["left"] == len(listed) + 1
    assert rejects(out) == {**rejects(folders_packed), "nm0000000/gone.jpg": "missing"}
    shards = {p.name: p.read_bytes() for p in out.glob("*-*.*")}
    assert shards == {p.name: p.read_bytes() for p in folders_packed.glob("*-*.*")}, "the same rows, the same shards"


def test_the_folder_above_imdb_crop_is_found(twins: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 21: `--src` one folder above imdb_crop used to say "pass --meta", and with --meta wrote 0 shards."""
    args = ["--min-images", "5", "--identities", "3", "--workers", "1", "--size", "32", "--no-progress"]
    below = tmp_path / "below"
    assert pack_main(["--src", str(twins["imdb"] / "imdb_crop"), "--out", str(below), *args]) == 0
    capsys.readouterr()
    for name, extra in (("above", []), ("above_meta", ["--meta", str(twins["imdb"] / "imdb" / "imdb.mat")])):
        assert pack_main(["--src", str(twins["imdb"]), "--out", str(tmp_path / name), *extra, *args]) == 0
        assert f"reading the images from {twins['imdb'] / 'imdb_crop'}" in capsys.readouterr().out
        assert file_tree(tmp_path / name) == file_tree(below)
    only_tar = tmp_path / "download"
    only_tar.mkdir()
    (only_tar / "imdb_crop.tar").symlink_to(twins["folders"] / "faces.tar")
    line = one_line_error(pack_main, ["--src", str(only_tar), "--out", str(tmp_path / "o")], capsys, PROG)
    assert f"pass --src {only_tar / 'imdb_crop.tar'}" in line
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "x").mkdir(parents=True)
    shutil.copy(next((twins["imdb"] / "imdb_crop").rglob("*.jpg")), elsewhere / "x" / "a.jpg")
    line = one_line_error(pack_main, ["--src", str(elsewhere), "--meta", str(twins["imdb"] / "imdb" / "imdb.mat"),
                                      "--out", str(tmp_path / "e"), *args], capsys, PROG)
    assert f"listed files looked for is in {elsewhere}" in line and "is --src the folder" in line
    assert not list((tmp_path / "e").glob("*.tar")) and not (tmp_path / "e" / ".work").exists()


@pytest.mark.parametrize("flags, step, hint", [
    (["--min-images", "1000"], "few_images", "lower --min-images"),
    (["--min-size", "5000"], "too_small", "lower --min-size"),
    (["--max-pixels", "10"], "too_large", "raise --max-pixels"),
])
def test_a_selection_that_keeps_nothing_is_an_error_naming_the_step(twins: dict, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture, flags: list[str],
                                                                    step: str, hint: str) -> None:
    out = tmp_path / "o"
    base = ["--src", str(twins["folders"] / "faces"), "--out", str(out), "--workers", "1", "--size", "32",
            "--no-progress"]
    line = one_line_error(pack_main, [*base, "--min-images", "1", *flags], capsys, PROG)
    assert f"no image is left to pack: {step} dropped the last" in line and hint in line
    assert not list(out.glob("*.tar")) and not (out / ".work").exists() and not (out / LOCK).exists()
    assert pack_main([*base, "--min-images", "1", "--identities", "2"]) == 0, "another selection in the same --out"


# -- what the folders layout refuses --------------------------------------------------------------------

def jpeg(i: int, side: int = 120) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def tree(root: Path, spec: dict[str, int]) -> Path:
    """`root/<identity>/<k>.jpg` for each identity and image count."""
    for identity, n in spec.items():
        (root / identity).mkdir(parents=True)
        for k in range(n):
            (root / identity / f"{k:03d}.jpg").write_bytes(jpeg(k + 10 * len(identity)))
    return root


def bad_tree(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """A broken source and the words its one-line error must hold."""
    src = tree(tmp_path / "src", {"0000045": 3, "0000099": 3})
    if case == "file_beside_folders":
        (src / "names.txt").write_text("0000045 Someone\n")
        return ["--src", str(src)], "holds files beside its identity folders (names.txt)"
    if case == "empty_identity":
        (src / "0000123").mkdir()
        return ["--src", str(src)], "identity folder 0000123 holds no files"
    if case == "not_utf8":
        os.mkdir(os.fsencode(src) + b"/caf\xe9")
        return ["--src", str(src)], "holds a name that is not valid UTF-8, b'caf\\xe9'"
    if case == "folder_loop":
        (src / "loop").symlink_to(src / "loop")
        return ["--src", str(src)], f"{src / 'loop'} is a symbolic link loop"
    if case == "file_loop":
        (src / "0000045" / "a.jpg").symlink_to(src / "0000045" / "b.jpg")
        (src / "0000045" / "b.jpg").symlink_to(src / "0000045" / "a.jpg")
        return ["--src", str(src)], f"{src / '0000045' / 'a.jpg'} is a symbolic link loop"
    if case == "parent_loop":
        (src / "0000045" / "up").symlink_to(src)
        return ["--src", str(src)], "0000045/up is a folder inside identity folder 0000045"
    if case == "one_level_too_high":  # VGGFace2 as downloaded: train/ and test/ above the identity folders
        (src / "0000045").rename(src / "train")
        (src / "train" / "n000002").mkdir()
        return ["--src", str(src)], f"try --src {src / 'train'}"
    if case == "tar_with_a_link":
        tar_path = tmp_path / "src.tar"
        (src / "0000045" / "link.jpg").symlink_to("000.jpg")
        with tarfile.open(tar_path, "w") as tar:
            tar.add(src, arcname="src")
        return ["--src", str(tar_path)], "member src/0000045/link.jpg is a symbolic link"
    list_file = tmp_path / "list.csv"
    rows = {"csv_missing_column": "0000045/000.jpg,0000045\n0000099/000.jpg\n",
            "csv_outside_src": "0000045/000.jpg,0000045\n../secret.jpg,0000045\n",
            "csv_absolute": f"{src / '0000045' / '000.jpg'},0000045\n",
            "csv_twice": "0000045/000.jpg,a\n0000045/./000.jpg,b\n",
            "csv_not_utf8": None}[case]
    if rows is None:
        list_file.write_bytes(b"path,identity\n0000045/000.jpg,Andr\xe9\n")
    else:
        list_file.write_text(rows)
    words = {"csv_missing_column": "line 2 has no identity column",
             "csv_outside_src": f"line 2: ../secret.jpg is outside --src {src}",
             "csv_absolute": "is outside --src", "csv_twice": "line 2 lists 0000045/./000.jpg again (first on line 1)",
             "csv_not_utf8": "is not UTF-8 text"}[case]
    return ["--src", str(src), "--list", str(list_file)], words


@pytest.mark.parametrize("case", ["file_beside_folders", "empty_identity", "not_utf8", "folder_loop", "file_loop",
                                  "parent_loop", "one_level_too_high", "tar_with_a_link", "csv_missing_column",
                                  "csv_outside_src", "csv_absolute", "csv_twice", "csv_not_utf8"])
def test_a_bad_layout_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    argv, words = bad_tree(tmp_path, case)
    out = tmp_path / "out"
    line = one_line_error(pack_main, [*argv, "--out", str(out), "--min-images", "1", "--no-progress"], capsys, PROG)
    assert words in line, line
    assert not out.exists(), "refused before anything is written"


@pytest.mark.parametrize("flags, words", [
    (["--min-face-score", "2"], "--min-face-score reads imdb.mat, which the folders layout does not have"),
    (["--keep-second-face", "--min-face-score", "1"], "--min-face-score and --keep-second-face read imdb.mat"),
    (["--layout", "folders", "--keep-second-face"], "--keep-second-face reads imdb.mat"),
    (["--layout", "folders", "--meta", "x.mat"], "--meta reads imdb.mat, which the folders layout"),
    (["--layout", "folders", "--list", "x.csv"], "--list names the images of the csv layout"),
    (["--layout", "csv"], "--layout csv needs --list FILE"),
])
def test_flags_that_mean_nothing_for_the_layout_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           flags: list[str], words: str) -> None:
    src = tree(tmp_path / "src", {"a": 2, "b": 2})
    line = one_line_error(pack_main, ["--src", str(src), "--out", str(tmp_path / "o"), *flags], capsys, PROG)
    assert words in line, line


def test_a_link_to_nothing_in_an_identity_folder_is_a_missing_image(tmp_path: Path) -> None:
    src = tree(tmp_path / "src", {"a": 2, "b 2": 3})
    (src / "a" / "gone.jpg").symlink_to(src / "a" / "nowhere.jpg")
    (src / "a" / "notes.txt").write_text("not an image")
    listing = list_folders(src)
    assert [r.path for r in listing.rows] == ["a/000.jpg", "a/001.jpg", "a/gone.jpg", "a/notes.txt", "b 2/000.jpg",
                                              "b 2/001.jpg", "b 2/002.jpg"]
    assert {r.identity for r in listing.rows} == {"a", "b 2"} and listing.rows[0] == Row("a/000.jpg", "a")
    out = tmp_path / "o"
    assert pack_main(["--src", str(src), "--out", str(out), "--min-images", "1", "--size", "32", "--workers", "1",
                      "--no-progress", "--eval-identities", "1"]) == 0
    assert rejects(out) == {"a/gone.jpg": "missing", "a/notes.txt": "corrupt"}
    assert Manifest.read(out).identities == ["a", "b 2"]
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "eval-000000.idx", "eval-000000.tar", "identities.csv", Manifest.path(out).name, "rejects.csv",
        "train-000000.idx", "train-000000.tar"]), "no lock, no .work, no temp file left"


def test_dry_run_reads_the_folders_layout(twins: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert pack_main(["--src", str(twins["folders"] / "faces.tar"), "--out", str(tmp_path / "d"), "--dry-run",
                      "--min-images", "5", "--workers", "1", "--no-progress"]) == 0
    assert "<- chosen" in capsys.readouterr().out and (tmp_path / "d" / "explore.png").stat().st_size > 5000
    assert not list((tmp_path / "d").glob("*.tar"))


# -- one writer per --out -------------------------------------------------------------------------------

def test_a_second_pack_into_the_same_out_is_refused_naming_the_first(twins: dict, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    out.mkdir()
    with FolderLock(out / LOCK, kind="pack", verb="packs into"):  # held by this live process
        line = one_line_error(pack_main, ["--src", str(twins["folders"] / "faces"), "--out", str(out), *ARGS],
                              capsys, PROG)
    assert f"{out} is in use by another pack, pid {os.getpid()}" in line
    assert not (out / ".work").exists() and not (out / LOCK).exists()


# -- flags from one declaration, and fast ----------------------------------------------------------------

def test_every_params_field_is_a_flag_with_its_default_and_docstring() -> None:
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions}
    a = parser.parse_args(["--src", "s", "--out", "o"])
    assert Params(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Params)}) == Params()
    docs = field_docs(Params)
    for f in dataclasses.fields(Params):
        assert flags[f.name].option_strings == ["--" + f.name.replace("_", "-")]
        assert docs[f.name] and flags[f.name].help.startswith(docs[f.name]), f.name
    help_text = parser.format_help()
    assert "(default: 224)" in help_text and "imdb layout only" in help_text


@pytest.mark.parametrize("argv", [["--help"], ["--src", "s", "--out", "o", "--size", "0"]])
def test_help_and_argument_errors_import_no_numpy_pil_scipy_or_torch(argv: list[str], tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "pack", *argv], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == (0 if argv == ["--help"] else 2)
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not imported & {"numpy", "PIL", "scipy", "torch", "tqdm"}, imported & {"numpy", "PIL"}


# -- the engine reads a folder-layout pack --------------------------------------------------------------

@pytest.mark.slow
def test_training_with_the_online_monitor_and_evaluation_run_on_folder_layout_shards(twins: dict,
                                                                                      tmp_path: Path) -> None:
    """Nothing engine-side assumes IMDb ids: a few CPU steps, monitored on the held-out identities, then
    engine.evaluate on the same split."""
    from engine.evaluate import main as evaluate_main

    data = tmp_path / "data"
    assert pack_main(["--src", str(twins["folders"] / "faces"), "--out", str(data), "--eval-identities", "3",
                      "--workers", "2", *ARGS]) == 0
    run = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "engine" / "train.py"), "--data", str(data), "--out", str(run),
                        "--cpu", "--arch", "resnet18", "--image-size", "16", "--batch-size", "16", "--proj-dims",
                        "32,16", "--workers", "1", "--epochs", "1", "--max-steps", "4", "--eval-every", "1",
                        "--log-every", "1", "--precision", "fp32", "--optimizer", "adamw", "--lr", "0.01"],
                       capture_output=True, text=True, timeout=900, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    monitored = [x for x in records if "eval_precision_at_1" in x]
    assert [x["step"] for x in monitored] == [0, 4] and all(0 <= x["eval_precision_at_1"] <= 1 for x in monitored)
    out = tmp_path / "eval"
    assert evaluate_main(["--data", str(data), "--checkpoint", str(run / "backbone.safetensors"), "--out", str(out),
                          "--cpu", "--batch-size", "256", "--workers", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    manifest = Manifest.read(data)
    assert report["n_images"] == manifest.splits["eval"].samples and report["n_identities"] == 3
    assert np.isfinite(report["model"]["precision_at_1"]) and np.isfinite(report["model"]["roc_auc"])

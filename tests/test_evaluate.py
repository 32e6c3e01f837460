"""python -m engine.evaluate end to end on packed synthetic data: the report, the outliers and their flag
enrichment, and every bad input refused with one line and exit code 2."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data.shards import Split, read_member
from engine.evaluate import main as evaluate_main
from engine.model import ModelConfig, SimCLRNet, export, load_exported
from engine.outliers import FLAGS
from engine.report import projection_figure
from pack.format import Manifest

from .cli import one_line_error
from .probe_data import checker_image, write_split, zero_header

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packed_eval(pack_synth) -> Path:
    """The packer's defaults keep flagged images (streaks and all): what the enrichment needs."""
    return pack_synth("evalpack", "--min-images", "10", "--eval-identities", "0.5")


def test_export_round_trip(tmp_path: Path) -> None:
    net = SimCLRNet(ModelConfig(arch="resnet18", proj_dims=[64, 16]))
    export(net, tmp_path / "backbone.safetensors", {"image_size": 64})
    again, meta = load_exported(tmp_path)
    assert meta["image_size"] == 64 and again.cfg == net.cfg
    for (k, a), (_, b) in zip(net.state_dict().items(), again.state_dict().items(), strict=True):
        assert (a.float() == b).all(), k


def test_evaluate_writes_report_pictures_embeddings_and_flag_enrichment(packed_eval: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = SimCLRNet(ModelConfig(arch="resnet18", proj_dims=[64, 16]))
    export(net, tmp_path / "backbone.safetensors", {"image_size": 16})  # a quarter of the packed size: cheap
    out = tmp_path / "eval"
    assert evaluate_main(["--data", str(packed_eval), "--checkpoint", str(tmp_path / "backbone.safetensors"), "--out",
                          str(out), "--cpu", "--save-embeddings", "--batch-size", "512", "--workers", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    for block in ("model", "random_init", "pixels"):
        for metric in ("precision_at_1", "map_at_r", "r_precision", "knn_accuracy", "roc_auc", "tar_at_far_1e-3",
                       "tar_at_far_1e-4", "verification_accuracy", "verification_accuracy_std"):
            assert np.isfinite(report[block][metric]), (block, metric)
        assert report[block]["impostor_pairs"] >= 1_000_000
    assert report["n_images"] == Manifest.read(packed_eval).splits["eval"].samples
    for name in ("report.md", "roc.png", "retrieval.png", "projection.png", "outliers.png", "outliers.csv"):
        assert (out / name).stat().st_size > 0, name
    emb = np.load(out / "embeddings.npy")
    keys = (out / "keys.txt").read_text().split()
    assert emb.dtype == np.float32 and emb.shape[0] == len(keys) == report["n_images"]
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)

    # outliers.csv: every image of an identity with two or more images, highest score first, with its flags
    flags_of = {}
    for e in Split.open(packed_eval, "eval").entries():
        flags_of[e.key] = json.loads(read_member(e.members["json"]))["flags"]
    with open(out / "outliers.csv") as f:
        rows = list(csv.DictReader(f))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and len(rows) == report["outliers"]["ranked"]
    assert all(r["flags"] == ",".join(flags_of[r["key"]]) for r in rows)

    # the enrichment table, recomputed here from outliers.csv for the model
    assert "streaks" in report["outliers"]["flag_counts"] and report["outliers"]["flag_counts"]["streaks"] > 0
    table = report["outliers"]["enrichment"]
    assert set(table) == {"model", "random_init"}
    for name in ("model", "random_init"):
        assert [(r["flag"], r["top_share"]) for r in table[name]] == [(f, s) for f in FLAGS for s in (0.01, 0.05)]
    for r in table["model"]:
        n_top = math.ceil(r["top_share"] * len(rows))
        flagged = [r["flag"] in row["flags"].split(",") for row in rows]
        assert (r["top_n"], r["top_flagged"], r["flagged"]) == (n_top, sum(flagged[:n_top]), sum(flagged))
        assert r["share_in_top_ci"][0] <= r["share_in_top"] <= r["share_in_top_ci"][1]
    streaks = next(r for r in table["model"] if r["flag"] == "streaks" and r["top_share"] == 0.05)
    print(f"streaks: {streaks['share_in_split']:.3f} of ranked images, {streaks['share_in_top']:.3f} of the top 5% "
          f"(enrichment {streaks['enrichment']:.2f}x, p {streaks['p_value']:.2g}) for a random ResNet-18")
    md = (out / "report.md").read_text()
    assert "How outliers are scored: outlier score = cosine distance" in md
    assert md.count("| streaks | 1% (") == 2 and md.count("| duplicate | 5% (") == 2

    # every picture written is shown in report.md and said in words; the input the model needs is stated
    pictures = {p.name for p in out.glob("*.png")}
    assert pictures == {"roc.png", "retrieval.png", "projection.png", "outliers.png"}
    for name in pictures:
        assert f"![{name}]({name})" in md and f"`{name}`: " in md, name
    assert "mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)" in md and "resized to 16 px" in md
    assert not list(out.glob("*.partial"))


def _cli_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    return one_line_error(evaluate_main, args, capsys, "python -m engine.evaluate")


def test_bad_data_is_one_line_and_exit_2(packed_eval: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--checkpoint", "none", "--arch", "resnet18", "--out", str(tmp_path / "e"), "--cpu", "--workers", "0"]
    (tmp_path / "empty").mkdir()
    assert "manifest.json not found" in _cli_error([*base, "--data", str(tmp_path / "empty")], capsys)
    assert "has no split 'test'" in _cli_error([*base, "--data", str(packed_eval), "--split",
                                                                   "test"], capsys)
    assert "nothing to evaluate" in _cli_error(base, capsys)
    assert "not found" in _cli_error(["--checkpoint", str(tmp_path / "nothing"), *base[4:], "--data",
                                      str(packed_eval)], capsys)
    singles = tmp_path / "singles"
    write_split(singles, [checker_image(16, seed=i) for i in range(5)], list(range(5)), "eval")
    assert "no identity has two images" in _cli_error([*base, "--data", str(singles)], capsys)


def test_damaged_and_undecodable_shards_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A flipped byte is caught by the hash before anything is embedded; a sample that does not decode (hash
    check skipped) is named by shard and key instead of a DataLoader traceback."""
    data = tmp_path / "data"
    write_split(data, [checker_image(16, seed=i) for i in range(12)], [i % 3 for i in range(12)], "eval")
    base = ["--checkpoint", "none", "--arch", "resnet18", "--data", str(data), "--out", str(tmp_path / "e"), "--cpu",
            "--workers", "0", "--image-size", "16"]
    shard = data / "eval-000000.tar"
    pristine = shard.read_bytes()
    keys = zero_header(data, "eval-000000.tar", [4])
    err = _cli_error(base, capsys)
    assert "eval-000000.tar" in err and "sha256" in err and "--no-verify" in err
    err = _cli_error([*base, "--no-verify"], capsys)
    assert "eval-000000.tar" in err and keys[0] in err and "does not decode" in err
    shard.write_bytes(pristine)
    assert evaluate_main(base) == 0 and (tmp_path / "e" / "verified.json").is_file()


def test_a_split_with_one_identity_is_refused_at_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """It used to hang for ever looking for impostor pairs."""
    one = tmp_path / "one"
    write_split(one, [checker_image(16, seed=i) for i in range(6)], [3] * 6, "eval")
    t0 = time.perf_counter()
    err = _cli_error(["--checkpoint", "none", "--arch", "resnet18", "--data", str(one), "--out", str(tmp_path / "e"),
                      "--cpu"], capsys)
    assert "has 1 identity: identity metrics need at least two" in err
    assert time.perf_counter() - t0 < 30


def test_the_command_line_prints_no_traceback(tmp_path: Path) -> None:
    """The real entry point, as a user runs it: an empty --data used to end in a ShardError traceback."""
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "engine.evaluate", "--checkpoint", "none", "--arch", "resnet18",
                        "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "e"), "--cpu"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_enumerated_flags_list_their_choices(capsys: pytest.CaptureFixture) -> None:
    err = _cli_error(["--checkpoint", "none", "--features", "pixels", "--out", "x"], capsys)
    assert "invalid choice: 'pixels' (choose from " in err and "backbone" in err and "projection" in err


def test_help_and_argument_errors_import_no_torch() -> None:
    """--help and a bad flag answer before torch is imported (it takes 6-14 s here under load)."""
    for args, code in ((["--help"], 0), (["--checkpoint", "none", "--out", "x", "--arch", "resnet9"], 2),
                       (["--checkpoint", "none", "--out", "x"], 2)):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "engine.evaluate", *args], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
        imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time")]
        assert r.returncode == code and len(imported) > 20, r.stderr[-2000:]
        assert not [m for m in imported if m.split(".")[0] in ("torch", "torchvision", "numpy")], args
        errors = [line for line in r.stderr.splitlines() if not line.startswith("import time")]
        assert (errors == [] if code == 0 else len(errors) == 1 and "error: " in errors[0]), errors


def _tiny_split(root: Path) -> Path:
    write_split(root, [checker_image(16, seed=i) for i in range(12)], [i % 3 for i in range(12)], "eval")
    return root


def test_a_shard_replaced_by_another_valid_tar_is_refused_before_its_index_is_read(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A valid tar of the same size (one member of zeros), so only the hash can tell. The index used to be read
    first, at offsets into the wrong file, its bytes taken for labels ("label '\\x00' is not a class number")."""
    data = _tiny_split(tmp_path / "data")
    shard = data / "eval-000000.tar"
    size = shard.stat().st_size
    member = tarfile.TarInfo("notes.bin")
    member.size = size - 3 * tarfile.BLOCKSIZE  # its header, then two zero blocks end the archive
    with open(shard, "wb") as f:
        f.write(member.tobuf(format=tarfile.USTAR_FORMAT) + bytes(member.size) + bytes(2 * tarfile.BLOCKSIZE))
    with tarfile.open(shard) as tf:
        assert tf.getnames() == ["notes.bin"] and shard.stat().st_size == size
    err = _cli_error(["--checkpoint", "none", "--arch", "resnet18", "--data", str(data), "--out", str(tmp_path / "e"),
                      "--cpu", "--workers", "0"], capsys)
    assert str(shard) in err and "sha256" in err and "label" not in err


def _written_whole(out: Path) -> None:
    """Nothing half-written: no temp file, every picture a complete PNG, and no report without its pictures."""
    assert not list(out.glob("*.partial"))
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            im.verify()
    assert not (out / "report.json").exists()


def test_a_full_disk_is_one_line_naming_the_path_and_nothing_half_written(small_disk, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    out = small_disk(48) / "e"  # room for verified.json and the CSV, not for every picture
    err = _cli_error([*_no_model_args(tmp_path), "--out", str(out), "--image-size", "16"], capsys)
    print(err, sorted(p.name for p in out.iterdir()))
    assert "is full" in err and str(out) in err, err
    _written_whole(out)


def _no_model_args(tmp_path: Path) -> list[str]:
    return ["--checkpoint", "none", "--arch", "resnet18", "--data", str(_tiny_split(tmp_path / "data")), "--cpu",
            "--workers", "0"]


def test_a_read_only_out_is_one_line(small_disk, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = small_disk(64, readonly=True) / "e"
    err = _cli_error([*_no_model_args(tmp_path), "--out", str(out)], capsys)
    assert f"cannot write to --out {out}: Read-only file system" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission")
def test_a_forbidden_out_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    err = _cli_error([*_no_model_args(tmp_path), "--out", str(locked / "e")], capsys)
    assert f"cannot write to --out {locked / 'e'}: Permission denied" in err


def test_projection_counts_and_colours_every_identity_it_shows() -> None:
    """21 identities whose labels are 20 apart (the old colour, label % 20, gave them all one): the 20 largest are
    shown, each in a colour of its own, the title saying 20 of 21; with 5 identities, 5 of 5 (not 20)."""
    labels = torch.repeat_interleave(torch.arange(21) * 20, torch.arange(21) + 2)  # identity 0 smallest
    emb = torch.nn.functional.normalize(torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(0)), dim=1)
    fig = projection_figure(emb, labels)
    ax = fig.axes[0]
    assert "the 20 largest of 21 identities" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == 20 and legend[0] == "400 (22)" and "0 (2)" not in legend
    colours = {tuple(np.round(c.get_facecolor()[0], 3)) for c in ax.collections}
    assert len(ax.collections) == 20 and len(colours) == 20
    fig = projection_figure(emb[labels < 100], labels[labels < 100])
    assert "the 5 largest of 5 identities" in fig.axes[0].get_title()
    assert len(fig.axes[0].get_legend().get_texts()) == 5

"""A run folder as a user meets it, in this process and fast: one recipe per folder, each step logged once, the
loader's mid-epoch state, a precision the machine cannot run, and full or read-only disks (a real tmpfs)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from base.errors import refusal
from base.files import disk_error
from engine.checkpoint import Checkpointer
from engine.config import parse
from engine.data import AugmentConfig, LoaderConfig, TrainLoader
from engine.data.preview import main as preview_main
from engine.runlog import drop_after
from engine.train import main as train_main
from engine.trainer import Trainer

from .cli import one_line_error
from .probe_data import checker_split, file_tree

PROG = "engine/train.py"


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; each Trainer here builds its own Accelerator."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def packed(root: Path, seed: int = 0) -> Path:
    return checker_split(root, 40, 4, per_shard=20, seed=seed)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return packed(tmp_path / "data")


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--cpu", "--arch", "resnet18", "--image-size", "16",
            "--batch-size", "8", "--proj-dims", "32,16", "--workers", "1", "--eval-every", "0", "--precision", "fp32",
            "--optimizer", "adamw", "--lr", "0.01", *extra]


def start(argv: list[str]) -> None:
    """What engine/train.py does up to the first step: resolve, take the folder, check it, write config.json."""
    Trainer(parse(argv)).lock.release()
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_run_folder_refuses_another_recipe_and_takes_run_control_changes(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    start(args(data, run))
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["data"]["loader"] == "torch" and recorded["runtime"]["compile"] is False, "resolved values"
    before = file_tree(run)
    capsys.readouterr()
    line = one_line_error(train_main, args(data, run, "--arch", "resnet34", "--lr", "0.5", "--batch-size", "4"),
                          capsys, PROG)
    assert "--batch-size 8 -> 4, --arch resnet18 -> resnet34, --lr 0.01 -> 0.5" in line, line
    assert str(run / "config.json") in line and "Traceback" not in line
    assert file_tree(run) == before, "nothing written"

    repacked = packed(tmp_path / "repacked", seed=100)  # the same shape of data, other images
    assert "manifest_sha256 " in one_line_error(train_main, args(repacked, run), capsys, PROG)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    start(args(moved, run, "--log-every", "5", "--max-steps", "7"))
    out = capsys.readouterr().out
    assert f"changed since the run's last start: --data {data} -> {moved}, --max-steps 0 -> 7, --log-every 20 -> 5" \
        in out, out
    assert (run / "config.json").read_bytes() == before["config.json"], "config.json is the first start's, unchanged"


def test_a_mid_epoch_loader_state_needs_the_same_batch_size(data: Path) -> None:
    aug = AugmentConfig(size=16)
    loader = TrainLoader(data, aug, LoaderConfig(backend="torch", batch_size=8, workers=0, initial_fill=8))
    next(iter(loader))
    mid_epoch = loader.state_dict()
    other = TrainLoader(data, aug, LoaderConfig(backend="torch", batch_size=4, workers=0, initial_fill=8))
    with pytest.raises(ValueError, match="batch_size 8 -> 4"):
        other.load_state_dict(mid_epoch)
    other.load_state_dict({**mid_epoch, "step": 0, "epoch": 1})  # an epoch's start depends on no batch size
    assert (other.epoch, other.step) == (1, 0)


def test_a_resume_drops_the_records_logged_after_its_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)] + [json.dumps({"step": 3, "eval": 0.5}),
                                                                          json.dumps({"step": 4, "loss": 1.0})]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # a line cut short by a kill
    drop_after(path, 4)
    assert path.read_text().splitlines() == lines[:4]
    drop_after(path, 0)  # a fresh start over an unfinished one measures the random init again
    assert path.read_text() == ""


def test_fp16_on_the_cpu_is_one_line_before_anything_is_written(data: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    line = one_line_error(train_main, args(data, tmp_path / "run", "--precision", "fp16"), capsys, PROG)
    assert "--precision fp16: the CPU has no fp16 autocast" in line
    assert not (tmp_path / "run").exists()


def test_a_read_only_run_folder_is_one_line(data: Path, small_disk, capsys: pytest.CaptureFixture) -> None:
    disk = small_disk(64, readonly=True)
    line = one_line_error(train_main, args(data, disk / "run"), capsys, PROG)
    assert str(disk / "run") in line and "Read-only file system" in line, line


def test_the_checkpoint_writers_full_disk_errors_are_read_as_enospc(small_disk, tmp_path: Path) -> None:
    """safetensors (Rust's `os error 28` in its message) and torch.save ("unexpected pos") carry no errno."""
    from safetensors.torch import save_file

    disk = small_disk(64)
    writers = (lambda p: save_file({"x": torch.zeros(1 << 16)}, str(p)), lambda p: torch.save(torch.zeros(1 << 16), p))
    for write in writers:
        with pytest.raises(Exception) as raised:
            write(disk / "big")
        error = disk_error(raised.value, disk)
        assert error is not None and error.errno == errno.ENOSPC, raised.value
        assert refusal(error).startswith(f"the disk holding {disk} is full")
        (disk / "big").unlink(missing_ok=True)
    assert disk_error(ValueError("a bug"), tmp_path) is None, "a disk with room is not blamed"


def test_a_checkpoint_that_fills_the_disk_leaves_no_temp_folder_and_the_last_one_whole(small_disk) -> None:
    run = small_disk(512)
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(64, 64)
    model, optimizer = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    checkpointer = Checkpointer(acc, run, keep=3)
    first = checkpointer.save(1, {"step": 1}, {})
    assert Checkpointer.complete(first)
    with open(run / "filler", "wb") as f:  # leave less room than one more checkpoint needs
        f.write(b"\0" * (shutil.disk_usage(run).free - 16 * 1024))
    with pytest.raises(OSError) as raised:
        checkpointer.save(2, {"step": 2}, {})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(run / "checkpoints")
    assert [p.name for p in (run / "checkpoints").iterdir()] == [first.name], "no .tmp-step-* left"
    assert Checkpointer.complete(first) and checkpointer.find("auto") == first


def test_preview_on_a_read_only_or_full_disk_is_one_line_and_leaves_no_part(
        data: Path, small_disk, capsys: pytest.CaptureFixture) -> None:
    prog = "python -m engine.data.preview"
    for disk, expected in ((small_disk(64, readonly=True), "Read-only file system"), (small_disk(16), "is full")):
        png = disk / "grid.png"
        line = one_line_error(preview_main, ["--data", str(data), "--out", str(png), "--loader", "torch"], capsys, prog)
        assert str(disk) in line and expected in line, line
        assert list(disk.iterdir()) == [], "no PNG, whole or partial"

"""The training config: help in words, choices, one-line errors, shipped recipes, a run's config.json back in."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import pytest

from engine import config as config_module
from engine.config import TrainConfig, apply, build_parser, field_docs, leaves, load_file, parse, to_dict, validate
from engine.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def train_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """engine/train.py's main in this process (a subprocess would import torch again): (exit code, stderr)."""
    code = train_main(list(args))
    return code, capsys.readouterr().err


def test_every_flag_is_explained_in_words() -> None:
    text = build_parser().format_help()
    for leaf in leaves():
        assert len(leaf.doc.split()) >= 3, f"{leaf.flag} has no help text"
        assert leaf.flag in text
    assert "lr x B/256" in text, "--help says how --lr is scaled by the batch"
    assert "{auto,bf16,fp16,fp32}" in text and "{lars,sgd,adamw}" in text


def test_literal_fields_become_choices_and_a_bad_choice_is_one_line(capsys: pytest.CaptureFixture) -> None:
    choices = {leaf.name: leaf.choices for leaf in leaves() if leaf.choices}
    assert set(choices) >= {"precision", "optimizer", "loader", "arch", "lr_scaling", "log_with", "loss_impl"}
    code, err = train_cli(capsys, "--data", "d", "--out", "o", "--precision", "bogus")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    line = err.strip()
    assert line.startswith("engine/train.py: error:") and all(p in line for p in ("bf16", "fp16", "fp32"))
    with pytest.raises(ValueError, match="not one of"):
        apply(TrainConfig(), {"runtime": {"precision": "fp64"}})


def test_validate_reports_every_problem_at_once(capsys: pytest.CaptureFixture) -> None:
    code, err = train_cli(capsys, "--data", "d", "--out", "o", "--lr", "-1", "--batch-size", "0", "--crop-min-area",
                          "2", "--temperature", "0")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 4, err
    for flag in ("--lr", "--batch-size", "--crop-min-area", "--temperature"):
        assert sum(flag in line for line in lines) == 1
    assert all(line.startswith("engine/train.py: error: --") for line in lines)
    assert validate(parse(["--data", "d", "--out", "o"])) == []
    assert any("--out" in p for p in validate(parse(["--data", "d"])))


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[optim]\nlr = 1\n[loss]\ntemperature = 0.2\n[data]\nbatch_size = 64\n')
    cfg = parse(["--data", "d", "--out", "o", "--config", str(f), "--batch-size", "32", "--no-channels-last"])
    assert cfg.optim.lr == 1.0 and cfg.loss.temperature == 0.2 and cfg.data.batch_size == 32
    assert cfg.runtime.channels_last is False and cfg.runtime.compile is None
    with pytest.raises(ValueError, match="unknown config key"):
        apply(TrainConfig(), {"learning_rate": 1})
    with pytest.raises(ValueError, match="batch_size"):
        apply(TrainConfig(), {"data": {"batch_size": "many"}})
    with pytest.raises(ValueError, match="expected true or false"):
        apply(TrainConfig(), {"runtime": {"cpu": "yes"}})
    code, err = train_cli(capsys, "--data", "x")
    assert code == 2 and "--out: required" in err and len(err.strip().splitlines()) == 1


def test_a_runs_config_json_repeats_the_run(tmp_path: Path) -> None:
    cfg = parse(["--data", "d", "--out", "o", "--config", str(ROOT / "configs" / "demo.toml"), "--compile"])
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(to_dict(cfg)))
    again = parse(["--config", str(saved)])
    assert to_dict(again) == to_dict(cfg)
    with pytest.raises(ValueError, match="no such file"):
        load_file(tmp_path / "missing.toml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_recipes_parse_validate_and_name_their_command(path: Path) -> None:
    cfg = parse(["--config", str(path), "--data", "d", "--out", "o"])
    assert validate(cfg) == []
    head = path.read_text().splitlines()[:6]
    assert any("engine/train.py --config configs/" + path.name in line for line in head), "begins with its command"


def test_recipes_hold_what_they_promise() -> None:
    names = {p.name for p in CONFIGS}
    assert {"demo.toml", "simclr-r50-224.toml", "debug.toml"} <= names
    seed = parse(["--config", str(ROOT / "configs" / "simclr-r50-224.toml"), "--data", "d", "--out", "o"])
    assert (seed.model.arch, seed.data.image_size, seed.data.batch_size, seed.optim.optimizer) == (
        "resnet50", 224, 256, "lars")
    assert seed.loss.temperature == 0.1 and seed.optim.warmup_epochs == 10 and seed.data.crop_min_area == 0.08


def test_the_demo_and_the_tests_type_no_recipe_flags() -> None:
    """launch.sh demo reads configs/demo.toml instead of repeating its flags."""
    launch = (ROOT / "launch.sh").read_text()
    assert "configs/demo.toml" in launch
    for flag in ("--optimizer", "--crop-min-area", "--jitter-strength", "--proj-dims", "--temperature"):
        assert flag not in launch, flag


def test_a_flag_name_in_two_sections_is_an_error_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass
    class Clash:
        lr: float = 1.0
        """Clashes with optim.lr."""

    @dataclasses.dataclass
    class Tree(TrainConfig):
        clash: Clash = dataclasses.field(default_factory=Clash)

    monkeypatch.setattr(config_module, "TrainConfig", Tree)
    config_module.leaves.cache_clear()
    try:
        with pytest.raises(TypeError, match="'lr' is in both"):
            config_module.leaves()
    finally:
        monkeypatch.undo()
        config_module.leaves.cache_clear()


def test_field_docs_reads_the_docstring_under_each_field() -> None:
    @dataclasses.dataclass
    class Example:
        mode: Literal["a", "b"] = "a"
        """Which mode,
        over two lines."""
        plain: int = 0

    assert field_docs(Example) == {"mode": "Which mode, over two lines."}


def test_precision_auto_is_fp32_on_the_cpu() -> None:
    import torch

    from engine.trainer import resolve_precision

    assert parse(["--data", "d", "--out", "o"]).runtime.precision == "auto"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"

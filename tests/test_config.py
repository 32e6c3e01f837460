"""The training config: help in words, choices, one-line errors, shipped recipes, a run's config.json back in."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Literal

import pytest

from engine import config as config_module
from engine.config import (
    MAX_JITTER_STRENGTH,
    RUN_CONTROL,
    Arch,
    ConfigError,
    Machine,
    TrainConfig,
    apply,
    build_parser,
    differences,
    field_docs,
    leaves,
    load_file,
    parse,
    resolve,
    to_dict,
    validate,
)
from engine.train import main as train_main

from .cli import one_line_error

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
        assert (leaf.flag in text) == leaf.is_flag, leaf.flag
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


# -- resolution: the config that runs -----------------------------------------------------------------

@pytest.mark.parametrize("machine, expected", [
    (Machine(gpu=False, dali=True), ("torch", "float", "fp32", False)),
    (Machine(gpu=True, bf16=True, dali=True), ("dali", "uint8", "bf16", True)),
    (Machine(gpu=True, bf16=False, dali=False), ("torch", "uint8", "fp16", True)),
], ids=["cpu", "gpu", "old-gpu-without-dali"])
def test_resolution_replaces_every_auto_with_what_runs(machine: Machine, expected: tuple) -> None:
    cfg = parse(["--data", "d", "--out", "o"])
    resolved, notes = resolve(cfg, machine, stored_size=64, manifest_sha256="ab12")
    d, rt = resolved.data, resolved.runtime
    assert (d.loader, d.handover, rt.precision, rt.compile) == expected
    assert d.image_size == 64 and d.manifest_sha256 == "ab12"
    for leaf in leaves():
        if leaf.choices and "auto" in leaf.choices and leaf.name != "resume":
            assert getattr(resolved, leaf.section).__dict__[leaf.name] in leaf.choices[1:], leaf.name
    assert (cfg.data.loader, cfg.runtime.compile, cfg.data.image_size) == ("auto", None, 0), "the parsed tree is kept"
    assert notes[0].startswith(f"loader: {d.loader} (auto: ") and notes[1].startswith(f"precision: {rt.precision}")


def test_resolution_keeps_what_was_asked_and_refuses_what_the_machine_cannot_run() -> None:
    asked = parse(["--data", "d", "--out", "o", "--image-size", "48", "--loader", "torch", "--handover", "float",
                   "--precision", "fp32", "--no-compile"])
    resolved, notes = resolve(asked, Machine(gpu=True, bf16=True, dali=True), stored_size=64)
    assert to_dict(resolved) == to_dict(asked) and notes == []
    with pytest.raises(ConfigError, match="--precision fp16: the CPU has no fp16 autocast"):
        resolve(parse(["--data", "d", "--out", "o", "--precision", "fp16"]), Machine(gpu=False), 64)
    with pytest.raises(ConfigError, match="--loader dali: DALI is not installed"):
        resolve(parse(["--data", "d", "--out", "o", "--loader", "dali"]), Machine(gpu=True), 64)


def test_choices_are_declared_once_in_the_config() -> None:
    from engine.data.loader import BACKENDS, HANDOVERS
    from engine.model import FEATURE_DIMS

    by_name = {leaf.name: leaf for leaf in leaves()}
    assert (by_name["loader"].choices[1:], by_name["handover"].choices[1:]) == (BACKENDS, HANDOVERS)
    assert list(FEATURE_DIMS) == list(typing.get_args(Arch)), "every --arch has a feature width, and no other"


# -- one recipe per run folder ---------------------------------------------------------------------

def listed(text: str, head: str) -> set[str]:
    """The backticked names of the docs' bullet that begins with `head`."""
    bullet = text.split(head, 1)[1].split("\n- ", 1)[0].split("\n\n", 1)[0]
    return set(re.findall(r"`([^`]+)`", bullet))


def test_every_leaf_is_run_defining_or_run_control_as_the_docs_list() -> None:
    text = (ROOT / "docs" / "training.md").read_text()
    defining, control = listed(text, "- **Run-defining**"), listed(text, "- **Run control**")
    by_label = {(leaf.flag if leaf.is_flag else leaf.name): leaf for leaf in leaves()}
    assert defining | control == set(by_label) and not defining & control, "each field listed once"
    assert {by_label[x].name for x in control} == RUN_CONTROL
    assert all(by_label[x].defines_run for x in defining)
    assert {"lr", "arch", "batch_size", "precision", "seed", "manifest_sha256"} <= {
        by_label[x].name for x in defining}, "the recipe's own fields define the run"


def test_differences_split_run_defining_from_run_control_changes() -> None:
    cpu = Machine(gpu=False)
    old, _ = resolve(parse(["--data", "d", "--out", "o"]), cpu, 64, "aa")
    new, _ = resolve(parse(["--data", "moved", "--out", "o", "--lr", "0.5", "--log-every", "5", "--arch", "resnet34"]),
                     cpu, 64, "bb")
    defining, control = differences(to_dict(old), new)
    assert defining == ["manifest_sha256 aa -> bb", "--arch resnet50 -> resnet34", "--lr 0.3 -> 0.5"]
    assert control == ["--data d -> moved", "--log-every 20 -> 5"]
    assert differences(json.loads(json.dumps(to_dict(new))), new) == ([], []), "a record read back is no change"
    older = to_dict(old)
    del older["optim"]["lr"]  # a record written before the field existed
    assert "--lr" not in " ".join(differences(older, new)[0])


# -- config files -----------------------------------------------------------------------------------

BAD_FILES = [
    ("list.yaml", b"- lr: 1\n- seed: 2\n", "the top level is a list, not a mapping"),
    ("broken.yaml", b"optim:\n  lr: 1\n  seed: [1,\n", "line 4, column 1"),
    ("indent.yaml", b"optim:\n  lr: 1\n bad: 2\n", "line 3, column 2"),
    ("text.yaml", b"just words\n", "the top level is a str"),
    ("list.json", b"[1, 2]", "the top level is a list"),
    ("broken.json", b'{"optim": {"lr": }}', "line 1 column 18"),
    ("broken.toml", b"[optim]\nlr = \n", "line 2"),
    ("binary.toml", b"\xff\xfe\x00lr", "not UTF-8 text"),
    ("unknown.toml", b"[optim]\nlearning_rate = 1\n", "unknown config key 'learning_rate'"),
]
"""(file, content, what its one line says)"""


@pytest.mark.parametrize("name, content, expected", [pytest.param(*case, id=case[0]) for case in BAD_FILES])
def test_a_config_file_that_cannot_be_used_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 name: str, content: bytes, expected: str) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    line = one_line_error(train_main, ["--config", str(f), "--data", "d", "--out", "o"], capsys, "engine/train.py")
    assert f"--config {f}: " in line and expected in line, line


def test_jitter_strength_is_bounded_where_torchvision_bounds_the_hue() -> None:
    import torchvision.transforms.v2 as T

    T.ColorJitter(hue=0.2 * MAX_JITTER_STRENGTH)
    with pytest.raises(ValueError, match="hue"):
        T.ColorJitter(hue=0.2 * (MAX_JITTER_STRENGTH + 0.1))
    assert validate(parse(["--data", "d", "--out", "o", "--jitter-strength", str(MAX_JITTER_STRENGTH)])) == []
    problems = validate(parse(["--data", "d", "--out", "o", "--jitter-strength", "2.6"]))
    assert len(problems) == 1 and problems[0].startswith("--jitter-strength: must be in [0, 2.5]"), problems


# -- a fast command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--bogus"], 2),
                                        (["--data", "d", "--out", "o", "--lr", "-1"], 2)],
                         ids=["help", "bad-flag", "bad-value"])
def test_help_and_argument_errors_import_no_torch(argv: list[str], code: int) -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "engine" / "train.py"), *argv],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    imported = [line for line in r.stderr.splitlines() if line.startswith("import time:")]
    errors = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
    assert r.returncode == code and any("engine.config" in line for line in imported), r.stderr[-3000:]
    assert [line for line in imported if "torch" in line] == [], "no torch module before the arguments are good"
    assert len(errors) == (0 if code == 0 else 1) and all(e.startswith("engine/train.py: error: ") for e in errors)

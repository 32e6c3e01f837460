"""The training config: one dataclass tree, flags generated from it, optionally a TOML, YAML or JSON file.

Precedence: command-line flags over the file over the defaults. Each field's docstring is its `--help`
text; a `Literal` field becomes a flag with choices. An unknown key or a value of the wrong type is an
error, and `validate` reports every out-of-range value at once. The resolved tree is saved as
RUN/config.json (which `--config` takes back to repeat a run) and in every checkpoint.

`resolve` turns the parsed tree into the one that runs (every `auto` and 0 replaced by its value on this machine
and data); `RUN_CONTROL` names the leaves a resumed run may change, every other leaf defines the run. This module
imports no torch, so `--help` and argument errors are immediate.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

from base.cli import field_docs
from base.errors import UsageError
from engine.archs import FEATURE_DIMS

Arch = Literal[tuple(FEATURE_DIMS)]  # the architectures engine.archs knows, named once there
Loader = Literal["auto", "dali", "torch"]
Handover = Literal["auto", "float", "uint8"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Optimizer = Literal["lars", "sgd", "adamw"]
LrScaling = Literal["linear", "sqrt"]
MAX_JITTER_STRENGTH = 2.5
"""The hue shift, 0.2 s of the colour circle either way, may not pass half of it (torchvision refuses more)."""


def no_dali(instead: str = "") -> str:
    """What every path that wanted DALI and found none says (the config, the loaders, preview, the loader bench),
    with the alternative the caller offers."""
    return f"DALI is not installed (pip install nvidia-dali-cuda130{', or ' + instead if instead else ''})"


def concrete(choices: object) -> tuple[str, ...]:
    """A Literal's choices other than `auto`: what an `auto` field resolves to."""
    return tuple(c for c in typing.get_args(choices) if c != "auto")


class ConfigError(UsageError, ValueError):
    """An unknown key, a value of the wrong type, or a config file that cannot be read; the message names it."""


@dataclass
class DataConfig:
    data: str = ""
    """Folder written by `python -m pack` (required)."""
    loader: Loader = "auto"
    """dali: the DALI two-view pipeline (GPU decode on a GPU); torch: the PIL + torchvision baseline. auto: DALI on a
    GPU, the torch loader on the CPU (where DALI's CPU twin measures 0.35x-0.73x of it), or wherever DALI is not
    installed."""
    image_size: int = 0
    """Side of each view in pixels (0: the size the shards were packed at)."""
    batch_size: int = 256
    """Samples per device per step; each gives two views, so a step sees 2 x batch x devices views."""
    workers: int = 4
    """DALI threads or DataLoader worker processes per device."""
    prefetch: int = 2
    """Batches each loader prepares ahead of the step (DALI's prefetch queue depth: its default and advice)."""
    handover: Handover = "auto"
    """How views reach the step. uint8: raw pixels, a quarter of fp32's bytes, cast and normalised inside the
    (compiled) model; float: normalised by the loader. auto: uint8 on a GPU, float on the CPU (where the
    loader's threads normalise in parallel with the step)."""
    crop_min_area: float = 0.08
    """Random resized crop: the smallest crop, as a share of the image's area (SimCLR: 0.08)."""
    jitter_strength: float = 1.0
    """Colour jitter strength s (SimCLR: 1.0; brightness, contrast, saturation 0.8 s; hue 0.2 s)."""
    verify: bool = True
    """Check every shard's size and sha256 against the manifest before the first step (cached per run)."""
    manifest_sha256: str = field(default="", metadata={"flag": False})
    """The sha256 of --data's manifest.json, recorded when a run starts (not a flag): the data's identity, so that
    a run resumes on the data it began with wherever that data now lives."""


@dataclass
class ModelConfig:
    arch: Arch = "resnet50"
    """torchvision ResNet, randomly initialised."""
    proj_dims: list[int] = field(default_factory=lambda: [2048, 128])
    """Projection head: hidden width(s) then output width (Linear-BN-ReLU ... Linear)."""


@dataclass
class LossConfig:
    temperature: float = 0.1
    """NT-Xent temperature t: logits are cosine similarities divided by t (SimCLR: 0.1 at large batches)."""
    loss_impl: Literal["fused", "reference"] = "fused"
    """fused: tiled Triton kernel (GPU) or chunked PyTorch twin (CPU); reference: the full logit matrix."""


@dataclass
class OptimConfig:
    optimizer: Optimizer = "lars"
    """lars (SimCLR's choice for large batches), sgd with momentum, or adamw."""
    lr: float = 0.3
    """Base learning rate, scaled by the global batch B (all devices): lr x B/256 with --lr-scaling linear,
    lr x sqrt(B/256) with sqrt."""
    lr_scaling: LrScaling = "linear"
    """How --lr grows with the global batch (sqrt suits small batches)."""
    weight_decay: float = 1e-6
    """Weight decay; biases and normalisation parameters are exempt."""
    momentum: float = 0.9
    """Momentum of lars and sgd."""
    warmup_epochs: float = 10.0
    """Linear warm-up, in epochs, then cosine decay to 0 per step."""


@dataclass
class ScheduleConfig:
    epochs: int = 100
    """Passes over the training split."""
    max_steps: int = 0
    """Stop after this many steps in total (0: run every epoch); the schedule still spans --epochs."""
    seed: int = 0
    """Seed of the weights, the augmentations and the shuffle."""


@dataclass
class CheckpointConfig:
    checkpoints: bool = True
    """Save checkpoints (every --ckpt-every steps, at epoch ends, on preemption); off: save nothing."""
    ckpt_every: int = 500
    """Steps between checkpoints (0: only at epoch ends and on preemption)."""
    keep_ckpts: int = 3
    """Newest checkpoints kept (0: keep all)."""
    resume: str = "auto"
    """auto (the newest complete checkpoint in the run folder, if any) | PATH | none."""


@dataclass
class MonitorConfig:
    eval_every: int = 1
    """Epochs between online precision@1 measurements on the eval split (0: never); the random-init network
    and the final model are always measured when this is on."""


@dataclass
class LogConfig:
    log_every: int = 20
    """Steps between metric lines (RUN/metrics.jsonl, trackers, the progress bar)."""
    log_with: Literal["none", "tensorboard", "wandb", "all"] = "none"
    """Trackers beside metrics.jsonl, through Accelerate: TensorBoard (RUN/tensorboard), Weights & Biases."""


@dataclass
class RuntimeConfig:
    out: str = ""
    """Run folder: config, metrics, checkpoints, exported weights (required)."""
    cpu: bool = False
    """Train on the CPU even where a GPU is present."""
    precision: Precision = "auto"
    """Autocast dtype (weights stay fp32). auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on
    the CPU (where bf16 autocast measured from 1.08x faster to 25x slower, by CPU)."""
    channels_last: bool = True
    """NHWC memory format for the convolutions (faster on tensor cores)."""
    compile: bool | None = None
    """torch.compile the model (default: on for GPU, off for CPU)."""
    cudnn_benchmark: bool = True
    """Let cuDNN time its algorithms once for the fixed input shape (GPU only)."""
    sync_bn: bool = False
    """Synchronise batch-norm statistics across devices."""


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    log: LogConfig = field(default_factory=LogConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


RUN_CONTROL = frozenset({
    "data", "out",  # where the data and the run are found (the manifest's sha256 says what the data is)
    "workers", "prefetch", "handover", "verify", "loss_impl", "cpu", "channels_last", "compile",  # how fast: the
    "cudnn_benchmark",  # same numbers up to rounding (the loader refuses another worker count mid-epoch)
    "log_every", "log_with", "eval_every", "checkpoints", "ckpt_every", "keep_ckpts", "resume", "max_steps",
})
"""The leaves a resumed run may change: where things are, how fast it runs, what it reports, when it saves and when
it stops. Every other leaf defines the run (its recipe), and a resume that changes one is refused."""


# -- the tree's leaves ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    section: str
    name: str
    hint: object
    doc: str
    default: object
    is_flag: bool = True
    """False for a value the run records but nobody sets (manifest_sha256)."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def defines_run(self) -> bool:
        return self.name not in RUN_CONTROL

    @property
    def choices(self) -> tuple | None:
        return typing.get_args(self.hint) if typing.get_origin(self.hint) is Literal else None


@cache
def leaves() -> tuple[Leaf, ...]:
    """Every leaf of the tree, once; two sections with a field of the same name would share a flag, and a name in
    RUN_CONTROL that is no leaf would classify nothing, so both are errors here, at import time."""
    out, seen = [], {}
    defaults = TrainConfig()
    for section in dataclasses.fields(TrainConfig):
        cls = type(getattr(defaults, section.name))
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                raise TypeError(f"config field '{f.name}' is in both [{seen[f.name]}] and [{section.name}]: "
                                "flags are flat, so field names must be unique")
            seen[f.name] = section.name
            out.append(Leaf(section.name, f.name, hints[f.name], docs.get(f.name, ""),
                            getattr(getattr(defaults, section.name), f.name), f.metadata.get("flag", True)))
    if RUN_CONTROL - set(seen):
        raise TypeError(f"RUN_CONTROL names no config field: {', '.join(sorted(RUN_CONTROL - set(seen)))}")
    return tuple(out)


leaves()  # a name collision fails at import, not at the first parse


def _coerce(value, hint, key: str):
    """`value` as the field's type; a ConfigError naming the key otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        try:
            return [item(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or isinstance(value, bool) and hint is not bool:
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def apply(cfg: TrainConfig, values: dict) -> None:
    """Set leaves from a flat or sectioned dict; an unknown key or a wrong type raises ConfigError."""
    by_name = {leaf.name: leaf for leaf in leaves()}
    flat = {}
    for k, v in values.items():
        if k in {s.name for s in dataclasses.fields(cfg)} and isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    for k, v in flat.items():
        key = k.replace("-", "_")
        if key not in by_name:
            raise ConfigError(f"unknown config key '{k}'")
        leaf = by_name[key]
        setattr(getattr(cfg, leaf.section), key, _coerce(v, leaf.hint, key))


def load_file(path: Path) -> dict:
    """A config file's values: TOML, YAML, or JSON (RUN/config.json of an earlier run). A file that does not parse,
    or whose top level is not a mapping, is a ConfigError naming it (and the line, where the parser gives one)."""
    if path.suffix not in (".toml", ".json", ".yaml", ".yml"):
        raise ConfigError(f"--config {path}: use a .toml, .yaml or .json file")
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        values = _parse(path.suffix, path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
    except ValueError as e:  # TOMLDecodeError, JSONDecodeError and the YAML error below say where
        raise ConfigError(f"--config {path}: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: the top level is a {type(values).__name__}, not a mapping of keys or "
                          "[sections] of keys (see configs/demo.toml)")
    return values


def _parse(suffix: str, text: str) -> object:
    if suffix == ".toml":
        return tomllib.loads(text)
    if suffix == ".json":
        return json.loads(text)
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = ", ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ValueError(where + what) from None


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(prog="engine/train.py",
                     description="SimCLR training on shards written by `python -m pack`. Flags override "
                                 "--config, which overrides the defaults shown.",
                     argument_default=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help="TOML, YAML or JSON file (e.g. configs/demo.toml, or RUN/config.json "
                                               "to repeat a run)")
    groups = {}
    for leaf in (leaf for leaf in leaves() if leaf.is_flag):
        group = groups.setdefault(leaf.section, p.add_argument_group(leaf.section))
        shown = ",".join(map(str, leaf.default)) if isinstance(leaf.default, list) else leaf.default
        help_text = (leaf.doc + (f" (default: {shown})" if leaf.default not in ("", None) else "")).replace("%", "%%")
        kwargs: dict = {"help": help_text, "default": argparse.SUPPRESS}
        hint = leaf.hint
        if hint in (bool, bool | None):
            group.add_argument(leaf.flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if leaf.choices:
            kwargs["choices"] = leaf.choices
        elif typing.get_origin(hint) is list:
            kwargs["metavar"] = "N,N,..."
        else:
            kwargs["type"] = hint
            kwargs["metavar"] = hint.__name__.upper() if hint in (int, float) else leaf.name.upper()
        group.add_argument(leaf.flag, **kwargs)
    return p


def parse(argv: list[str] | None = None,
          parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> TrainConfig:
    """Defaults, then --config, then flags; raises ConfigError for an unknown key or a wrong type."""
    args = vars(build_parser(parser_class).parse_args(argv))
    cfg = TrainConfig()
    path = args.pop("config", None)
    if path is not None:
        values = load_file(path)
        try:
            apply(cfg, values)
        except ConfigError as e:
            raise ConfigError(f"--config {path}: {e}") from None
    apply(cfg, args)
    return cfg


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def validate(cfg: TrainConfig) -> list[str]:
    """Every problem with the values, each one line `--flag: what (how to fix)`; empty when all is well."""
    d, o, s, ck = cfg.data, cfg.optim, cfg.schedule, cfg.checkpoint
    checks = [
        (bool(d.data), "--data: required (the --out folder of `python -m pack`)"),
        (bool(cfg.runtime.out), "--out: required (a folder for this run)"),
        (d.image_size == 0 or d.image_size >= 16, f"--image-size: {d.image_size} is too small (16 or more, or 0 "
                                                  "for the packed size)"),
        (d.batch_size >= 1, f"--batch-size: must be at least 1, got {d.batch_size}"),
        (d.workers >= 1, f"--workers: must be at least 1, got {d.workers}"),
        (d.prefetch >= 1, f"--prefetch: must be at least 1, got {d.prefetch}"),
        (0 < d.crop_min_area <= 1, f"--crop-min-area: must be in (0, 1], got {d.crop_min_area}"),
        (0 <= d.jitter_strength <= MAX_JITTER_STRENGTH, f"--jitter-strength: must be in [0, {MAX_JITTER_STRENGTH}] "
                                                        f"(the hue shift, 0.2 s, reaches half the colour circle at "
                                                        f"{MAX_JITTER_STRENGTH}), got {d.jitter_strength}"),
        (bool(cfg.model.proj_dims) and all(w >= 1 for w in cfg.model.proj_dims),
         f"--proj-dims: positive widths, the last one the embedding size, got {cfg.model.proj_dims}"),
        (_positive(cfg.loss.temperature), f"--temperature: must be positive, got {cfg.loss.temperature}"),
        (_positive(o.lr), f"--lr: must be positive, got {o.lr}"),
        (math.isfinite(o.weight_decay) and o.weight_decay >= 0, f"--weight-decay: must be >= 0, got {o.weight_decay}"),
        (0 <= o.momentum < 1, f"--momentum: must be in [0, 1), got {o.momentum}"),
        (math.isfinite(o.warmup_epochs) and o.warmup_epochs >= 0,
         f"--warmup-epochs: must be >= 0, got {o.warmup_epochs}"),
        (s.epochs >= 1, f"--epochs: must be at least 1, got {s.epochs}"),
        (s.max_steps >= 0, f"--max-steps: must be >= 0 (0: every epoch), got {s.max_steps}"),
        (ck.ckpt_every >= 0, f"--ckpt-every: must be >= 0 (0: epoch ends only), got {ck.ckpt_every}"),
        (ck.keep_ckpts >= 0, f"--keep-ckpts: must be >= 0 (0: keep all), got {ck.keep_ckpts}"),
        (cfg.monitor.eval_every >= 0, f"--eval-every: must be >= 0 (0: never), got {cfg.monitor.eval_every}"),
        (cfg.log.log_every >= 1, f"--log-every: must be at least 1, got {cfg.log.log_every}"),
    ]
    return [message for ok, message in checks if not ok]


def to_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# -- resolution: the config that runs ----------------------------------------------------------------

@dataclass(frozen=True)
class Machine:
    """What resolution needs to know of the machine a run trains on (engine.trainer.this_machine finds it out)."""

    gpu: bool
    bf16: bool = False
    """The GPU runs bf16 autocast at speed (Ampere and later)."""
    dali: bool = False
    """nvidia.dali is installed."""


def precision_for(precision: str, machine: Machine) -> str:
    """What --precision runs as: `auto` is bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU (where
    bf16 autocast's speed depends on the CPU: 1.08x faster on one Intel Xeon, 25x slower on an AMD EPYC, both
    measured in BENCHMARKS.md). fp16 on the CPU is refused: its autocast fails at the first step."""
    if precision == "fp16" and not machine.gpu:
        raise ConfigError("--precision fp16: the CPU has no fp16 autocast (use bf16 or fp32, or auto: fp32 on the CPU)")
    if precision != "auto":
        return precision
    if not machine.gpu:
        return "fp32"
    return "bf16" if machine.bf16 else "fp16"


def resolve(cfg: TrainConfig, machine: Machine, stored_size: int, manifest_sha256: str = ""
            ) -> tuple[TrainConfig, list[str]]:
    """The config that runs: a copy of `cfg` with every `auto` (and an image size of 0) replaced by its value on
    `machine`, for data packed at `stored_size` px whose manifest has `manifest_sha256`. This is what the Trainer
    reads, what RUN/config.json and every checkpoint record, and what a resume is compared with. Also returns a
    line for each `auto` that was a judgement (loader, precision). A choice the machine cannot run is a ConfigError."""
    out = copy.deepcopy(cfg)
    d, rt = out.data, out.runtime
    notes = []
    if d.loader == "auto":
        d.loader, why = (("torch", "the CPU, where the torch loader is the faster one") if not machine.gpu else
                         ("dali", "a GPU, DALI decodes and augments on it") if machine.dali else
                         ("torch", no_dali()))
        notes.append(f"loader: {d.loader} (auto: {why})")
    elif d.loader == "dali" and not machine.dali:
        raise ConfigError(f"--loader dali: {no_dali('--loader torch')}")
    precision = precision_for(rt.precision, machine)
    if rt.precision == "auto":
        notes.append(f"precision: {precision} (auto: " + ("the CPU, where bf16 autocast can be many times slower)"
                                                          if not machine.gpu else "what this GPU supports)"))
    rt.precision = precision
    if d.handover == "auto":  # on the CPU the loader's workers normalise in parallel with the step
        d.handover = "uint8" if machine.gpu else "float"
    if rt.compile is None:
        rt.compile = machine.gpu
    d.image_size = d.image_size or stored_size
    d.manifest_sha256 = manifest_sha256
    return out, notes


def differences(recorded: dict, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """What changed from a recorded config to `cfg` (both resolved), each as `--flag old -> new`: (changes to leaves
    that define the run, changes to run-control leaves). A leaf the record lacks (written before it existed) is
    not compared."""
    now = to_dict(cfg)
    defining, control = [], []
    for leaf in leaves():
        section = recorded.get(leaf.section)
        if not isinstance(section, dict) or leaf.name not in section:
            continue
        old, new = section[leaf.name], now[leaf.section][leaf.name]
        if old != new:
            label = leaf.flag if leaf.is_flag else leaf.name
            (defining if leaf.defines_run else control).append(f"{label} {_shown(old)} -> {_shown(new)}")
    return defining, control


def _shown(value: object) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "''" if value == "" else str(value)

"""The training config: one dataclass tree, flags generated from it, optionally a TOML or YAML file.

Precedence: command-line flags over the file over the defaults. An unknown key or a value of the wrong
type is an error. The resolved tree is saved as RUN/config.json and in every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from engine.data.augment import AugmentConfig
from engine.model import ModelConfig


@dataclass
class DataConfig:
    data: str = ""
    """Folder written by `python -m pack` (required)."""
    loader: str = "dali"
    """dali | torch (the PIL + torchvision baseline)."""
    image_size: int = 224
    batch_size: int = 256
    """Samples per device per step (each gives two views)."""
    workers: int = 4
    """DALI threads or DataLoader workers per process."""
    crop_min_area: float = 0.08
    """Random resized crop: the smallest crop, as a share of the image's area (SimCLR: 0.08)."""
    jitter_strength: float = 1.0
    """Colour jitter strength s (SimCLR: 1.0; brightness, contrast, saturation 0.8 s, hue 0.2 s)."""

    def augment(self) -> AugmentConfig:
        """The views' augmentations for these settings; everything else as in the SimCLR recipe."""
        return AugmentConfig(size=self.image_size, crop_scale=(self.crop_min_area, 1.0), strength=self.jitter_strength)


@dataclass
class OptimConfig:
    optimizer: str = "lars"
    """lars | sgd | adamw."""
    lr: float = 0.3
    """Base learning rate, scaled by the global batch: lr x B/256 (linear) or lr x sqrt(B/256) (sqrt)."""
    lr_scaling: str = "linear"
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_epochs: float = 10.0
    temperature: float = 0.1


@dataclass
class ScheduleConfig:
    epochs: int = 100
    max_steps: int = 0
    """Stop after this many steps in total (0: run every epoch)."""
    seed: int = 0


@dataclass
class RuntimeConfig:
    out: str = ""
    """Run folder: config, metrics, checkpoints, exported weights (required)."""
    cpu: bool = False
    precision: str = "bf16"
    """bf16 | fp16 | fp32 (autocast; weights stay fp32)."""
    channels_last: bool = True
    compile: bool | None = None
    """torch.compile the model (default: on for GPU, off for CPU)."""
    sync_bn: bool = False
    log_every: int = 20
    ckpt_every: int = 500
    """Steps between checkpoints (0: only at epoch ends and on preemption)."""
    keep_ckpts: int = 3
    resume: str = "auto"
    """auto (newest complete checkpoint in the run folder) | PATH | none."""
    eval_every: int = 1
    """Epochs between online precision@1 measurements on the eval split (0: never)."""


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def _leaves(cfg) -> typing.Iterator[tuple[str, dataclasses.Field, object]]:
    """(section, field, section object) for every leaf of the tree."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj):
            yield section.name, f, obj


def _hint(section_obj, name: str):
    return typing.get_type_hints(type(section_obj))[name]


def _coerce(value, hint, key: str):
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None and type(None) in typing.get_args(hint):
        return None
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        try:
            return [args[0](v) for v in value]
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a list of {args[0].__name__}, got {value!r}") from None
    target = args[0] if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())) else hint
    if target is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, target):
        raise ValueError(f"{key}: expected {target.__name__}, got {value!r}")
    return value


def apply(cfg: TrainConfig, values: dict) -> None:
    """Set leaves from a flat or sectioned dict; an unknown key or a wrong type raises ValueError."""
    leaves = {f.name: (obj, f) for _, f, obj in _leaves(cfg)}
    sections = {s.name for s in dataclasses.fields(cfg)}
    flat = {}
    for k, v in values.items():
        if k in sections and isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    for k, v in flat.items():
        key = k.replace("-", "_")
        if key not in leaves:
            raise ValueError(f"unknown config key '{k}'")
        obj, f = leaves[key]
        setattr(obj, key, _coerce(v, _hint(obj, key), key))


def load_file(path: Path) -> dict:
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    raise ValueError(f"--config {path}: use a .toml or .yaml file")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine/train.py", description="SimCLR training (see README.md).",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help="TOML or YAML file; flags override it")
    for section, f, obj in _leaves(TrainConfig()):
        flag = "--" + f.name.replace("_", "-")
        hint = _hint(obj, f.name)
        doc = f"[{section}]"
        if hint in (bool, bool | None):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=doc)
        elif typing.get_origin(hint) is list:
            p.add_argument(flag, type=str, help=f"{doc} comma-separated")
        else:
            p.add_argument(flag, type=hint, help=doc)
    return p


def parse(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    cfg = TrainConfig()
    path = args.pop("config", None)
    if path is not None:
        apply(cfg, load_file(path))
    apply(cfg, args)
    if not cfg.data.data or not cfg.runtime.out:
        raise ValueError("--data and --out are required")
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))

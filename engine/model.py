"""The SimCLR network: a torchvision ResNet without its classifier, and the projection head.

Exported as one safetensors file (`backbone.*` and `head.*` tensors) whose metadata holds the model
config, so evaluation rebuilds the network from the file alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torchvision
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


@dataclass
class ModelConfig:
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet50"
    """torchvision resnet18 | resnet34 | resnet50, randomly initialised."""
    proj_dims: list[int] = field(default_factory=lambda: [2048, 128])
    """Projection head: hidden width(s) then output width (Linear-BN-ReLU ... Linear)."""


class SimCLRNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch not in FEATURE_DIMS:
            raise ValueError(f"unknown --arch '{cfg.arch}' (known: {', '.join(FEATURE_DIMS)})")
        self.cfg = cfg
        self.backbone = getattr(torchvision.models, cfg.arch)(weights=None)
        self.backbone.fc = nn.Identity()
        layers: list[nn.Module] = []
        width = FEATURE_DIMS[cfg.arch]
        for hidden in cfg.proj_dims[:-1]:
            layers += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, cfg.proj_dims[-1]))
        self.head = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Projections `z` of a batch (the loss's input)."""
        return self.head(self.backbone(images))

    def embed(self, images: torch.Tensor, features: str = "backbone") -> torch.Tensor:
        h = self.backbone(images)
        return h if features == "backbone" else self.head(h)


def export(model: SimCLRNet, path: Path, extra: dict | None = None) -> None:
    """Weights (fp32) and the model config in one safetensors file; written to a temp name, then renamed."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"model_config": json.dumps(asdict(model.cfg)), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_exported(path: Path | str) -> tuple[SimCLRNet, dict]:
    """A network and the metadata from an exported file, or from a run folder holding backbone.safetensors."""
    path = Path(path)
    if path.is_dir():
        path = path / "backbone.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a run folder or a .safetensors file")
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    if "model_config" not in meta:
        raise ValueError(f"{path} has no model_config metadata: not exported by faceclr")
    model = SimCLRNet(ModelConfig(**meta["model_config"]))
    model.load_state_dict(load_file(str(path)))
    return model, meta

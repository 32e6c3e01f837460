"""The SimCLR network (a torchvision ResNet without its classifier, and the projection head), its export,
and loading any ResNet checkpoint for evaluation.

faceclr's export is one safetensors file: `backbone.*` tensors (torchvision's key names under a
`backbone.` prefix, no `fc.*`), `head.*` tensors, and metadata whose `model_config` (JSON) rebuilds the
network from the file alone. `load_checkpoint` also reads the other forms a face researcher holds; the
accepted forms are listed in docs/evaluation.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from base.errors import UsageError
from base.files import write_atomic
from engine.archs import FEATURE_DIMS
from engine.config import ModelConfig

BLOCKS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
          ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
          ("bottleneck", (3, 8, 36, 3)): "resnet152"}
"""(block type, blocks per stage) -> torchvision architecture: how a bare state dict names its ResNet."""
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
"""Prefixes that DDP, torch.compile and training frameworks add in front of the network's own keys."""


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
    """Weights (fp32) and the model config in one safetensors file, written atomically (a full disk leaves no part)."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"model_config": json.dumps(asdict(model.cfg)), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    write_atomic(path, safetensors_bytes(tensors, metadata=meta))


# -- loading any ResNet checkpoint ------------------------------------------------------------------

class CheckpointError(UsageError, ValueError):
    """A checkpoint that cannot be read as asked; the message is one line that says what to do."""


@dataclass
class Loaded:
    """A network ready to embed, and what was known about it."""

    net: SimCLRNet
    has_head: bool
    """False when the checkpoint held a backbone only: the head is then random and must not be scored."""
    meta: dict
    """The export's metadata (image_size, train_config, step) or what could be read beside the file."""
    source: str
    """Which form was read, in words (for the report)."""


def infer_arch(backbone: dict[str, torch.Tensor]) -> str | None:
    """The torchvision ResNet whose blocks these (unprefixed) keys describe, or None."""
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in backbone if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(ids) + 1 if ids else 0)
    kind = "bottleneck" if "layer1.0.conv3.weight" in backbone else "basic"
    return BLOCKS.get((kind, tuple(blocks)))


def infer_proj_dims(head: dict[str, torch.Tensor]) -> list[int]:
    """Output widths of the head's Linear layers, in order (2-D `.weight` tensors)."""
    linears = sorted((int(k.split(".")[0]), v.shape[0]) for k, v in head.items()
                     if k.endswith(".weight") and v.ndim == 2 and k.split(".")[0].isdigit())
    return [width for _, width in linears]


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded .pth: bare, or under a 'state_dict' / 'model' / 'backbone' key."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            inner = next((obj[k] for k in ("state_dict", "model", "backbone", "model_state_dict") if k in obj), None)
            if inner is not None:
                obj = inner
                continue
        break
    raise CheckpointError(f"{path} holds no state dict of tensors (expected a bare state dict, or one under "
                          "'state_dict' or 'model')")


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) from a .safetensors or a torch.save file; anything else is a CheckpointError."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                raw_meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
        meta = {}
        for k, v in raw_meta.items():
            try:
                meta[k] = json.loads(v)
            except json.JSONDecodeError:
                meta[k] = v  # Accelerate and others write plain strings such as {"format": "pt"}
        return tensors, meta
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} cannot be read as tensors by torch.load(weights_only=True): {first[:160]} "
                              "(save a plain state dict, or export it as safetensors)") from None
    return _unwrap(obj, path), {}


def _run_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    try:
        return json.loads(cfg.read_text()) if cfg.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _resolve(path: Path) -> tuple[Path, dict, str]:
    """A run folder or checkpoint folder -> the weights file in it, the run's config, and the form's name."""
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path} not found (pass a run folder, a .safetensors or .pth file, "
                              "or 'none')")
    if path.is_file():
        run = path.parent.parent.parent if path.parent.name.startswith("step-") else path.parent
        return path, _run_config(run), "file"
    if (path / "backbone.safetensors").is_file():
        return path / "backbone.safetensors", _run_config(path), "faceclr run folder"
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors", _run_config(path.parent.parent), "training checkpoint"
    steps = sorted((path / "checkpoints").glob("step-*/model.safetensors"))
    if steps:
        return steps[-1], _run_config(path), f"newest checkpoint of an unfinished run ({steps[-1].parent.name})"
    raise CheckpointError(f"--checkpoint {path} is a folder without backbone.safetensors or checkpoints/step-*/"
                          "model.safetensors (pass a faceclr run folder or a weights file)")


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """None if `state` fits `model` exactly, else one short sentence on how it does not."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if not (missing or unexpected or shapes):
        return None
    parts = [f"{len(x)} {what}" for x, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                  (shapes, "of another shape")) if x]
    first = (f"{shapes[0]} is {list(state[shapes[0]].shape)}, not {list(own[shapes[0]].shape)}" if shapes
             else f"e.g. '{(missing or unexpected)[0]}'")
    return f"{', '.join(parts)} tensors ({first})"


def load_checkpoint(checkpoint: Path | str, arch: str | None = None) -> Loaded:
    """Any ResNet checkpoint as a SimCLRNet: a faceclr run folder or export, a training checkpoint folder
    (Accelerate's model.safetensors), or a backbone-only safetensors / .pth state dict with torchvision key
    names (optionally under `backbone.`, `module.` or `_orig_mod.`). `arch`, when given, must agree with
    what the checkpoint says or its tensors show. Raises CheckpointError with a one-line message."""
    weights, run_cfg, form = _resolve(Path(checkpoint))
    tensors, meta = _read_tensors(weights)
    tensors = _strip(tensors)
    if any(k.startswith("backbone.") for k in tensors):
        backbone = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
        head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    else:
        backbone = {k: v for k, v in tensors.items() if not k.startswith("fc.")}  # the classifier is not a feature
        head = {}
    if not any(k.startswith(("conv1.", "layer1.")) for k in backbone):
        raise CheckpointError(f"{weights} holds no ResNet tensors (no conv1.* or layer1.* keys, with or without a "
                              "backbone. prefix)")

    cfg = meta.get("model_config") if isinstance(meta.get("model_config"), dict) else None
    cfg = cfg or (run_cfg.get("model") if isinstance(run_cfg.get("model"), dict) else None)
    inferred = infer_arch(backbone)
    stated = cfg.get("arch") if cfg else None
    found = stated or inferred
    if found is None:
        if arch is None:
            raise CheckpointError(f"{weights}: its keys are not those of a torchvision resnet18/34/50/101/152 "
                                  "(pass --arch if it is one)")
        found = arch
    if arch is not None and arch != found:
        raise CheckpointError(f"{weights} holds a {found}, not the --arch {arch} asked for (drop --arch, or pass "
                              f"--arch {found})")
    if found not in FEATURE_DIMS:
        raise CheckpointError(f"{weights} is a {found}; known architectures: {', '.join(FEATURE_DIMS)}")

    proj_dims = infer_proj_dims(head) if head else (cfg or {}).get("proj_dims", ModelConfig().proj_dims)
    if cfg and head and list(cfg.get("proj_dims", proj_dims)) != proj_dims:
        raise CheckpointError(f"{weights}: its metadata says proj_dims {cfg['proj_dims']} but its head tensors "
                              f"are {proj_dims} wide (a damaged or hand-edited export; re-export it)")
    net = SimCLRNet(ModelConfig(arch=found, proj_dims=list(proj_dims) or ModelConfig().proj_dims))
    problem = _mismatch(net.backbone, backbone)
    if problem:
        raise CheckpointError(f"{weights} does not fit a {found} backbone: {problem} (pass the --arch it was "
                              "trained with)")
    net.backbone.load_state_dict(backbone)
    if head:
        problem = _mismatch(net.head, head)
        if problem:
            raise CheckpointError(f"{weights}: its projection head does not fit proj_dims {proj_dims}: {problem}")
        net.head.load_state_dict(head)
    if form == "file":
        form = ("faceclr export" if "model_config" in meta else
                "faceclr-layout state dict" if head or any(k.startswith("backbone.") for k in tensors) else
                "torchvision state dict")
    if "image_size" not in meta and isinstance(run_cfg.get("data"), dict) and "image_size" in run_cfg["data"]:
        meta["image_size"] = run_cfg["data"]["image_size"]
    return Loaded(net, bool(head), meta, f"{form}: {weights}")


def load_exported(path: Path | str) -> tuple[SimCLRNet, dict]:
    """A network and the metadata from an exported file, or from a run folder holding backbone.safetensors."""
    loaded = load_checkpoint(path)
    if "model_config" not in loaded.meta:
        raise CheckpointError(f"{path} has no model_config metadata: not exported by faceclr")
    return loaded.net, loaded.meta

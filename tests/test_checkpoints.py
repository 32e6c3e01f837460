"""Any ResNet checkpoint in: faceclr exports and run folders, Accelerate's model.safetensors, torchvision
state dicts (.pth or safetensors, bare or prefixed); and every wrong one refused with one line."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from engine.data import AugmentConfig
from engine.data.torch_pipeline import eval_transform
from engine.evaluate import main as evaluate_main
from engine.model import CheckpointError, ModelConfig, SimCLRNet, export, infer_arch, load_checkpoint

from .probe_data import checker_split

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 checkerboards of 4 identities: enough to run the identity metrics quickly."""
    return checker_split(tmp_path_factory.mktemp("tiny"), 24, 4, "eval")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_infer_arch_names_every_torchvision_resnet() -> None:
    with torch.device("meta"):  # keys and shapes only: no weights allocated
        for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
            assert infer_arch(getattr(torchvision.models, arch)().state_dict()) == arch
        assert infer_arch(torchvision.models.vgg11().state_dict()) is None


def test_torchvision_state_dicts_in_every_wrapping(tmp_path: Path) -> None:
    torch.manual_seed(1)
    tv = torchvision.models.resnet18()
    sd = tv.state_dict()
    cases = {
        "bare.pth": lambda p: torch.save(sd, p),
        "wrapped.pth": lambda p: torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, p),
        "prefixed.safetensors": lambda p: save_file({f"backbone.{k}": v.contiguous() for k, v in sd.items()
                                                     if not k.startswith("fc.")}, str(p)),
    }
    tv.fc = torch.nn.Identity()
    for name, write in cases.items():
        write(tmp_path / name)
        loaded = load_checkpoint(tmp_path / name, "resnet18")
        assert _same_weights(loaded.net.backbone, tv), name
        assert not loaded.has_head and loaded.net.cfg.arch == "resnet18"
        assert load_checkpoint(tmp_path / name).net.cfg.arch == "resnet18"  # without --arch: from the tensors
    with pytest.raises(CheckpointError, match="holds a resnet18, not the --arch resnet50"):
        load_checkpoint(tmp_path / "bare.pth", "resnet50")


def test_accelerate_model_safetensors_and_run_folders(tmp_path: Path) -> None:
    """Accelerate's checkpoint (`format: pt` metadata, which once failed as 'Expecting value'), a run folder
    whose export is missing (its newest checkpoint), and a faceclr export."""
    net = SimCLRNet(ModelConfig(arch="resnet18", proj_dims=[64, 16]))
    run = tmp_path / "run"
    for step in (10, 20):
        (run / "checkpoints" / f"step-{step:09d}").mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()},
                  str(run / "checkpoints" / f"step-{step:09d}" / "model.safetensors"), metadata={"format": "pt"})
    (run / "config.json").write_text(json.dumps({"model": {"arch": "resnet18", "proj_dims": [64, 16]},
                                                 "data": {"image_size": 48}}))
    for path in (run / "checkpoints" / "step-000000020" / "model.safetensors", run / "checkpoints" / "step-000000010",
                 run):
        loaded = load_checkpoint(path)
        assert _same_weights(loaded.net, net) and loaded.has_head and loaded.net.cfg.proj_dims == [64, 16]
        assert loaded.meta["image_size"] == 48
    assert "step-000000020" in load_checkpoint(run).source
    export(net, run / "backbone.safetensors", {"image_size": 40})
    loaded = load_checkpoint(run)
    assert loaded.source.startswith("faceclr run folder") and loaded.meta["image_size"] == 40


def test_wrong_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    net = SimCLRNet(ModelConfig(arch="resnet18", proj_dims=[64, 16]))
    export(net, tmp_path / "ok.safetensors")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "lying.safetensors"),
              metadata={"model_config": json.dumps({"arch": "resnet18", "proj_dims": [128, 16]})})
    r50 = torchvision.models.resnet50().state_dict()
    save_file({f"backbone.{k}": v for k, v in r50.items() if not k.startswith("fc.")},
              str(tmp_path / "r50.safetensors"), metadata={"model_config": json.dumps({"arch": "resnet18"})})
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "module.pth")  # a pickled module, not tensors
    torch.save({"a": 1}, tmp_path / "numbers.pth")
    cases = {
        ("ok.safetensors", "resnet34"): "holds a resnet18, not the --arch resnet34",
        ("lying.safetensors", None): "metadata says proj_dims [128, 16] but its head tensors are [64, 16]",
        ("r50.safetensors", None): "does not fit a resnet18 backbone",
        ("junk.safetensors", None): "not a readable safetensors file",
        ("module.pth", None): "cannot be read as tensors by torch.load(weights_only=True)",
        ("numbers.pth", None): "holds no state dict of tensors",
        ("nothing", None): "not found",
    }
    for (name, arch), expected in cases.items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name, arch)
        assert expected in str(e.value) and "\n" not in str(e.value), (name, str(e.value))


def _cli_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    code = evaluate_main(args)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_evaluate_scores_a_torchvision_resnet18_pth(tiny_split: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """`engine.evaluate --checkpoint backbone.pth --arch resnet18`, as the issue's check; the model row is
    the loaded network (it differs from the random init row), and a head-less checkpoint offers no
    projection features."""
    torch.manual_seed(5)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "backbone.pth")
    out = tmp_path / "e"
    args = ["--checkpoint", str(tmp_path / "backbone.pth"), "--arch", "resnet18", "--data", str(tiny_split),
            "--out", str(out), "--cpu", "--workers", "0", "--save-embeddings"]
    assert evaluate_main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint_form"].startswith("torchvision state dict") and report["arch"] == "resnet18"
    assert report["image_size"] == 32  # the packed size: a state dict says nothing about its input size
    assert report["model"]["precision_at_1"] >= 0 and report["model"] != report["random_init"]
    assert "--features projection" in _cli_error([*args, "--features", "projection"], capsys)
    assert "holds a resnet18, not the --arch resnet50" in _cli_error(
        [*args[:3], "resnet50", *args[4:]], capsys)
    assert "invalid choice: 'resnet9'" in _cli_error([*args[:3], "resnet9", *args[4:]], capsys)
    assert "--checkpoint none needs --arch" in _cli_error(["--checkpoint", "none", *args[4:]], capsys)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert "holds no ResNet tensors" in _cli_error(["--checkpoint", str(tmp_path / "model.safetensors"),
                                                    *args[4:]], capsys)


def test_the_readme_loads_a_faceclr_backbone_into_plain_torchvision(tmp_path: Path) -> None:
    """The README's four lines, run as written (with the path replaced): same features as faceclr's network, and
    the preprocessing it states is the eval loader's, to the bit."""
    block = re.search(r"<!-- torchvision-snippet -->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md lost its torchvision snippet"
    code = block.group(1)
    statements = [s for s in ast.parse(code).body if not isinstance(s, (ast.Import, ast.ImportFrom))]
    assert len({s.lineno for s in statements}) == 4  # lines of code, a statement spanning three counted once
    torch.manual_seed(2)
    net = SimCLRNet(ModelConfig(arch="resnet18", proj_dims=[64, 16])).eval()
    export(net, tmp_path / "backbone.safetensors")
    scope: dict = {}
    exec(code.replace("runs/r18/backbone.safetensors", str(tmp_path / "backbone.safetensors")), scope)
    resnet = scope["resnet"].eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(resnet(x), net.backbone(x))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    assert torch.equal(scope["preprocess"](image), eval_transform(AugmentConfig(size=64))(image))

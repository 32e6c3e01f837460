"""What reaches the loss in the real training step: `Trainer.train_step`, the step that training and the benches
run, watched from outside by wrapping the loss function the Trainer calls (not by asking the Trainer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

import engine.trainer
from engine.bench.e2e import SyntheticViews
from engine.config import TrainConfig, apply
from engine.trainer import Trainer


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; each test builds its own Accelerator (as Accelerate's tests do)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def seen_at_the_loss(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, precision: str, compile: bool,
                     cpu: bool = True, steps: int = 2) -> tuple[list[torch.dtype], list[torch.dtype], Trainer]:
    """Two real steps; returns the dtypes of the embeddings the fused loss received and of the losses it returned."""
    inputs, outputs = [], []
    fused = engine.trainer.nt_xent

    def watched(z1, z2, temperature, group=None):
        inputs.append(z1.dtype)
        loss = fused(z1, z2, temperature, group)
        outputs.append(loss.dtype)
        return loss

    monkeypatch.setattr(engine.trainer, "nt_xent", watched)
    cfg = TrainConfig()
    apply(cfg, {"out": str(tmp_path / "run"), "cpu": cpu, "precision": precision, "compile": compile,
                "arch": "resnet18", "proj_dims": [32, 16], "image_size": 16, "batch_size": 8, "checkpoints": False,
                "eval_every": 0, "verify": False, "optimizer": "adamw", "lr": 1e-3, "warmup_epochs": 0.0})
    views = SyntheticViews(8, 16, torch.device("cpu" if cpu else "cuda"), torch.float32)  # the step bench's own
    trainer = Trainer(cfg, loader=views)
    try:
        trainer.model.train()
        for _ in range(steps):
            loss = trainer.train_step(views.batch)
            assert torch.isfinite(loss)
    finally:
        trainer.close(0)
    return inputs, outputs, trainer


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_autocast_dtype_reaches_the_fused_loss_eager(monkeypatch, tmp_path, precision, expected) -> None:
    """Accelerate's prepare() makes the model return fp32; under bf16 the loss must still get bf16 embeddings (its
    products on tensor cores), and its result, accumulated in fp32, is fp32. fp32 keeps the exact path."""
    inputs, outputs, trainer = seen_at_the_loss(monkeypatch, tmp_path, precision, compile=False)
    assert inputs == [expected, expected]
    assert outputs == [torch.float32, torch.float32]
    assert trainer.loss_dtype == expected, "the dtype the benches report is the one the loss received"


@pytest.mark.slow
def test_the_autocast_dtype_reaches_the_fused_loss_compiled(monkeypatch, tmp_path) -> None:
    """The same through torch.compile (a CPU compile of ResNet-18 at 16 px: about a minute here)."""
    torch._dynamo.reset()
    inputs, outputs, _ = seen_at_the_loss(monkeypatch, tmp_path, "bf16", compile=True)
    assert inputs == [torch.bfloat16, torch.bfloat16]
    assert outputs == [torch.float32, torch.float32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU twin: the eager bf16 test above)")
@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_autocast_dtype_reaches_the_fused_loss_on_gpu(monkeypatch, tmp_path, precision, expected) -> None:
    inputs, outputs, _ = seen_at_the_loss(monkeypatch, tmp_path, precision, compile=False, cpu=False)
    assert inputs == [expected, expected]
    assert outputs == [torch.float32, torch.float32]

"""A short training run with the bf16-operand loss follows the exact fp32 loss curve.

On the CPU the bf16 run goes through the PyTorch path, which rounds the unit rows and the gradient tile
to bf16 and accumulates in fp32 exactly where the Triton kernels do (the interpreter tests in
test_ntxent.py hold the two together: equal losses to 1e-6, gradients within two bf16 units).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from kernels import nt_xent


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small matrices on a shared 2-core machine: one thread is 30x faster than two (measured, 2 vs 73 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(seed: int, bf16: bool, temperature: float = 0.1, steps: int = 80) -> torch.Tensor:
    """SimCLR on 64 random prototypes in R^32 (views: prototype + unit noise), a 2-layer MLP to d=128, batch 64,
    SGD with momentum; the same data and initial weights for a given seed. Returns the loss per step."""
    torch.manual_seed(seed)
    prototypes = torch.randn(64, 32)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    g = torch.Generator().manual_seed(seed + 1000)
    losses = []
    for _ in range(steps):
        ids = torch.randperm(64, generator=g)
        z1 = model(prototypes[ids] + torch.randn(64, 32, generator=g))
        z2 = model(prototypes[ids] + torch.randn(64, 32, generator=g))
        if bf16:  # what autocast hands the loss: the projection's output in bf16
            z1, z2 = z1.bfloat16(), z2.bfloat16()
        loss = nt_xent(z1, z2, temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def curve_gap(reference: torch.Tensor, other: torch.Tensor, window: int = 10) -> float:
    """Largest relative difference between the two curves' means over consecutive windows of steps."""
    ref, oth = reference.unfold(0, window, window).mean(1), other.unfold(0, window, window).mean(1)
    return ((oth - ref).abs() / ref).max().item()


def test_bf16_operands_follow_the_fp32_loss_curve() -> None:
    """Measured over seeds 0-9: the 10-step means of the bf16 curve stay within 0.20-0.39% of the fp32
    curve's (single steps within 1.1-2.5%, the two runs' trajectories drifting apart), while the loss falls
    from 2.07-2.31 to 0.86-1.09. Bound: 1%. The same bound rejects a real change: temperature 0.11 instead
    of 0.1 moves the curve by 8.2-11.4%."""
    fp32 = train(0, bf16=False)
    assert fp32[-10:].mean() < 0.6 * fp32[:10].mean()  # it learns (measured: to 0.40-0.49 of the start)
    assert curve_gap(fp32, train(0, bf16=True)) < 1e-2
    assert curve_gap(fp32, train(0, bf16=False, temperature=0.11)) > 1e-2

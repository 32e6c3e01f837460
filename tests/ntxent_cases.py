"""Cases and comparisons shared by the NT-Xent tests, including the interpreter subprocess."""

from __future__ import annotations

import torch

from kernels import nt_xent, nt_xent_reference


def make_inputs(b: int, d: int, dtype: torch.dtype, kind: str = "random", seed: int = 0,
                device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64)
    z2 = torch.randn(b, d, generator=g, dtype=torch.float64)
    if kind == "near_duplicate":  # views almost equal, and many samples almost equal
        z2 = z1 + 1e-3 * z2
        z1[b // 2:] = z1[0] + 1e-3 * z1[b // 2:]
    elif kind == "duplicate":
        z2 = z1.clone()
        z1[1:] = z1[0]
    elif kind == "large_norm":
        z1, z2 = z1 * 1e4, z2 * 3e3
    return z1.to(device, dtype), z2.to(device, dtype)


def compare(z1: torch.Tensor, z2: torch.Tensor, temperature: float, upstream: float = 1.0,
            loss_fn=nt_xent) -> tuple[float, float]:
    """Relative error of the loss and the largest gradient error relative to the gradient's max."""
    a = z1.detach().clone().requires_grad_()
    b = z2.detach().clone().requires_grad_()
    loss = loss_fn(a, b, temperature)
    (loss * upstream).backward()
    ra = z1.detach().double().requires_grad_()
    rb = z2.detach().double().requires_grad_()
    ref = nt_xent_reference(ra, rb, temperature)
    (ref * upstream).backward()
    for t in (loss, a.grad, b.grad):
        assert torch.isfinite(t).all()
    loss_err = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-6)
    scale = max(ra.grad.abs().max().item(), rb.grad.abs().max().item(), 1e-12)
    grad_err = max((a.grad.double() - ra.grad).abs().max().item(), (b.grad.double() - rb.grad).abs().max().item())
    return loss_err, grad_err / scale

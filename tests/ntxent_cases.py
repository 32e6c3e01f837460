"""Cases and comparisons shared by the NT-Xent tests, including the interpreter subprocess."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

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


def loss_and_grads(z1: torch.Tensor, z2: torch.Tensor, temperature: float, upstream: float = 1.0,
                   loss_fn=nt_xent) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss and the gradients of `upstream * loss` with respect to copies of z1 and z2."""
    a = z1.detach().clone().requires_grad_()
    b = z2.detach().clone().requires_grad_()
    loss = loss_fn(a, b, temperature)
    (loss * upstream).backward()
    return loss.detach(), a.grad, b.grad


def errors(got: tuple, want: tuple) -> tuple[float, float]:
    """Relative error of the loss, and the largest gradient error relative to the gradient's largest entry."""
    for t in got:
        assert torch.isfinite(t).all()
    loss, g1, g2 = (t.double() for t in got)
    ref, r1, r2 = (t.double() for t in want)
    loss_err = (abs(loss - ref) / ref.abs().clamp_min(1e-6)).item()
    scale = max(r1.abs().max().item(), r2.abs().max().item(), 1e-12)
    return loss_err, max((g1 - r1).abs().max().item(), (g2 - r2).abs().max().item()) / scale


def compare(z1: torch.Tensor, z2: torch.Tensor, temperature: float, upstream: float = 1.0,
            loss_fn=nt_xent) -> tuple[float, float]:
    """Errors of `loss_fn` against the float64 reference on the same input values."""
    got = loss_and_grads(z1, z2, temperature, upstream, loss_fn)
    want = loss_and_grads(z1.double(), z2.double(), temperature, upstream, nt_xent_reference)
    return errors(got, want)


HOST_READS = {"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "__array__"}
"""Tensor methods that copy a value to the host: on a GPU each waits for every queued kernel."""


class HostReadDetector(TorchFunctionMode):
    """Records each host read of a tensor made directly by code in `watched` files (frames inside torch, or
    inside a library the watched code calls, such as Triton's interpreter, are not the watched code's reads)."""

    def __init__(self, watched: tuple[str, ...]) -> None:
        super().__init__()
        self.watched = watched
        self.reads: list[str] = []
        self._torch = str(Path(torch.__file__).parent)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS or (name == "to" and any(str(x) == "cpu" for x in [*args[1:], *(kwargs or {}).values()])):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(self._torch):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.endswith(self.watched):
                self.reads.append(f"{name} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))

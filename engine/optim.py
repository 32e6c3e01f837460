"""Optimizers and the learning-rate schedule of the SimCLR recipe.

LARS is written here (30 lines) because no maintained package in our dependency set provides it;
tests/test_train_parts.py checks it against the update written out by hand.
"""

from __future__ import annotations

import math
import typing

import torch
from torch import nn

from engine.config import LrScaling, Optimizer


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each tensor is scaled by eta * |w| / |g + wd w| (layer-wise trust).

    Parameter groups with `lars=False` (biases, norm layers) get neither the trust ratio nor weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6, eta: float = 1e-3):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                                  "lars": True})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, 1.0)
                    g = g * trust
                buf = self.state[p].get("momentum")
                if buf is None:
                    buf = self.state[p]["momentum"] = torch.clone(g)
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module) -> tuple[list, list]:
    """(decayed and adapted weights, biases and normalisation parameters)."""
    decay, plain = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
            (plain if is_norm or name == "bias" else decay).append(p)
    return decay, plain


def scaled_lr(lr: float, scaling: str, global_batch: int) -> float:
    if scaling == "linear":
        return lr * global_batch / 256
    if scaling == "sqrt":
        return lr * math.sqrt(global_batch / 256)
    raise ValueError(f"unknown --lr-scaling '{scaling}' ({' | '.join(typing.get_args(LrScaling))})")


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float
                    ) -> torch.optim.Optimizer:
    decay, plain = param_groups(model)
    if name == "lars":
        return LARS([{"params": decay}, {"params": plain, "lars": False, "weight_decay": 0.0}], lr=lr,
                    momentum=momentum, weight_decay=weight_decay)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown --optimizer '{name}' ({' | '.join(typing.get_args(Optimizer))})")


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ~0 to the peak, then cosine decay to 0; stepped once per iteration."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

"""NT-Xent in plain PyTorch: the full similarity matrix and `cross_entropy`, as peers write it.

The fused kernels in `kernels.ntxent` are tested against this in float64, and benchmarked against it in
their own input dtype (`upcast=False`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1,
                      group: dist.ProcessGroup | None = None, upcast: bool = True) -> torch.Tensor:
    """Mean NT-Xent over the 2B views of `z1`, `z2` ([B, d] each; row i of both is one sample).

    Each view's positive is its other view; every other view is a negative; the self-similarity is
    excluded (-inf), not zeroed. With `upcast` (the accuracy reference) it computes in the inputs' dtype
    promoted to at least fp32. Without it every op runs in the inputs' dtype, as plain PyTorch on bf16
    (fp16) views does: the matmul accumulates in fp32 but rounds the logits to bf16, and log-softmax
    sums in fp32 inside the kernel but takes and returns bf16. The fused loss instead keeps the logits,
    log-sum-exp and loss in fp32 and rounds only the unit rows (and, backward, the gradient tile).

    `group` is there for the fused loss's signature: this one sees one device's logits only, so a group of
    several ranks is a ValueError (use `nt_xent`).
    """
    if group is not None and dist.get_world_size(group) > 1:
        raise ValueError("nt_xent_reference computes one device's logits only (use nt_xent with several devices)")
    dtype = torch.promote_types(z1.dtype, torch.float32) if upcast else z1.dtype
    z = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)

"""NT-Xent in plain PyTorch: the full similarity matrix and `cross_entropy`, as peers write it.

The fused kernels in `kernels.ntxent` are tested and benchmarked against this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Mean NT-Xent over the 2B views of `z1`, `z2` ([B, d] each; row i of both is one sample).

    Each view's positive is its other view; every other view is a negative; the self-similarity is
    excluded (-inf), not zeroed. Computed in the inputs' dtype promoted to at least fp32.
    """
    dtype = torch.promote_types(z1.dtype, torch.float32)
    z = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)

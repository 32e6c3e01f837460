"""NT-Xent across real processes (gloo, CPU): the values and gradients meet the documented convention.

Convention: rank r returns the mean over its 2B anchors against all 2BW views; the mean of the W
values is the single-process loss on the concatenated batch; the gradient to rank r's z1, z2 is W
times the gradient of that global loss with respect to those rows.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import nt_xent, nt_xent_reference


def _worker(rank: int, world: int, init: str, z1: torch.Tensor, z2: torch.Tensor, t: float, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    group = weakref.ref(dist.group.WORLD)
    b = z1.shape[0] // world
    a = z1[rank * b:(rank + 1) * b].clone().requires_grad_()
    c = z2[rank * b:(rank + 1) * b].clone().requires_grad_()
    loss = nt_xent(a, c, t, group=dist.group.WORLD)
    loss.backward()
    result = {"loss": loss.detach(), "g1": a.grad, "g2": c.grad}
    try:  # the reference takes the same arguments, and refuses what it cannot compute
        nt_xent_reference(a, c, t, dist.group.WORLD)
        result["reference_refused"] = False
    except ValueError:
        result["reference_refused"] = True
    dist.barrier()
    dist.destroy_process_group()
    del loss
    gc.collect()
    # nt_xent must leave nothing holding the group: one that outlives destroy_process_group keeps its gloo
    # threads and TCP pairs running while the ranks exit.
    result["released"] = group() is None
    torch.save(result, f"{out}/rank{rank}.pt")


@pytest.mark.slow  # spawns 2-3 processes: about 40 s each on 2 CPU cores
@pytest.mark.parametrize(("world", "b", "d"), [(2, 5, 16), (2, 64, 32), (3, 1, 8)])
def test_distributed_values_and_gradients(tmp_path: Path, world: int, b: int, d: int) -> None:
    g = torch.Generator().manual_seed(world * 100 + b)
    z1 = torch.randn(world * b, d, generator=g, dtype=torch.float64)
    z2 = torch.randn(world * b, d, generator=g, dtype=torch.float64)
    t = 0.2
    mp.spawn(_worker, args=(world, f"file://{tmp_path}/store", z1, z2, t, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert all(r["released"] for r in results), "nt_xent kept the process group alive past destroy_process_group"
    assert all(r["reference_refused"] for r in results), "the one-device reference refuses a group of several ranks"

    r1, r2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    single = nt_xent_reference(r1, r2, t)
    single.backward()
    assert torch.allclose(torch.stack([r["loss"] for r in results]).mean(), single, rtol=1e-10)
    for rank, res in enumerate(results):
        rows = slice(rank * b, (rank + 1) * b)
        assert torch.allclose(res["g1"], world * r1.grad[rows], rtol=1e-8, atol=1e-12)
        assert torch.allclose(res["g2"], world * r2.grad[rows], rtol=1e-8, atol=1e-12)
    own = _per_rank_losses(z1, z2, t, world)
    assert torch.allclose(torch.stack([r["loss"] for r in results]), own, rtol=1e-10)


def _per_rank_losses(z1: torch.Tensor, z2: torch.Tensor, t: float, world: int) -> torch.Tensor:
    """Per-anchor losses of the single-process computation, averaged over each rank's anchors."""
    n = z1.shape[0]
    u = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    s = u @ u.T / t
    s.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    per_anchor = torch.logsumexp(s, 1) - s[torch.arange(2 * n), partner]
    b = n // world
    return torch.stack([torch.cat([per_anchor[r * b:(r + 1) * b], per_anchor[n + r * b:n + (r + 1) * b]]).mean()
                        for r in range(world)])

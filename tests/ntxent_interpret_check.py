"""Run under TRITON_INTERPRET=1: the Triton kernels themselves on CPU tensors, against float64.

    TRITON_INTERPRET=1 python tests/ntxent_interpret_check.py GROUP [GROUP ...]

Prints one JSON line per case; tests/test_ntxent.py runs this in a subprocess (the variable must be
set before triton is imported) and asserts the tolerances. Groups: `quick` (one case per dtype, split
sweeps), `small` (every one-chunk width, both sweep layouts, hard inputs), `large_d` (d = 512, 700,
1024, 2048), `fallback` (a d beyond the tile table, a kernel that does not fit), `host_reads` (the
launch code never reads a tensor on the host), `autotune` (the GPU's launch path through Triton's
autotuner).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from ntxent_cases import HostReadDetector, compare, errors, loss_and_grads, make_inputs  # noqa: E402

from kernels import nt_xent_reference, ntxent, tiles  # noqa: E402

SPLIT = {"whole": (ntxent.INTERPRETER_SM_COUNT, tiles.SPLIT_ALIGN), "split": (64, 16)}
"""Sweep layouts: the default plan (one split at these sizes), and many short splits whose boundaries cut
through tiles (every mask at a split's end is then exercised)."""

QUICK = [  # (B, d, dtype, temperature, kind, layout); 2B off every tile
    (37, 32, "float32", 0.05, "random", "split"),
    (33, 128, "bfloat16", 0.2, "random", "split"),
    (33, 16, "float16", 0.2, "random", "split"),
]

SMALL = [  # B=1, every one-chunk width, both layouts, hard inputs
    (1, 32, "float32", 0.1, "random", "whole"),
    (30, 16, "float32", 0.1, "random", "split"),
    (37, 32, "float32", 0.05, "random", "whole"),
    (70, 64, "float32", 0.5, "random", "split"),
    (45, 100, "float32", 0.1, "random", "split"),
    (20, 256, "float32", 1.0, "random", "whole"),
    (40, 64, "float32", 0.1, "near_duplicate", "whole"),
    (40, 64, "float32", 0.1, "duplicate", "split"),
    (40, 64, "float32", 0.1, "large_norm", "whole"),
    (33, 128, "bfloat16", 0.2, "random", "whole"),
    (45, 200, "bfloat16", 0.1, "random", "split"),
    (50, 64, "float16", 0.1, "random", "whole"),
]

LARGE_D = [(b, d, dtype, 0.1, "random", layout) for d, b, layout in ((512, 45, "split"), (700, 37, "whole"),
                                                                     (1024, 29, "split"), (2048, 21, "whole"))
           for dtype in ("float32", "bfloat16")]

INTERPRETER_TILES = {"fwd": tiles.Tile(64, 64, 128, 128, False, 4, 2),
                     "bwd_rows": tiles.Tile(64, 64, 128, 256, False, 4, 2),
                     "bwd_cols": tiles.Tile(64, 64, 128, 256, False, 4, 2)}
"""fp32 at large d in the interpreter: the table's 16-feature chunks and 32-row tiles take the interpreter
minutes per case; these keep every code path (chunked scores, several gradient feature blocks) in seconds.
The table's own fp32 tiles run in the `small` group; compile_check proves they fit."""


@contextlib.contextmanager
def layout(name: str):
    saved = ntxent.INTERPRETER_SM_COUNT, tiles.SPLIT_ALIGN
    ntxent.INTERPRETER_SM_COUNT, tiles.SPLIT_ALIGN = SPLIT[name]
    try:
        yield
    finally:
        ntxent.INTERPRETER_SM_COUNT, tiles.SPLIT_ALIGN = saved


@contextlib.contextmanager
def pytorch_path():
    """The chunked PyTorch path on the same inputs: the emulation of the kernels' rounding."""
    ntxent.INTERPRET = False
    try:
        yield
    finally:
        ntxent.INTERPRET = True


@contextlib.contextmanager
def interpreter_tiles(dtype: str, d: int):
    table = tiles.configs
    if dtype == "float32" and d > 256:
        tiles.configs = lambda kernel, dtype, d: [INTERPRETER_TILES[kernel]]
    try:
        yield
    finally:
        tiles.configs = table


def direct(z: torch.Tensor, t: float, triton_path: bool) -> tuple[torch.Tensor, ...]:
    """Loss and the fp32 gradient (before the op casts it to z's dtype) of one implementation, upstream 2."""
    fwd, bwd = ((ntxent.forward_triton, ntxent.backward_triton) if triton_path
                else (ntxent.forward_torch, ntxent.backward_torch))
    half = z.shape[0] // 2
    loss, lse = fwd(z, z, 0, half, t)
    dza, dzc = bwd(torch.tensor(2.0), z, z, lse, 0, half, t)
    return loss, dza[:half] + dzc[:half], dza[half:] + dzc[half:]


def run_cases(group: str, cases: list) -> None:
    """Through autograd against float64; directly against the PyTorch path, which emulates the same roundings."""
    for b, d, dtype, t, kind, lay in cases:
        z1, z2 = make_inputs(b, d, getattr(torch, dtype), kind, seed=b + d)
        with layout(lay), interpreter_tiles(dtype, d):
            got = loss_and_grads(z1, z2, t, upstream=2.0)
            kernel = direct(torch.cat([z1, z2]), t, triton_path=True)
        want = loss_and_grads(z1.double(), z2.double(), t, 2.0, nt_xent_reference)
        emulated = direct(torch.cat([z1, z2]), t, triton_path=False)
        loss_err, grad_err = errors(got, want)
        vs_loss, vs_grad = errors(kernel, emulated)
        print(json.dumps({"group": group, "case": [b, d, dtype, t, kind, lay], "loss_err": loss_err,
                          "grad_err": grad_err, "vs_pytorch_loss": vs_loss, "vs_pytorch_grad": vs_grad}), flush=True)


def fallback() -> None:
    z1, z2 = make_inputs(5, tiles.MAX_D + 1, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        errs = [compare(z1, z2, 0.2), compare(z1, z2, 0.2)]
    print(json.dumps({"group": "fallback", "case": "beyond_table", "errors": errs,
                      "warnings": [str(w.message) for w in caught]}))

    def no_room(*args, **kwargs):
        raise ntxent.OutOfResources(300_000, 232_448, "shared memory")

    z1, z2 = make_inputs(9, 48, torch.float32)
    fwd = ntxent.KERNELS["fwd"]
    ntxent.KERNELS["fwd"] = type("NoRoom", (), {"__getitem__": lambda self, grid: no_room})()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            errs = [compare(z1, z2, 0.2), compare(z1, z2, 0.2)]
    finally:
        ntxent.KERNELS["fwd"] = fwd
    print(json.dumps({"group": "fallback", "case": "out_of_resources", "errors": errs,
                      "warnings": [str(w.message) for w in caught], "unserved": sorted(map(list, ntxent._unserved))}))


def host_reads() -> None:
    """Forward and backward launch code under a detector of host reads; then a planted read, which it must see."""
    watched = ("kernels/ntxent.py", "kernels/tiles.py", os.path.basename(__file__))  # the plant lives here
    original = ntxent._input_gradient
    for plant in (False, True):
        z = torch.randn(40, 24)
        grad = torch.tensor(2.0)
        if plant:
            ntxent._input_gradient = lambda du, u, rn, factor: original(du, u, rn, float(factor))
        try:
            with layout("split"), HostReadDetector(watched) as detector:
                loss, lse = ntxent.forward_triton(z, z, 0, 20, 0.1)
                ntxent.backward_triton(grad, z, z, lse, 0, 20, 0.1)
        finally:
            ntxent._input_gradient = original
        print(json.dumps({"group": "host_reads", "case": "planted" if plant else "kernels", "reads": detector.reads}))


def autotune() -> None:
    """The GPU's launch path, Triton's autotuner over the table's tiles, timed by the wall clock here."""

    def wall_clock(kernel_call, quantiles):
        t0 = time.perf_counter()
        kernel_call()
        return [time.perf_counter() - t0] * len(quantiles)

    table_tuner = ntxent._tuner

    def tuner(kernel, choices):
        tuned = table_tuner(kernel, choices)
        tuned._do_bench = wall_clock
        return tuned

    ntxent.AUTOTUNE, ntxent._tuner = True, tuner
    try:
        z1, z2 = make_inputs(33, 64, torch.bfloat16)
        loss_err, grad_err = compare(z1, z2, 0.1, upstream=2.0)
    finally:
        ntxent.AUTOTUNE, ntxent._tuner = False, table_tuner
    tuned = {k: table_tuner(k, tuple(tiles.configs(k, "bfloat16", 64))) for k in ntxent.KERNELS}
    print(json.dumps({"group": "autotune", "case": [33, 64, "bfloat16"], "loss_err": loss_err, "grad_err": grad_err,
                      "configs": {k: len(t.configs) for k, t in tuned.items()},
                      "keys": {k: [list(map(str, key)) for key in t.cache] for k, t in tuned.items()}}))


GROUPS = {"quick": lambda: run_cases("quick", QUICK), "small": lambda: run_cases("small", SMALL),
          "large_d": lambda: run_cases("large_d", LARGE_D), "fallback": fallback, "host_reads": host_reads,
          "autotune": autotune}

if __name__ == "__main__":
    assert ntxent.use_triton(torch.zeros(1, 8)), "TRITON_INTERPRET=1 must be set before import"
    for name in sys.argv[1:]:
        GROUPS[name]()

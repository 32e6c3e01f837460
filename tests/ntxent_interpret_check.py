"""Run under TRITON_INTERPRET=1: the Triton kernels themselves on CPU tensors, against float64.

Prints one JSON line per case; tests/test_ntxent.py runs this in a subprocess (the variable must be
set before triton is imported) and asserts the tolerances.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from ntxent_cases import compare, make_inputs  # noqa: E402

from kernels import ntxent  # noqa: E402

CASES = [  # (B, d, dtype, temperature, kind): B off the 128 tile, B=1, every d, bf16
    (1, 32, "float32", 0.1, "random"),
    (37, 32, "float32", 0.05, "random"),
    (70, 64, "float32", 0.5, "random"),
    (129, 128, "float32", 0.1, "random"),
    (20, 256, "float32", 1.0, "random"),
    (40, 64, "float32", 0.1, "near_duplicate"),
    (40, 64, "float32", 0.1, "duplicate"),
    (40, 64, "float32", 0.1, "large_norm"),
    (33, 128, "bfloat16", 0.2, "random"),
    (33, 128, "float16", 0.2, "random"),
]

if __name__ == "__main__":
    assert ntxent.use_triton(torch.zeros(1)), "TRITON_INTERPRET=1 must be set before import"
    for b, d, dtype, t, kind in CASES:
        z1, z2 = make_inputs(b, d, getattr(torch, dtype), kind)
        loss_err, grad_err = compare(z1, z2, t, upstream=1.7)
        print(json.dumps({"case": [b, d, dtype, t, kind], "loss_err": loss_err, "grad_err": grad_err}))

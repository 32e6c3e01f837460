"""Triton's CPU interpreter (`TRITON_INTERPRET=1`) under numpy >= 2.4, on Triton releases before its fix.

The interpreter holds every scalar (a program id, a runtime integer argument, anything computed from
them) as a one-element numpy array, and gives Python's `range` an index with `int(array)`. numpy 2.4
refuses that conversion for arrays of ndim > 0 ("only 0-dimensional arrays can be converted to Python
scalars"), so every loop with runtime bounds fails: `range(lo, hi, BLOCK_N)` in all three kernels,
`range(0, D, BLOCK_K)` in the chunked scores. Triton 3.6 has this; upstream squeezes the array first
(triton-lang/triton#9172), as Triton 3.8 does. No kernel-side form avoids it without changing what
compiles for the GPU (every runtime bound is such an array), so `install()` applies upstream's conversion
to the interpreter alone; on a Triton that already squeezes it changes nothing.
"""

from __future__ import annotations


def _index(self) -> int:
    return int(self.handle.data.squeeze())


def install() -> bool:
    """Make the interpreter's tensor-to-index conversion squeeze first; False if this Triton has no such hook."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return False
    if getattr(patch_tensor, "squeezes_index", False):
        return True

    def patch_tensor_squeezing(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    patch_tensor_squeezing.squeezes_index = True
    interpreter._patch_lang_tensor = patch_tensor_squeezing
    return True

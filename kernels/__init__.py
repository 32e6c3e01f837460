"""Fused NT-Xent (Triton) and its PyTorch reference."""

from kernels.ntxent import nt_xent
from kernels.reference import nt_xent_reference

__all__ = ["nt_xent", "nt_xent_reference"]

"""Numerical kernels of minibert, installed as ``minibert.kernels``.

One op per file, its versions side by side: a plain NumPy reference written for clarity and
one or more Numba versions with exactly the reference's signature. Every version registers
itself under ``(op, version)``; :func:`select` hands the model one version of every op.
"""
from .registry import OPS, available, get, register, select  # noqa: F401
from . import activations, layernorm, softmax  # noqa: F401  (importing registers the versions)

__all__ = ["OPS", "available", "get", "register", "select"]

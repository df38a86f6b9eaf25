"""Numerical kernels of minibert, installed as ``minibert.kernels``.

One op per file, its versions side by side: a plain NumPy reference written for clarity and
one or more Numba versions with exactly the reference's signature. Every version registers
itself under ``(op, version)``; :func:`select` hands the model one version of every op.
"""
import os

# Numba's OpenMP workers spin between parallel regions by default, taking a core away from the BLAS
# threads that run the GEMM in between (measured on 2 cores: MiniLM (8,128) forward 348 ms with
# spinning, 260 ms with passive waiting). Read when Numba's OpenMP pool starts; a value the user
# set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .registry import OPS, available, get, register, select  # noqa: F401
from . import activations, layernorm, softmax  # noqa: F401  (importing registers the versions)

__all__ = ["OPS", "available", "get", "register", "select"]

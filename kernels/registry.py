"""The kernel registry: ``register(op, version)`` and ``select(kernels)``.

A *kernel set* is the name the model is built with (``kernels="numpy"`` or ``"numba"``); it maps
every op to one registered version. ``"numpy"`` takes each op's reference, ``"numba"`` each op's
default Numba version. Tests run every registered version against the reference.
"""
from __future__ import annotations

from typing import Callable, Dict

# Numba's fast-math flags for every kernel that uses any: reordering and contraction, but not
# "nnan"/"ninf": a NaN or inf in the weights or inputs must come out as it does in transformers,
# not be assumed away. Every kernel also takes NumPy's error model (``error_model="numpy"``), so a
# division by zero gives inf or NaN instead of raising from inside the kernel.
FASTMATH = {"nsz", "arcp", "contract", "afn"}

# op -> {version: function}
OPS: Dict[str, Dict[str, Callable]] = {}
# op -> the version the "numba" kernel set uses
_DEFAULT_NUMBA: Dict[str, str] = {}

KERNEL_SETS = ("numba", "numpy")


def register(op: str, version: str, *, default: bool = False):
    """Decorator: file ``fn`` as ``version`` of ``op``; ``default=True`` makes it the numba set's choice."""

    def deco(fn):
        versions = OPS.setdefault(op, {})
        if version in versions:
            raise ValueError(f"kernel {op!r} version {version!r} is registered twice")
        if default and op in _DEFAULT_NUMBA:
            raise ValueError(f"kernel {op!r} already has a default version ({_DEFAULT_NUMBA[op]!r}); "
                             f"cannot make {version!r} the default too")
        versions[version] = fn
        if default:
            _DEFAULT_NUMBA[op] = version
        return fn

    return deco


def available(op: str) -> list[str]:
    """The registered versions of ``op``, the reference ("numpy") first."""
    if op not in OPS:
        raise KeyError(f"unknown kernel op {op!r}; known ops: {sorted(OPS)}")
    return list(OPS[op])


def get(op: str, version: str) -> Callable:
    """One version of one op."""
    versions = OPS.get(op)
    if versions is None:
        raise KeyError(f"unknown kernel op {op!r}; known ops: {sorted(OPS)}")
    if version not in versions:
        raise KeyError(f"kernel op {op!r} has no version {version!r}; registered: {list(versions)}")
    return versions[version]


def default(op: str) -> Callable:
    """The version of ``op`` that the "numba" kernel set uses."""
    return get(op, _DEFAULT_NUMBA.get(op, "numpy"))


def select(kernels: str = "numba") -> Dict[str, Callable]:
    """``{op: function}`` for the kernel set ``kernels`` ("numba" or "numpy")."""
    if kernels not in KERNEL_SETS:
        raise ValueError(f"kernels={kernels!r} is not a kernel set; expected one of {KERNEL_SETS}")
    if kernels == "numpy":
        return {op: versions["numpy"] for op, versions in OPS.items()}
    return {op: versions[_DEFAULT_NUMBA.get(op, "numpy")] for op, versions in OPS.items()}

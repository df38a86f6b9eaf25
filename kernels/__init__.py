"""Numerical kernels of minibert, installed as ``minibert.kernels``.

One op per file, its versions side by side: a plain NumPy reference written for clarity and
one or more Numba versions with exactly the reference's signature. Every version registers
itself under ``(op, version)``; :func:`select` hands the model one version of every op.
"""
import os
import tempfile


def _writable(path) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def numba_cache_dir(here=os.path.dirname(os.path.abspath(__file__)), writable=_writable):
    """Where Numba can keep the compiled kernels (``cache=True``), or None if its own choice works.

    Numba writes next to the source (``kernels/__pycache__``) and, when that is read-only (a
    system-wide or read-only install), in the user's cache directory; when neither is writable
    (a container with a read-only home) every ``cache=True`` kernel would fail at its first call.
    Then the cache goes to a per-user folder of the temporary directory. NUMBA_CACHE_DIR, if the
    user set it, is always kept."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    if writable(os.path.join(here, "__pycache__")):
        return None
    user = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "numba")
    if writable(user):
        return None
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    return os.path.join(tempfile.gettempdir(), f"minibert-numba-cache-{uid}")


_fallback = numba_cache_dir()
if _fallback:
    os.environ["NUMBA_CACHE_DIR"] = _fallback
    import numba  # noqa: E402  (numba reads the variable at import; if it was imported before, tell it now)

    numba.config.CACHE_DIR = _fallback

from .registry import OPS, available, default, get, register, select  # noqa: F401
from . import activations, attention, dense, gemm, layernorm, softmax  # noqa: F401  (importing registers the versions)

__all__ = ["OPS", "available", "default", "get", "register", "select"]


def compiled(dtype) -> bool:
    """Whether the attention kernel for ``dtype`` (the slowest of the default set to compile) is
    in Numba's on-disk cache for this CPU, i.e. whether a first pass will load rather than compile.
    Reads Numba's cache index (not a public API): False whenever that cannot be told."""
    import numpy as np

    try:
        k = attention._attention  # the default version's kernel for this CPU
        magic = k.targetctx.codegen().magic_tuple()
        name = np.dtype(dtype).name
        return any(key[1] == magic and str(key[0][0].dtype) == name for key in k._cache._cache_file._load_index())
    except Exception:  # noqa: BLE001  (another Numba version's internals: say "not compiled")
        return False

"""On/off switches read from the environment (``MINIBERT_KEEP_FREED_MEMORY``,
``MINIBERT_BLAS_ON_NUMBA_POOL``): one reading, so a mistyped value is an error, not silently "on"."""
from __future__ import annotations

import os

ON, OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def switch(name: str, default: bool = True) -> bool:
    """The environment variable ``name`` as a bool; unset or empty: ``default``."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in ON:
        return True
    if value in OFF:
        return False
    raise ValueError(f"environment variable {name}={raw!r}; expected 1 or 0 (also true/false, yes/no, on/off)")

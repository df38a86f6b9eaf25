"""Benchmarks of minibert: kernels, whole models against their peers, start-up and memory."""
import os
import sys

# What `import minibert` does when it comes before NumPy (as in the CLI): OpenBLAS's idle threads
# stop spinning after ~0.3 ms instead of ~0.1 s (see minibert/__init__.py). The benchmark modules
# import NumPy first, so it is set here, before they load. The peers compute with their own
# libraries (MKL/oneDNN, MLAS), not NumPy's OpenBLAS, so it changes nothing for them.
ORIGINAL_ENV = dict(os.environ)
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")
# Benchmarks time the compiled kernels: on a cold cache they compile in the process (and its
# children), never the NumPy kernels of a first use (docs/runtime.md).
os.environ.setdefault("MINIBERT_BACKGROUND_COMPILE", "0")

# `python -m ...` puts the repository root first on sys.path, where kernels/ (installed only as
# minibert.kernels) would shadow PyPI's `kernels` package, which transformers imports: move it last.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _root] + [_root]

"""What every benchmark records: the machine, library versions, threads; and one timer."""
from __future__ import annotations

import json
import time
import os
import platform
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list:
    """The vector ISA flags of /proc/cpuinfo that decide which kernels a host runs well."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in ISA_FLAGS if f in flags)
    except OSError:
        pass
    return []


def versions(*names) -> dict:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def threads() -> dict:
    info = {"numba": None, "blas": None}
    try:
        import numba

        info["numba"] = numba.get_num_threads()
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [{k: p.get(k) for k in ("internal_api", "num_threads", "version")} for p in threadpool_info()]
    except ImportError:
        pass
    return info


def commit() -> str:
    """This checkout's commit, with "-dirty" when it has uncommitted changes; "" outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("-dirty" if head and dirty else "")


def machine() -> dict:
    return {
        "commit": commit(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": versions("minibert", "numpy", "numba", "llvmlite", "torch", "transformers"),
        "threads": threads(),
    }


def new_result(name: str, ext: str = "json") -> str:
    """A new file in benchmarks/results/ (name-YYYYmmdd-HHMMSS.ext): a run never overwrites the
    committed results unless ``--output`` names them."""
    return f"benchmarks/results/{name}-{time.strftime('%Y%m%d-%H%M%S')}.{ext}"


def write_json(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path

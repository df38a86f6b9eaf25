"""safetensors files -> ``{checkpoint key: array}`` for BertModel, with the quirks of real checkpoints.

The keys are the checkpoint's own names without the task prefix (``bert.``), so every array maps
1:1 to a transformers parameter: ``encoder.layer.3.attention.self.query.weight`` is
``model.encoder.layer[3].attention.self.query.weight`` in both libraries.

Quirks handled here, nowhere else:
- a ``bert.`` prefix (BertForPreTraining / MaskedLM / SequenceClassification checkpoints);
- legacy ``LayerNorm.gamma`` / ``LayerNorm.beta`` for ``weight`` / ``bias``;
- buffers saved with the weights (``embeddings.position_ids``, ``embeddings.token_type_ids``);
- head weights (``cls.*``, ``classifier.*``, ``qa_outputs.*``): returned apart for the heads;
- no pooler weights (masked-LM checkpoints): the pooler is None;
- float16 / bfloat16 storage, upcast to the compute dtype (bfloat16 has no NumPy dtype, so its
  raw bytes are widened to float32: bfloat16 is the top half of a float32).
Arrays already in the compute dtype stay memory-mapped views of the file: no copy.
"""
from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path
from typing import Dict, Iterable, Tuple

import numpy as np

from .config import BertConfig

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
HEAD_PREFIXES = ("cls.", "classifier.", "qa_outputs.")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class CheckpointError(ValueError):
    """A checkpoint's files or tensors are not what the config says they must be."""


# -- reading files --------------------------------------------------------------------------------
def checkpoint_files(model_dir) -> list[Path]:
    """The safetensors files of a checkpoint directory: one file, or the shards its index names."""
    d = Path(model_dir)
    single, index = d / SINGLE_FILE, d / INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) {missing} that are not in {d}")
        return [d / s for s in shards]
    pickles = [f for f in _PICKLE_FILES if (d / f).is_file()]
    if pickles:
        raise CheckpointError(
            f"{d} has weights only as {pickles[0]}; minibert reads safetensors only and never unpickles. "
            "Convert once with transformers: "
            "`AutoModel.from_pretrained(path).save_pretrained(path, safe_serialization=True)`, "
            "which writes model.safetensors."
        )
    raise CheckpointError(f"{d} has no {SINGLE_FILE} or {INDEX_FILE}")


def _widen_bfloat16(raw: bytes, shape) -> np.ndarray:
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)


_OWN_MAPS: "weakref.WeakValueDictionary[int, np.memmap]" = weakref.WeakValueDictionary()  # id -> map _map_file made
_NP_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
              "U8": "u1", "BOOL": "?"}


def _map_file(path: Path, names) -> Dict[str, np.ndarray]:
    """Zero-copy views of the tensors ``names`` of one safetensors file (which the safetensors
    library has already validated): the 8-byte header length, the JSON header with each tensor's
    dtype, shape and byte range, then the data. The file is mapped copy-on-write, so the arrays are
    writable and a write never reaches the file; pages are read from disk only when touched and
    are shared with the OS's page cache, so the weights are in memory once."""
    with open(path, "rb") as fh:
        (n,) = np.frombuffer(fh.read(8), dtype="<u8")
        header = json.loads(fh.read(int(n)))
    mm = np.memmap(path, dtype=np.uint8, mode="c")
    _OWN_MAPS[id(mm)] = mm
    start = 8 + int(n)
    out = {}
    for name in names:
        info = header[name]
        lo, hi = info["data_offsets"]
        out[name] = mm[start + lo:start + hi].view(_NP_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def release_pages(*arrays) -> None:
    """Tell the OS it may drop the file pages behind memory-mapped ``arrays`` that are no longer
    used (after a copy was made of them): they leave the process's RSS and are read from the file
    again only if touched. Only maps this module made (read-only use, copy-on-write) qualify: a
    caller's own copy-on-write map could hold changes that dropping its pages would undo."""
    import mmap

    for arr in arrays:
        base = arr  # the map itself, under the memmap views that slicing it made
        while base is not None and _OWN_MAPS.get(id(base)) is not base:
            base = getattr(base, "base", None)
        if base is None:
            continue
        mm = getattr(base, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            continue
        start = arr.__array_interface__["data"][0] - base.__array_interface__["data"][0] + base.offset
        page = mmap.PAGESIZE
        lo = -(-start // page) * page  # whole pages inside the array only
        hi = (start + arr.nbytes) // page * page
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def read_safetensors(files: Iterable[Path]) -> Dict[str, np.ndarray]:
    """Every tensor of every file as a NumPy array: memory-mapped, not copied (bfloat16, which
    NumPy has no dtype for, is widened to a float32 copy)."""
    from safetensors import SafetensorError, deserialize, safe_open

    tensors: Dict[str, np.ndarray] = {}
    for path in files:
        try:
            # the library validates the file (header, offsets, sizes) and tells each dtype; its NumPy
            # get_tensor copies, so the data itself is mapped by _map_file
            with safe_open(str(path), framework="np") as f:
                bf16, mapped = [], []
                for k in f.keys():
                    if k in tensors or k in mapped or k in bf16:
                        raise CheckpointError(f"tensor {k!r} appears in more than one file ({path})")
                    dt = f.get_slice(k).get_dtype()
                    if dt == "BF16":
                        bf16.append(k)
                    elif dt in _NP_DTYPES:
                        mapped.append(k)
                    else:  # float8, 4-bit, complex...: no NumPy array to make of them
                        raise CheckpointError(
                            f"tensor {k!r} in {path.name} has dtype {dt}; minibert reads "
                            f"{', '.join(['BF16', *_NP_DTYPES])} (floating-point weights: F64, F32, F16, BF16)")
            tensors.update(_map_file(path, mapped))
            if bf16:
                wanted = set(bf16)
                for name, info in deserialize(path.read_bytes()):
                    if name in wanted:
                        tensors[name] = _widen_bfloat16(info["data"], info["shape"])
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None
        except OSError as e:
            raise CheckpointError(f"could not read {path}: {e}") from None
    return tensors


# -- mapping names --------------------------------------------------------------------------------
def canonical_name(key: str) -> str:
    """The BertModel name of a checkpoint key: no ``bert.`` prefix, gamma/beta -> weight/bias."""
    if key.startswith("bert."):
        key = key[len("bert."):]
    if key.endswith("LayerNorm.gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith("LayerNorm.beta"):
        key = key[: -len("beta")] + "bias"
    return key


def expected_shapes(config: BertConfig, pooler: bool = True) -> Dict[str, Tuple[int, ...]]:
    """Every tensor BertModel needs, with the shape the config implies (Linear weights are [out, in])."""
    H, I = config.hidden_size, config.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (config.vocab_size, H),
        "embeddings.position_embeddings.weight": (config.max_position_embeddings, H),
        "embeddings.token_type_embeddings.weight": (config.type_vocab_size, H),
        "embeddings.LayerNorm.weight": (H,),
        "embeddings.LayerNorm.bias": (H,),
    }
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes[p + f"attention.self.{name}.weight"] = (H, H)
            shapes[p + f"attention.self.{name}.bias"] = (H,)
        shapes[p + "attention.output.dense.weight"] = (H, H)
        shapes[p + "attention.output.dense.bias"] = (H,)
        shapes[p + "attention.output.LayerNorm.weight"] = (H,)
        shapes[p + "attention.output.LayerNorm.bias"] = (H,)
        shapes[p + "intermediate.dense.weight"] = (I, H)
        shapes[p + "intermediate.dense.bias"] = (I,)
        shapes[p + "output.dense.weight"] = (H, I)
        shapes[p + "output.dense.bias"] = (H,)
        shapes[p + "output.LayerNorm.weight"] = (H,)
        shapes[p + "output.LayerNorm.bias"] = (H,)
    if pooler:
        shapes["pooler.dense.weight"] = (H, H)
        shapes["pooler.dense.bias"] = (H,)
    return shapes


def to_dtype(name: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if arr.dtype.kind != "f":
        raise CheckpointError(f"tensor {name!r} has dtype {arr.dtype}; expected a floating-point tensor")
    return arr if arr.dtype == dtype else arr.astype(dtype)


def split_checkpoint(
    tensors: Dict[str, np.ndarray], config: BertConfig, dtype=np.float32, pooler: bool = True
) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Checkpoint tensors -> (BertModel params, head tensors), checked against the config.

    params holds exactly the names of :func:`expected_shapes` in ``dtype``; heads holds
    ``cls.*`` / ``classifier.*`` / ``qa_outputs.*`` (canonical names, original dtype).
    ``pooler=False`` (transformers' ``add_pooling_layer=False``) leaves the pooler out.
    """
    dtype = np.dtype(dtype)
    renamed: Dict[str, np.ndarray] = {}
    for key, arr in tensors.items():
        name = canonical_name(key)
        if name in renamed:
            raise CheckpointError(f"checkpoint has tensor {name!r} twice (as {key!r} and another spelling)")
        renamed[name] = arr

    in_file = "pooler.dense.weight" in renamed or "pooler.dense.bias" in renamed
    has_pooler = pooler and in_file
    if not pooler:
        renamed = {k: v for k, v in renamed.items() if not k.startswith("pooler.")}
    shapes = expected_shapes(config, pooler=has_pooler)
    missing = [k for k in shapes if k not in renamed]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(
            f"checkpoint is missing tensor(s) {missing[:5]}{more}; expected shapes "
            + ", ".join(f"{k}: {shapes[k]}" for k in missing[:5])
        )
    params: Dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        arr = renamed[name]
        if tuple(arr.shape) != shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(arr.shape)}; the config implies {shape}"
            )
        params[name] = to_dtype(name, arr, dtype)

    heads = {k: v for k, v in renamed.items() if k.startswith(HEAD_PREFIXES)}
    unused = sorted(k for k in renamed if k not in params and k not in heads and k not in BUFFERS)
    if unused:
        logger.warning("ignoring %d checkpoint tensor(s) BertModel does not use: %s", len(unused), ", ".join(unused[:8]))
    if pooler and not in_file:
        logger.warning("checkpoint has no pooler weights (pooler.dense.*), so pooler_output is None")
    return params, heads


def load_weights(model_dir, config: BertConfig, dtype=np.float32, pooler: bool = True):
    """(params, heads) from the safetensors file(s) in ``model_dir``; see :func:`split_checkpoint`."""
    return split_checkpoint(read_safetensors(checkpoint_files(model_dir)), config, dtype, pooler)


# -- flat checkpoint names <-> nested params --------------------------------------------------------
def nest(flat: Dict[str, np.ndarray]) -> Dict:
    """``{"encoder.layer.0.output.dense.weight": a}`` -> ``{"encoder": {"layer": [{"output": ...}]}}``.

    The arrays are not copied. Numbered levels become lists.
    """
    root: Dict = {}
    for name, arr in flat.items():
        node = root
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = arr

    def listify(node):
        if not isinstance(node, dict):
            return node
        if node and all(key.isdigit() for key in node):
            return [listify(node[str(i)]) for i in range(len(node))]
        return {key: listify(v) for key, v in node.items()}

    return listify(root)


def flatten(params: Dict, prefix: str = "") -> Dict[str, np.ndarray]:
    """The inverse of :func:`nest`."""
    flat: Dict[str, np.ndarray] = {}
    items = enumerate(params) if isinstance(params, list) else params.items()
    for key, v in items:
        name = f"{prefix}{key}"
        if isinstance(v, (dict, list)):
            flat.update(flatten(v, name + "."))
        else:
            flat[name] = v
    return flat

"""``python -m minibert.warmup [float32|float64]``: compile the default kernels for one dtype into
Numba's on-disk cache, then leave :func:`minibert.runtime.ready_marker` beside it. Started detached
by the first pass on a cold cache (:func:`minibert.runtime.kernels_ready`); one compiles at a time
per cache, the others wait for it. Exiting without the marker tells the starter to compile itself.

It runs a tiny random BERT loaded as ``from_pretrained`` loads a checkpoint (read-only float32
safetensors), dense and packed, so the kernels compile for the same argument types as a real model's.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile


def main(argv=None) -> int:
    dtype = (argv if argv is not None else sys.argv[1:] or ["float32"])[0]
    if dtype not in ("float32", "float64"):
        print(f"dtype={dtype!r}; expected float32 or float64", file=sys.stderr)
        return 2
    import numpy as np
    from safetensors.numpy import save_file

    from . import runtime
    from .bert import BertModel

    runtime.compile_here()
    marker = runtime.ready_marker(dtype)
    if marker is None:
        return 1
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another warm-up compiling into this cache: wait for it
        if os.path.exists(marker):
            return 0
        with tempfile.TemporaryDirectory(prefix="minibert-warmup-") as d:
            H, I, V, T = 32, 64, 64, 16
            cfg = dict(model_type="bert", hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=I, vocab_size=V, max_position_embeddings=T, type_vocab_size=2,
                       hidden_act="gelu", layer_norm_eps=1e-12)
            rng = np.random.default_rng(0)
            shapes = {"embeddings.word_embeddings.weight": (V, H), "embeddings.position_embeddings.weight": (T, H),
                      "embeddings.token_type_embeddings.weight": (2, H), "embeddings.LayerNorm.weight": (H,),
                      "embeddings.LayerNorm.bias": (H,), "pooler.dense.weight": (H, H), "pooler.dense.bias": (H,)}
            layer = {"attention.self.query": (H, H), "attention.self.key": (H, H), "attention.self.value": (H, H),
                     "attention.output.dense": (H, H), "intermediate.dense": (I, H), "output.dense": (H, I)}
            for name, (o, i) in layer.items():
                shapes[f"encoder.layer.0.{name}.weight"], shapes[f"encoder.layer.0.{name}.bias"] = (o, i), (o,)
            for name in ("attention.output.LayerNorm", "output.LayerNorm"):
                shapes[f"encoder.layer.0.{name}.weight"] = shapes[f"encoder.layer.0.{name}.bias"] = (H,)
            save_file({n: (0.02 * rng.standard_normal(s)).astype(dtype) for n, s in shapes.items()},
                      os.path.join(d, "model.safetensors"))
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg, f)
            model = BertModel.from_pretrained(d, dtype=dtype)
            ids = rng.integers(1, V, size=(2, 8))
            mask = np.ones_like(ids)
            mask[1, 5:] = 0
            model(ids[:1])  # dense, no padding
            model(ids, attention_mask=mask)  # dense, padded
            model.run(ids, attention_mask=mask, skip_padding=True)  # packed
            # over 256 rows a layer runs kernel by kernel, the activation a pass of its own (kernels/layer.py)
            model(rng.integers(1, V, size=(20, T)))
        open(marker, "w").close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``minibert`` command. Results go to stdout; progress and log lines to stderr."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import List, Optional

import numpy as np

from .hub import DEFAULT_MODEL, model_dir_with_config

log = logging.getLogger("minibert")

FILL_MASK_MODEL = "google-bert/bert-base-uncased"


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _fmt(v: np.ndarray, n: int = 5) -> str:
    head = " ".join(f"{x:+.4f}" for x in v[:n])
    return f"[{head}{' ...' if v.shape[0] > n else ''}]"


def cmd_encode(args) -> int:
    from . import BertModel, BertTokenizer
    from .sentence import warn_truncated

    t0 = time.perf_counter()
    model_dir = model_dir_with_config(args.model)
    tokenizer = BertTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir, dtype=args.dtype, kernels=args.kernels)
    log.info("loaded %s from %s in %.2f s", args.model or DEFAULT_MODEL, model_dir, time.perf_counter() - t0)

    limit = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    max_length = args.max_length or limit
    if max_length > model.config.max_position_embeddings:
        raise ValueError(f"--max-length {max_length} exceeds the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    warn_truncated(tokenizer.lengths(args.texts), max_length)
    x = tokenizer(args.texts, padding=True, truncation=True, max_length=max_length)
    t1 = time.perf_counter()
    out = model(**x, output_hidden_states=args.hidden_states, output_attentions=args.attentions)
    log.info("encoded %d text(s), %d tokens each after padding, in %.3f s",
             len(args.texts), x["input_ids"].shape[1], time.perf_counter() - t1)

    for i, text in enumerate(args.texts):
        n = int(x["attention_mask"][i].sum())
        tokens = tokenizer.convert_ids_to_tokens(x["input_ids"][i, :n])
        h = out.last_hidden_state[i, :n]
        print(f"text {i}: {text!r}")
        print(f"  tokens ({n}): {' '.join(tokens)}")
        print(f"  last_hidden_state {h.shape}: first token {_fmt(h[0])}")
        if out.pooler_output is not None:
            print(f"  pooler_output {out.pooler_output[i].shape}: {_fmt(out.pooler_output[i])}")
        else:
            print("  pooler_output: None (the checkpoint has no pooler weights)")

    if args.output:
        arrays = {
            "input_ids": x["input_ids"],
            "attention_mask": x["attention_mask"],
            "last_hidden_state": out.last_hidden_state,
        }
        if out.pooler_output is not None:
            arrays["pooler_output"] = out.pooler_output
        if args.hidden_states:
            arrays["hidden_states"] = np.stack(out.hidden_states)  # [L + 1, B, T, H]
        if args.attentions:
            arrays["attentions"] = np.stack(out.attentions)  # [L, B, nH, T, T]
        np.savez(args.output, **arrays)
        log.info("wrote %s (%s)", args.output, ", ".join(arrays))
    return 0


def _load_task(cls_name: str, model: Optional[str], args):
    import minibert

    from .tokenizer import BertTokenizer

    t0 = time.perf_counter()
    model_dir = model_dir_with_config(model)
    tokenizer = BertTokenizer.from_pretrained(model_dir)
    m = getattr(minibert, cls_name).from_pretrained(model_dir, dtype=args.dtype, kernels=args.kernels)
    log.info("loaded %s %s from %s in %.2f s", cls_name, model or DEFAULT_MODEL, model_dir, time.perf_counter() - t0)
    return tokenizer, m


def _softmax(x):  # float64 probabilities over the last axis
    from .losses import log_softmax

    x = np.asarray(x)
    return np.exp(log_softmax(x.reshape(-1, x.shape[-1]))).reshape(x.shape)


def _masked_batch(tokenizer, model, args):  # the texts tokenized, each checked to hold a [MASK]
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError(f"the tokenizer of {args.model} has no mask token")
    V = model.config.vocab_size
    if args.top_k > V:
        raise ValueError(f"--top-k {args.top_k} exceeds the vocabulary size ({V})")
    limit = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    x = tokenizer(args.texts, padding=True, truncation=True, max_length=limit)
    ids = x["input_ids"]
    for i, text in enumerate(args.texts):
        if not (ids[i] == mask_id).any():
            raise ValueError(f"text {i} ({text!r}) has no {tokenizer.mask_token} token "
                             f"(or it was truncated away at {limit} tokens)")
    return x, ids, mask_id


def cmd_fill_mask(args) -> int:
    tokenizer, model = _load_task("BertForMaskedLM", args.model, args)
    x, ids, mask_id = _masked_batch(tokenizer, model, args)
    logits = model(**x).logits  # [B, T, V]
    for i, text in enumerate(args.texts):
        print(f"text {i}: {text!r}")
        n = int(x["attention_mask"][i].sum())
        for pos in np.flatnonzero(ids[i, :n] == mask_id):
            probs = _softmax(logits[i, pos])  # [V]
            top = np.argsort(-probs, kind="stable")[: args.top_k]
            print(f"  {tokenizer.mask_token} at token {pos}:")
            for rank, t in enumerate(top, 1):
                filled = ids[i, :n].copy()
                filled[pos] = t
                token = tokenizer.convert_ids_to_tokens([t])[0]
                sequence = tokenizer.decode(filled, skip_special_tokens=True)
                print(f"    {rank:>2}. {token:<15} {probs[t]:.4f}   {sequence}")
    return 0


def cmd_logit_lens(args) -> int:
    tokenizer, model = _load_task("BertForMaskedLM", args.model, args)
    x, ids, mask_id = _masked_batch(tokenizer, model, args)
    lens = model.logit_lens(**x, top_k=args.top_k, tokenizer=tokenizer)
    width = 22
    for i, text in enumerate(args.texts):
        print(f"text {i}: {text!r}")
        n = int(x["attention_mask"][i].sum())
        for pos in np.flatnonzero(ids[i, :n] == mask_id):
            print(f"  {tokenizer.mask_token} at token {pos}: top {args.top_k} by layer (0: the embeddings)")
            print("    layer  " + "".join(f"{'top-' + str(r + 1):<{width}}" for r in range(args.top_k)).rstrip())
            for layer in range(lens.logits.shape[0]):
                cells = [f"{tok} {p:.4f}" for tok, p in zip(lens.top_tokens[layer][i][pos], lens.top_probs[layer, i, pos])]
                print(f"    {layer:>5}  " + "".join(f"{c:<{width}}" for c in cells).rstrip())
    return 0


def cmd_classify(args) -> int:
    tokenizer, model = _load_task("BertForSequenceClassification", args.model, args)
    limit = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    x = tokenizer(args.texts, padding=True, truncation=True, max_length=limit)
    logits = model(**x).logits  # [B, num_labels]
    n = model.num_labels
    problem = model.problem_type or ("regression" if n == 1 else "single_label_classification")
    if problem == "multi_label_classification":
        scores, kind = 1 / (1 + np.exp(-logits.astype(np.float64))), "sigmoid"  # independent labels
    elif problem == "regression":
        scores, kind = logits.astype(np.float64), "value"
    else:
        scores, kind = _softmax(logits), "softmax"
    labels = model.id2label
    top_k = min(args.top_k or n, n)
    for i, text in enumerate(args.texts):
        print(f"text {i}: {text!r}")
        for j in np.argsort(-scores[i], kind="stable")[:top_k]:
            print(f"  {labels.get(int(j), f'LABEL_{j}'):<20} {scores[i, j]:.4f}  ({kind})")
    return 0


# -- embed / similarity -------------------------------------------------------------------------
def read_texts(path: str, encoding: str = "utf-8") -> List[str]:
    """One text a line, or JSON Lines with a "text" field (a .jsonl name, or a first line that is
    a JSON object). Every line is a row: row i of the output is line i + 1 of the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise OSError(f"--input {path}: {e.strerror or e}") from None
    try:
        lines = raw.decode(encoding).splitlines()
    except LookupError:
        raise ValueError(f"--encoding {encoding}: not an encoding Python knows (e.g. utf-8, latin-1, cp1252)") from None
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"--input {path}: line {line} is not valid {encoding} (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start}); give the file's encoding with --encoding, e.g. --encoding latin-1") from None
    first = next((ln for ln in lines if ln.strip()), "")
    if not (path.endswith(".jsonl") or first.lstrip().startswith("{")):
        return lines
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"--input {path}: line {n} is empty; JSON Lines needs an object with a 'text' field on every line")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--input {path}: line {n} is not valid JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"--input {path}: line {n} has no string 'text' field")
        texts.append(obj["text"])
    return texts


def _encoder(args):
    from .sentence import SentenceEncoder

    t0 = time.perf_counter()
    enc = SentenceEncoder.from_pretrained(model_dir_with_config(args.model), dtype=args.dtype, kernels=args.kernels)
    log.info("loaded %s in %.2f s (pooling %s, normalize %s)", args.model or DEFAULT_MODEL, time.perf_counter() - t0,
             "+".join(enc.pooling), enc.normalize)
    return enc


def cmd_embed_corpus(args) -> int:
    from .corpus import embed

    engine = args.engine or "local"
    if engine == "local" and (args.workers or args.scheduler):
        raise ValueError("--workers and --scheduler need --engine dask")
    if args.texts:
        raise ValueError("a corpus comes from --input (files), not TEXT arguments")
    if not args.input or not args.output:
        raise ValueError("--text-column embeds a corpus: give --input (a glob, a directory or files) and "
                         "--output (a directory)")
    if args.pooling is not None or args.normalize is not None:
        raise ValueError("--pooling and --normalize: the corpus uses the checkpoint's own pipeline")
    t0 = time.perf_counter()
    outs = embed(args.input, args.output, text_column=args.text_column, id_column=args.id_column, engine=engine,
                 workers=args.workers, scheduler=args.scheduler, batch_size=args.batch_size,
                 model=args.model, overwrite=args.overwrite,
                 progress=not args.no_progress)
    log.info("%d output file(s) in %s (%.1f s)", len(outs), args.output, time.perf_counter() - t0)
    return 0


def cmd_embed(args) -> int:
    if any(v is not None for v in (args.text_column, args.id_column, args.engine, args.workers, args.scheduler)) \
            or args.overwrite:
        if args.text_column is None:
            raise ValueError("--id-column, --engine, --workers, --scheduler and --overwrite embed a corpus: "
                             "give --text-column too")
        return cmd_embed_corpus(args)
    if args.texts and args.input:
        raise ValueError("give TEXTs or --input FILE, not both")
    if not args.texts and not args.input:
        raise ValueError("nothing to embed: give TEXTs or --input FILE")
    texts = read_texts(args.input, args.encoding) if args.input else args.texts
    if not texts:
        raise ValueError(f"--input {args.input} holds no text")
    if args.output and not args.output.endswith(".npy"):
        raise ValueError(f"--output {args.output}: expected a .npy file name")
    enc = _encoder(args)
    t0 = time.perf_counter()
    progress = len(texts) > args.batch_size and not args.no_progress
    vecs = enc.encode(texts, batch_size=args.batch_size, pooling=args.pooling, normalize=args.normalize,
                      show_progress_bar=progress)
    dt = time.perf_counter() - t0
    log.info("embedded %d text(s) in %.2f s (%.1f texts/s)", len(texts), dt, len(texts) / dt if dt else float("inf"))
    if args.output:
        np.save(args.output, vecs)
        log.info("wrote %s: float32 %s", args.output, vecs.shape)
    else:
        for i, (text, v) in enumerate(zip(texts, vecs)):
            print(f"text {i}: {text!r}")
            print(f"  embedding {v.shape}: {_fmt(v)}  norm {np.linalg.norm(v):.4f}")
    return 0


def cmd_similarity(args) -> int:
    if len(args.texts) < 2:
        raise ValueError(f"similarity needs at least two TEXTs; got {len(args.texts)}")
    enc = _encoder(args)
    sim = enc.similarity(args.texts)  # [N, N] cosine
    width = 8
    print("cosine similarity")
    print(" " * 6 + "".join(f"{j:>{width}}" for j in range(len(args.texts))))
    for i, row in enumerate(sim):
        print(f"{i:>4}  " + "".join(f"{c:>{width}.4f}" for c in row))
    for i, t in enumerate(args.texts):
        print(f"  {i}: {t}")
    return 0


# -- inspect ------------------------------------------------------------------------------------
def tree_lines(module, name: str, depth: int = 0) -> List[str]:
    """The module tree with each module's parameter count and each parameter's shape; of a list of
    identical layers only the first is spelled out."""
    from .modules import ModuleList

    pad = "  " * depth
    head = f"{pad}{name} ({type(module).__name__})" if name else f"{type(module).__name__}"
    n = module.num_parameters()
    if isinstance(module, ModuleList):
        k = len(module)
        lines = [f"{head}: {k} x {type(module[0]).__name__}, {n:,} parameters ({n // max(k, 1):,} each)"]
        if k:
            lines += tree_lines(module[0], "0", depth + 1)
            if k > 1:
                lines.append(f"{pad}  1-{k - 1}: the same shapes as 0")
        return lines
    own = [f"{p} {list(module._params[p].shape)}" for p in type(module)._param_names]
    lines = [f"{head}: {n:,} parameters" + (f"  [{', '.join(own)}]" if own else "")]
    for cname, child in module.named_children():
        if child.num_parameters():
            lines += tree_lines(child, cname, depth + 1)
    return lines


def attention_entropy(probs) -> np.ndarray:  # [B, nH, T, T] -> [B, nH]: mean over queries, nats
    p = np.asarray(probs, dtype=np.float64)
    return -(p * np.log(np.where(p > 0, p, 1))).sum(-1).mean(-1)


def _need_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("--attention-png needs matplotlib, which is not installed: "
                           "pip install matplotlib (or, in a checkout of minibert, pip install '.[plot]')") from None


def plot_attention(path: str, probs, tokens: List[str], layer: int, head: Optional[int]) -> None:
    """Heat map of one head ([T, T]) or a grid of every head of the layer, token labels on both axes."""
    _need_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = [head] if head is not None else list(range(probs.shape[0]))
    cols = 1 if len(heads) == 1 else min(4, len(heads))
    rows = -(-len(heads) // cols)
    T = len(tokens)
    size = max(3.0, 0.32 * T + 1.5)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[len(heads):]:
        ax.axis("off")
    for n, (ax, h) in enumerate(zip(axes.flat, heads)):
        im = ax.imshow(probs[h], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {layer}, head {h}")
        ax.set_xticks(range(T), tokens, rotation=90, fontsize=8)
        ax.set_yticks(range(T), tokens, fontsize=8)
        if n // cols == rows - 1 or n + cols >= len(heads):
            ax.set_xlabel("key")
        if n % cols == 0:
            ax.set_ylabel("query")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="attention probability")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def cmd_serve(args) -> int:
    from .serve import run

    run(args.model, args.host, args.port, args.max_batch_tokens, args.max_client_batch_size, args.auto_truncate,
        args.api_key, args.dtype, args.kernels)
    return 0


def cmd_inspect(args) -> int:
    from . import BertModel, BertTokenizer

    if args.attention_png:
        _need_matplotlib()  # before any work, not after printing everything
    model_dir = model_dir_with_config(args.model)
    tokenizer = BertTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir, dtype=args.dtype, kernels=args.kernels)
    c = model.config
    L, nH = c.num_hidden_layers, c.num_attention_heads
    layer = args.layer if args.layer is not None else L - 1
    if not -L <= layer < L:
        raise ValueError(f"--layer {layer} is out of range; the model has {L} layers (0 .. {L - 1})")
    layer %= L
    if args.head is not None and not 0 <= args.head < nH:
        raise ValueError(f"--head {args.head} is out of range; the model has {nH} heads (0 .. {nH - 1})")
    if args.head is not None and not args.attention_png:
        raise ValueError("--head selects the head to draw: give --attention-png FILE too")

    layers = None
    if args.layers is not None:
        bad = [i for i in args.layers if not -L <= i < L]
        if bad:
            raise ValueError(f"--layers {bad[0]} is out of range; the model has {L} layers (0 .. {L - 1})")
        layers = args.layers

    print("\n".join(tree_lines(model, "")))
    x = tokenizer(args.text, args.pair, truncation=True,
                  max_length=min(tokenizer.model_max_length, c.max_position_embeddings))
    out = model(**x, output_hidden_states=True, output_attentions=True)
    tokens = tokenizer.convert_ids_to_tokens(x["input_ids"][0])
    print(f"\ntokens ({len(tokens)}): " + " ".join(f"{t}({i})" for t, i in zip(tokens, x["input_ids"][0])))

    print(f"\nper layer: mean L2 norm of the hidden states over tokens; attention entropy per head "
          f"(nats, mean over queries; uniform over {len(tokens)} tokens = {np.log(len(tokens)):.3f})")
    print(f"{'layer':>9} {'norm':>8}  " + " ".join(f"{'h' + str(h):>6}" for h in range(nH)))
    for i, hs in enumerate(out.hidden_states):
        norm = float(np.linalg.norm(hs[0].astype(np.float64), axis=-1).mean())
        ent = " ".join(f"{e:6.3f}" for e in attention_entropy(out.attentions[i - 1])[0]) if i else ""
        print(f"{'emb' if i == 0 else i - 1:>9} {norm:8.3f}  {ent}")

    if args.pooler:
        if out.pooler_output is None:
            print("\npooler: this checkpoint has no pooler weights")
        else:
            cls_vec = out.last_hidden_state[0, 0].astype(np.float64)
            pooled = out.pooler_output[0].astype(np.float64)
            cos = float(cls_vec @ pooled / (np.linalg.norm(cls_vec) * np.linalg.norm(pooled)))
            print(f"\npooler_output = tanh(W·h_CLS + b) {pooled.shape}: {_fmt(pooled)}")
            print(f"h_CLS (last_hidden_state[0, 0]): {_fmt(cls_vec)}")
            print(f"cosine(h_CLS, pooler_output) = {cos:.4f}")

    if args.html:
        from .viz import attention_html

        with open(args.html, "w", encoding="utf-8") as f:
            f.write(attention_html(model, tokenizer, args.text, args.pair, layers))
        log.info("wrote %s (head, model and neuron views; open it in a browser)", args.html)
    if args.attention_png:
        plot_attention(args.attention_png, out.attentions[layer][0], tokens, layer, args.head)
        log.info("wrote %s (layer %d, %s)", args.attention_png, layer,
                 f"head {args.head}" if args.head is not None else f"all {nH} heads")
    return 0


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def _int_list(s: str) -> list:
    try:
        values = [int(p) for p in s.split(",") if p.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,3,5; got {s!r}")
    return values


def _nonneg_int(s: str) -> int:
    v = _int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


def _common(p, default_model: str, default_help: str):
    p.add_argument("--model", default=default_model, metavar="NAME_OR_PATH", help=default_help)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--kernels", choices=["numba", "numpy"], default="numba")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="threads for the Numba kernels and the BLAS library together (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minibert", description="BERT inference in NumPy and Numba.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"minibert {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("encode", help="run the model on texts and show its outputs",
                       description="Tokenize TEXTs, run BertModel, print tokens, shapes and a few values.")
    e.add_argument("texts", nargs="+", metavar="TEXT")
    e.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help=f"local directory or Hub repo id (default: {DEFAULT_MODEL}, its packaged copy if installed)")
    e.add_argument("--max-length", type=_positive_int, default=None, metavar="N",
                   help="truncate each text to N tokens (default: the model's limit)")
    e.add_argument("--output", default=None, metavar="FILE.npz",
                   help="write last_hidden_state, pooler_output, input_ids and attention_mask to a .npz")
    e.add_argument("--hidden-states", action="store_true", help="also compute (and save) every layer's hidden states")
    e.add_argument("--attentions", action="store_true", help="also compute (and save) every layer's attention maps")
    e.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    e.add_argument("--kernels", choices=["numba", "numpy"], default="numba")
    e.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="threads for the Numba kernels and the BLAS library together (default: all cores)")
    e.set_defaults(func=cmd_encode)

    f = sub.add_parser("fill-mask", help="predict the tokens at [MASK] with a masked-LM checkpoint",
                       description="Print the top-k tokens and their probabilities for each [MASK] in each TEXT.")
    f.add_argument("texts", nargs="+", metavar="TEXT")
    _common(f, FILL_MASK_MODEL, f"a BertForMaskedLM checkpoint (default: {FILL_MASK_MODEL})")
    f.add_argument("--top-k", type=_positive_int, default=5, metavar="K", help="tokens to show per mask (default 5)")
    f.set_defaults(func=cmd_fill_mask)

    ll = sub.add_parser("logit-lens", help="the [MASK] predictions of every layer (the MLM head on each hidden state)",
                        description="For each [MASK] in each TEXT, print a layer x top-k table: the tokens the "
                                    "masked-LM head predicts from each layer's hidden state, with probabilities.")
    ll.add_argument("texts", nargs="+", metavar="TEXT")
    _common(ll, FILL_MASK_MODEL, f"a BertForMaskedLM checkpoint (default: {FILL_MASK_MODEL})")
    ll.add_argument("--top-k", type=_positive_int, default=5, metavar="K", help="tokens per layer (default 5)")
    ll.set_defaults(func=cmd_logit_lens)

    c = sub.add_parser("classify", help="label texts with a sequence-classification checkpoint",
                       description="Print each TEXT's labels (config.id2label) with scores: softmax for "
                                   "single-label models, sigmoid for multi-label, the raw value for regression.")
    c.add_argument("texts", nargs="+", metavar="TEXT")
    _common(c, None, "a BertForSequenceClassification checkpoint: local directory or Hub repo id")
    c.add_argument("--top-k", type=_positive_int, default=None, metavar="K", help="show the K best labels (default all)")
    c.set_defaults(func=cmd_classify)

    em = sub.add_parser("embed", help="sentence embeddings (the checkpoint's own pooling and normalization)",
                        description="Embed TEXTs, or every line of --input FILE (plain text, one a line, or JSON "
                                    "Lines with a 'text' field), with SentenceEncoder; print them or save a .npy.")
    em.add_argument("texts", nargs="*", metavar="TEXT")
    em.add_argument("--input", default=None, metavar="FILE", help="texts to embed, one a line (.txt) or JSONL")
    em.add_argument("--encoding", default="utf-8", help="the --input file's text encoding (default: utf-8)")
    em.add_argument("--output", default=None, metavar="OUT.npy", help="save the float32 [N, H] embeddings")
    _common(em, None, f"local directory or Hub repo id (default: {DEFAULT_MODEL})")
    em.add_argument("--batch-size", type=_positive_int, default=32, metavar="N")
    em.add_argument("--pooling", choices=["mean", "cls", "max", "mean_sqrt_len"], default=None,
                    help="override the checkpoint's pooling")
    em.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                    help="L2-normalize (default: as the checkpoint says)")
    em.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    co = em.add_argument_group("a corpus of Parquet / JSONL files (with --text-column): --input a glob, a "
                               "directory or files, --output a directory; pip install 'minibert-numpy[dask]'")
    co.add_argument("--text-column", default=None, metavar="NAME", help="the column holding the texts")
    co.add_argument("--id-column", default=None, metavar="NAME", help="a column copied as the output's id "
                                                                       "(default: the row number)")
    co.add_argument("--engine", choices=["local", "dask"], default=None, help="this process (default) or Dask")
    co.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                    help="--engine dask: start a local cluster of N worker processes (default 2)")
    co.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT", help="--engine dask: join this cluster")
    co.add_argument("--overwrite", action="store_true", help="redo outputs that exist (default: skip them)")
    em.set_defaults(func=cmd_embed)

    si = sub.add_parser("similarity", help="cosine similarity matrix of the TEXTs' sentence embeddings",
                        description="Print the cosine similarity of every pair of TEXTs as a table.")
    si.add_argument("texts", nargs="+", metavar="TEXT")
    _common(si, None, f"local directory or Hub repo id (default: {DEFAULT_MODEL})")
    si.set_defaults(func=cmd_similarity)

    sv = sub.add_parser("serve", help="an embedding server: text-embeddings-inference's routes and OpenAI's /v1/embeddings",
                        description="Serve sentence embeddings over HTTP (POST /embed, /v1/embeddings, /tokenize; "
                                    "GET /health, /info, /metrics). Needs pip install 'minibert-numpy[serve]'.")
    sv.add_argument("--model", default=None, metavar="NAME_OR_PATH", help=f"default: {DEFAULT_MODEL}")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_positive_int, default=8080)
    sv.add_argument("--max-batch-tokens", type=_positive_int, default=16384, metavar="N",
                    help="tokens per model call, requests merged up to it (default 16384)")
    sv.add_argument("--max-client-batch-size", type=_positive_int, default=32, metavar="N",
                    help="inputs per request (default 32)")
    sv.add_argument("--auto-truncate", action=argparse.BooleanOptionalAction, default=False,
                    help="truncate inputs longer than the model's limit instead of answering 413")
    sv.add_argument("--api-key", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY'")
    sv.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    sv.add_argument("--kernels", choices=["numba", "numpy"], default="numba")
    sv.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                    help="threads for the Numba kernels and the BLAS library together (default: all cores)")
    sv.set_defaults(func=cmd_serve)

    ins = sub.add_parser("inspect", help="module tree, tokens, per-layer norms and attention entropies, attention maps",
                         description="Print the module tree with parameter counts and shapes, the tokens of TEXT, "
                                     "and per layer the hidden-state norm and each head's attention entropy.")
    ins.add_argument("text", metavar="TEXT")
    _common(ins, None, f"local directory or Hub repo id (default: {DEFAULT_MODEL})")
    ins.add_argument("--attention-png", default=None, metavar="FILE.png",
                     help="draw the attention map of --layer (all heads, or --head) with token labels (needs matplotlib)")
    ins.add_argument("--layer", type=_int, default=None, metavar="L", help="layer to draw (default: the last; -1 works)")
    ins.add_argument("--head", type=_nonneg_int, default=None, metavar="H", help="one head to draw (default: all)")
    ins.add_argument("--pooler", action="store_true", help="show pooler_output and its cosine with the [CLS] vector")
    ins.add_argument("--pair", default=None, metavar="TEXT_B", help="a second text: TEXT and TEXT_B as a sentence pair")
    ins.add_argument("--html", default=None, metavar="FILE.html",
                     help="write the attention viewer (head, model and neuron views) as one self-contained HTML file")
    ins.add_argument("--layers", type=_int_list, default=None, metavar="L,L,...",
                     help="the layers the HTML file holds (default all)")
    ins.set_defaults(func=cmd_inspect)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="minibert: %(message)s", stream=sys.stderr)
    try:
        if getattr(args, "threads", None) is not None:
            from .runtime import set_num_threads

            set_num_threads(args.threads)
            log.info("threads: %d (Numba and BLAS)", args.threads)
        if getattr(args, "dtype", None) and getattr(args, "kernels", "numba") == "numba":
            from .kernels import compiled

            if not compiled(args.dtype):
                log.info("compiling minibert's %s kernels for this CPU: about 15-30 s, once (later runs load "
                         "them from Numba's cache)", args.dtype)
        return args.func(args)
    except (ValueError, TypeError, OSError, NotImplementedError, RuntimeError) as e:
        print(f"minibert: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

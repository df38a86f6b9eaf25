"""The ``minibert`` command. Results go to stdout; progress and log lines to stderr."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import List, Optional

import numpy as np

from .hub import DEFAULT_MODEL

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
    from .hub import resolve_model_dir

    t0 = time.perf_counter()
    model_dir = resolve_model_dir(args.model)
    tokenizer = BertTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir, dtype=args.dtype, kernels=args.kernels)
    log.info("loaded %s from %s in %.2f s", args.model or DEFAULT_MODEL, model_dir, time.perf_counter() - t0)

    limit = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    max_length = args.max_length or limit
    if max_length > model.config.max_position_embeddings:
        raise ValueError(f"--max-length {max_length} exceeds the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
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

    from .hub import resolve_model_dir
    from .tokenizer import BertTokenizer

    t0 = time.perf_counter()
    model_dir = resolve_model_dir(model)
    tokenizer = BertTokenizer.from_pretrained(model_dir)
    m = getattr(minibert, cls_name).from_pretrained(model_dir, dtype=args.dtype, kernels=args.kernels)
    log.info("loaded %s %s from %s in %.2f s", cls_name, model or DEFAULT_MODEL, model_dir, time.perf_counter() - t0)
    return tokenizer, m


def _softmax(x, axis=-1):  # in float64: probabilities that sum to 1 to print precision
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def cmd_fill_mask(args) -> int:
    tokenizer, model = _load_task("BertForMaskedLM", args.model, args)
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


def _common(p, default_model: str, default_help: str):
    p.add_argument("--model", default=default_model, metavar="NAME_OR_PATH", help=default_help)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--kernels", choices=["numba", "numpy"], default="numba")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minibert", description="BERT inference in NumPy and Numba.")
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
    e.set_defaults(func=cmd_encode)

    f = sub.add_parser("fill-mask", help="predict the tokens at [MASK] with a masked-LM checkpoint",
                       description="Print the top-k tokens and their probabilities for each [MASK] in each TEXT.")
    f.add_argument("texts", nargs="+", metavar="TEXT")
    _common(f, FILL_MASK_MODEL, f"a BertForMaskedLM checkpoint (default: {FILL_MASK_MODEL})")
    f.add_argument("--top-k", type=_positive_int, default=5, metavar="K", help="tokens to show per mask (default 5)")
    f.set_defaults(func=cmd_fill_mask)

    c = sub.add_parser("classify", help="label texts with a sequence-classification checkpoint",
                       description="Print each TEXT's labels (config.id2label) with scores: softmax for "
                                   "single-label models, sigmoid for multi-label, the raw value for regression.")
    c.add_argument("texts", nargs="+", metavar="TEXT")
    _common(c, None, "a BertForSequenceClassification checkpoint: local directory or Hub repo id")
    c.add_argument("--top-k", type=_positive_int, default=None, metavar="K", help="show the K best labels (default all)")
    c.set_defaults(func=cmd_classify)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="minibert: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        print(f"minibert: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

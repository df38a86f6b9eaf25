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

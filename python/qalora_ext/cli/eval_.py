"""``qalora eval``: perplexity on held-out text (module named ``eval_``: ``eval`` is a builtin)."""

from __future__ import annotations

import argparse

from . import common

NAME = "eval"
HELP = "perplexity on held-out text"
DESCRIPTION = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model_arg(p)
    common.add_adapter_arg(p)
    p.add_argument("--data", metavar="PATH", default=None,
                   help="a text file to evaluate on (default: the held-out part of Python's pydoc topics)")
    common.add_eval_args(p)


def run(args: argparse.Namespace) -> int:
    from ..training import data

    lm, tokenizer, folder = common.load_model(args.model, args.adapter)
    text = None
    if args.data:
        with open(args.data, encoding="utf-8") as f:
            text = f.read()
    ppl = data.heldout_perplexity(lm, tokenizer, text, num_windows=args.windows, window=args.window)
    src = args.data or "held-out part of the default corpus (Python's pydoc topics)"
    print(f"[qalora] perplexity {ppl:.3f}  ({folder}: {common.describe(lm)}; {args.windows} windows x "
          f"{args.window} tokens of {src})")
    return 0

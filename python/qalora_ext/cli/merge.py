"""``qalora merge``: trained adapters folded into the zeros, a plain INT2/3/4 model."""

from __future__ import annotations

import argparse
import sys

from . import common

NAME = "merge"
HELP = "fold trained adapters into the zeros: a plain INT2/3/4 model"
DESCRIPTION = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH", help="a folder written by `qalora finetune`, or a "
                   "quantized folder with --adapter")
    common.add_adapter_arg(p, "an adapter folder (save_adapter) to load first")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.quantized import save_model
    from ..model import merge_adapters

    common.refuse_overwriting_input(args.out, args.model, args.adapter)
    lm, tokenizer, folder = common.load_model(args.model, args.adapter)
    if not common.has_adapters(lm):
        print(f"[qalora] error: {folder} has no adapters to merge (pass --adapter DIR, or a folder written by "
              f"`qalora finetune`)", file=sys.stderr)
        return 2
    report = merge_adapters(lm)
    out = save_model(lm, tokenizer, args.out)
    lost = max(report.values())
    print(f"[qalora] merged {len(report)} adapters into the zeros ({common.describe(lm)}); largest fraction of an "
          f"adapter lost to zero rounding: {lost:.2e}; written to {out}")
    return 0

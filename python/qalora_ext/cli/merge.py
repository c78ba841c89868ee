"""``qalora merge``: trained adapters (and trained scales / zeros) folded into the stored scales and zeros,
a plain INT2/3/4 model with the same codes."""

from __future__ import annotations

import argparse
import sys

from . import common

NAME = "merge"
HELP = "fold trained adapters (and trained scales/zeros) into the stored scales and zeros: a plain INT2/3/4 model"
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
    from ..nn import QALoRALinear

    layers = [m for m in lm.modules() if isinstance(m, QALoRALinear)]
    trained = [what for what, on in (("adapters", any(m.rank for m in layers)),
                                     ("scales", any(m.train_scale for m in layers)),
                                     ("zeros", any(m.train_zero for m in layers))) if on]
    report = merge_adapters(lm)
    out = save_model(lm, tokenizer, args.out)
    lost = max(report.values())
    worst = max(report, key=report.get)
    print(f"[qalora] merged {len(report)} layers' trained {', '.join(trained)} into the stored scales and zeros "
          f"({common.describe(lm)}); lost to storage rounding: largest {lost:.2e} of a layer's trained change "
          f"({worst}); written to {out}")
    return 0

"""``qalora quantize``: a float model to INT2/3/4, saved with its tokenizer."""

from __future__ import annotations

import argparse

from . import common

NAME = "quantize"
HELP = "quantize a float model to INT2/3/4 and save it"
DESCRIPTION = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model_arg(p, "float model to quantize")
    common.add_quant_args(p)
    p.add_argument("--seed", type=int, default=0, help="GPTQ calibration sample seed")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")


def run(args: argparse.Namespace) -> int:
    from .. import loading
    from ..checkpoint.quantized import save_model

    folder = loading.resolve_model(args.model)
    common.refuse_overwriting_input(args.out, folder, args.model)
    lm, tokenizer, folder = loading.quantize(folder, **common.quant_options(args), seed=args.seed)
    out = save_model(lm, tokenizer, args.out)
    print(f"[qalora] {folder} -> {common.describe(lm)}; written to {out}")
    return 0

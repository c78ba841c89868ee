"""``qalora bench``: a whole model's prefill and decode speed, float vs packed, in one process.

Both models see the same prompt; each measurement is warmed up once and the
median of ``--repeats`` runs is reported, with the packed/float ratio (this
is a noisy, shared machine: ratios mean more than absolute times). The
kernel-level benchmarks are in the repository's ``bench/`` folder.

The measurement is :func:`qalora_ext.generation.bench_model`; this module is
the command: its arguments in, the table out.
"""

from __future__ import annotations

import argparse
from ..generation import bench_model
from . import common

NAME = "bench"
HELP = "prefill and decode speed: float model vs packed model, side by side"
DESCRIPTION = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model_arg(p, "float model")
    # Not the quantization group: the packed copy is made in memory by RTN (quantize_model), so --method and the
    # storage dtypes do not apply, and the default is 4 bits.
    p.add_argument("--bits", type=int, choices=(2, 3, 4), default=4, help="default 4")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=32, help="default 32")
    p.add_argument("--prompt-len", type=int, default=256, help="prefill tokens (default 256)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default 3)")
    p.add_argument("--int8-activations", action="store_true",
                   help="also time the packed model with int8 activations")


def run(args: argparse.Namespace) -> int:
    result = bench_model(args.model, bits=args.bits, group_size=args.group_size, prompt_len=args.prompt_len,
                         new_tokens=args.new_tokens, repeats=args.repeats, int8_activations=args.int8_activations)
    print(result.table())
    return 0

"""``qalora demo``: the main job end to end, each phase timed (the job itself: :func:`qalora_ext.demo.run_demo`)."""

from __future__ import annotations

import argparse

from ..demo import DEFAULT_PROMPT, run_demo
from ..training.precision import AUTOCAST_CHOICES
from . import common

NAME = "demo"
HELP = "the whole job, timed: quantize, fine-tune, merge, evaluate, generate"
DESCRIPTION = ("Quantize SmolLM2 (or --model; GPTQ by default, calibrated on the training text), measure held-out "
               "perplexity, fine-tune (by default the layers' own per-group scales and zeros from the residual-fit "
               "start, the setting that measured best; --rank 16 --no-train-scales --no-train-zeros --init zero is "
               "QA-LoRA as in the paper), merge into the stored scales and zeros (the codes stay), save, reload, "
               "measure again and generate. Prints the time of each phase.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model_arg(p)
    common.add_quant_args(p, method="gptq")
    p.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    p.add_argument("--batch-size", type=int, default=4, help="default 4")
    p.add_argument("--seq-len", type=int, default=256, help="default 256")
    p.add_argument("--rank", type=int, default=0,
                   help="adapter rank (default 0: no adapter, the layers' own scales and zeros train; 16 is "
                        "QA-LoRA's usual rank)")
    p.add_argument("--alpha", type=float, default=16, help="default 16")
    p.add_argument("--lr", type=float, default=1e-3, help="default 1e-3")
    common.add_trainable_quant_args(p)
    common.add_init_arg(p, note="; the demo keeps the float model it measured for this (released before training)",
                        default="residual")
    # The demo's defaults are the setting that measured best on validation text (bench/results/paper_table.md,
    # INT3 G32): learned scales and zeros, no adapter, from the residual-fit start. QA-LoRA as in the paper:
    # --rank 16 --no-train-scales --no-train-zeros --init zero --lr 1e-2.
    p.set_defaults(train_scales=True, train_zeros=True)
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="auto",
                   help="fine-tune precision: bf16 autocast (adapters and optimizer state stay float32), none "
                        "(float32), or auto (default): bf16 when the CPU has bf16 units (AVX512-BF16 or AMX)")
    # Half of `qalora eval`'s windows: the demo measures perplexity three times (source, quantized, merged) and
    # is meant to finish in minutes on a laptop CPU.
    common.add_eval_args(p, windows=8)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt of the sample generation")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="where the merged model goes (default runs/demo)")


def run(args: argparse.Namespace) -> int:
    common.refuse_overwriting_input(args.out, args.model)
    common.check_rank(args.rank, args.train_scales, args.train_zeros)
    run_demo(args.model, **common.quant_options(args), steps=args.steps, batch_size=args.batch_size,
             seq_len=args.seq_len, rank=args.rank, alpha=args.alpha, lr=args.lr, seed=args.seed,
             train_scale=bool(args.train_scales), train_zero=bool(args.train_zeros), quant_lr=args.quant_lr,
             init=args.init, windows=args.windows, window=args.window, prompt=args.prompt, out=args.out,
             autocast=args.autocast)
    return 0

"""``qalora import``: a GPTQ checkpoint or a PEFT QA-LoRA adapter into qalora_ext's format.

(Module named ``import_``: ``import`` is a Python keyword.)
"""

from __future__ import annotations

import argparse

from . import common

NAME = "import"
HELP = "take in a GPTQ checkpoint or a PEFT QA-LoRA adapter"
DESCRIPTION = ("gptq: an AutoGPTQ / GPTQModel folder (2/3/4 bits, groups 32/64/128, contiguous or static act-order "
               "groups) becomes a qalora_ext folder whose weights equal the GPTQ dequantization bit for bit. "
               "peft-qalora: a PEFT adapter trained with use_qalora on the quantized --model becomes a qalora_ext "
               "adapter (SPEC's mean pooling).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", required=True, choices=("gptq", "peft-qalora"))
    p.add_argument("src", metavar="SRC", help="the GPTQ model folder, or the PEFT adapter folder")
    p.add_argument("--model", metavar="PATH", default=None,
                   help="peft-qalora: the quantized model (a qalora_ext folder) the adapter belongs to")
    p.add_argument("--full-model", action="store_true",
                   help="peft-qalora: write the whole model with its adapters, not only the adapter")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")


def run(args: argparse.Namespace) -> int:
    common.refuse_other_format(args.format, {"--model": ("peft-qalora", args.model),
                                             "--full-model": ("peft-qalora", args.full_model)})
    common.refuse_overwriting_input(args.out, args.src, args.model)
    if args.format == "gptq":
        return _import_gptq(args.src, args.out)
    return _import_peft_qalora(args.src, args.model, args.out, args.full_model)


def _import_gptq(src: str, out: str) -> int:
    from ..interop.gptq_import import convert_gptq

    report = convert_gptq(src, out, progress=True)
    kinds = sorted({(v["bits"], v["group_size"]) for v in report["layers"].values()})
    print(f"[qalora] imported the GPTQ checkpoint {src} ({len(report['layers'])} packed layers, "
          f"{', '.join(f'{b} bits G{g}' for b, g in kinds)}, {report['convention']} zeros as float32): "
          f"written to {report['output']}")
    return 0


def _import_peft_qalora(src: str, model, out: str, full_model: bool) -> int:
    if model is None:
        raise ValueError("--format peft-qalora needs --model: the quantized model (a qalora_ext folder) the adapter "
                         "was trained on")
    from ..interop.peft_import import convert_peft_qalora

    report = convert_peft_qalora(src, model, out, save_model=full_model)
    what = "the model with its adapters" if full_model else "the adapter (load it with --adapter)"
    print(f"[qalora] imported the PEFT QA-LoRA adapter {src} onto {model} "
          f"({len(report['layers'])} layers; lora_A scaled by L = K / G to the mean-pooling convention): "
          f"{what} written to {report['output']}")
    return 0

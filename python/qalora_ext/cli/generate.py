"""``qalora generate``: chat with a model, one prompt or messages from standard input."""

from __future__ import annotations

import argparse
import sys

from . import common

NAME = "generate"
HELP = "chat with a model (packed layers run on qalora's kernels)"
DESCRIPTION = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model_arg(p)
    common.add_adapter_arg(p)
    p.add_argument("--prompt", default=None, help="one message; without it, read messages from standard input")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=64, help="default 64")
    p.add_argument("--temperature", type=common.non_negative_float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--int8-activations", action="store_true",
                   help="quantize activations to int8 in the packed layers (faster decode on CPUs with AVX-512 "
                        "VNNI; changes the numerics slightly)")


def run(args: argparse.Namespace) -> int:
    from .. import generation

    lm, tokenizer, folder = common.load_model(args.model, args.adapter, args.int8_activations)
    print(f"[qalora] {folder}: {common.describe(lm)}", file=sys.stderr)

    def reply(prompt: str) -> str:
        return generation.generate(lm, tokenizer, prompt, args.max_new_tokens, args.temperature,
                                   use_chat_template=not args.no_chat_template, seed=args.seed)

    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty; give the model something to answer")
        print(reply(args.prompt))
        return 0
    print("[qalora] chat: type a message and press Enter (empty line or Ctrl-D ends)", file=sys.stderr)
    try:
        for line in sys.stdin:
            if not line.strip():
                break
            print(reply(line.strip()), flush=True)
    except UnicodeDecodeError as e:
        raise ValueError(f"standard input is not text ({e.reason} at byte {e.start}); pipe text messages, "
                         f"one per line") from None
    return 0

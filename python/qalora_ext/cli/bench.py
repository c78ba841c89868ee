"""``qalora bench``: a whole model's prefill and decode speed, float vs packed, in one process.

Both models see the same prompt; each measurement is warmed up once and the
median of ``--repeats`` runs is reported, with the packed/float ratio (this
is a noisy, shared machine: ratios mean more than absolute times). The
kernel-level benchmarks are in the repository's ``bench/`` folder.

:func:`bench_model` measures and returns a :class:`ModelBench` (callable from
Python); :func:`run` is the command: its arguments in, the table out.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from . import common

__all__ = ["bench_model", "ModelBench"]

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


@dataclass
class ModelBench:
    """What :func:`bench_model` measured; ``rows``: ``(weights, prefill s, decode s per token)``, float first."""

    model_name: str
    threads: int
    prompt_len: int
    new_tokens: int
    repeats: int
    rows: list = field(default_factory=list)

    def table(self) -> str:
        """The table and the packed / float ratios, as ``qalora bench`` prints them."""
        lines = [f"model {self.model_name}, {self.threads} threads, prompt {self.prompt_len} tokens, "
                 f"{self.new_tokens} decoded tokens, median of {self.repeats}",
                 f"{'weights':<12} {'prefill ms':>11} {'decode ms/token':>16} {'decode tokens/s':>16}"]
        for name, tp, td in self.rows:
            lines.append(f"{name:<12} {1e3 * tp:11.1f} {1e3 * td:16.2f} {1 / max(td, 1e-9):16.1f}")
        (_, fp, fd), (_, qp, qd) = self.rows[:2]
        lines.append(f"packed / float time: prefill {qp / fp:.2f}x, decode {qd / fd:.2f}x")
        if len(self.rows) > 2:
            _, ip, idd = self.rows[2]
            lines.append(f"int8-activation packed / float time: prefill {ip / fp:.2f}x, decode {idd / fd:.2f}x")
        return "\n".join(lines)


def bench_model(model: Optional[str] = None, *, bits: int = 4, group_size: int = 32, prompt_len: int = 256,
                new_tokens: int = 32, repeats: int = 3, int8_activations: bool = False) -> ModelBench:
    """Time a FLOAT model (default: SmolLM2) and its packed RTN copy on the same random prompt.

    With ``int8_activations`` the packed copy is timed a second time with
    int8 activations. Raises ValueError for a model that is already quantized.
    """
    import copy

    import torch

    from .. import loading
    from ..generation import time_prefill_decode
    from ..model import quantize_model, set_int8_activations

    folder = loading.resolve_model(model)
    if loading.is_quantized_checkpoint(folder):
        raise ValueError(f"{folder} is already quantized; `qalora bench` compares a FLOAT model with its packed copy")
    source, tokenizer, _ = loading.load_model(folder)
    packed = quantize_model(copy.deepcopy(source), bits=bits, group_size=group_size, progress=False)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, tokenizer.vocab_size, (1, prompt_len), generator=g)
    result = ModelBench(folder.name, torch.get_num_threads(), prompt_len, new_tokens, repeats)
    for name, lm in (("float32", source), (f"INT{bits} G{group_size}", packed)):
        result.rows.append((name, *time_prefill_decode(lm, prompt, new_tokens, repeats)))
    if int8_activations:
        set_int8_activations(packed)
        result.rows.append((f"INT{bits} i8act", *time_prefill_decode(packed, prompt, new_tokens, repeats)))
    return result

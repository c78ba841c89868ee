"""``qalora bench``: a whole model's prefill and decode speed, float vs packed, in one process.

Both models see the same prompt; each measurement is warmed up once and the
median of ``--repeats`` runs is reported, with the packed/float ratio (this
is a noisy, shared machine: ratios mean more than absolute times). The
kernel-level benchmarks are in the repository's ``bench/`` folder.
"""

from __future__ import annotations

import copy

import torch

__all__ = ["run_model_bench"]


def run_model_bench(args) -> None:
    from .. import loading
    from ..generation import time_prefill_decode
    from ..model import quantize_model, set_int8_activations

    folder = loading.resolve_model(args.model)
    if loading.is_quantized_checkpoint(folder):
        raise ValueError(f"{folder} is already quantized; `qalora bench` compares a FLOAT model with its packed copy")
    source, tokenizer, _ = loading.load_model(folder)
    packed = quantize_model(copy.deepcopy(source), bits=args.bits, group_size=args.group_size, progress=False)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, tokenizer.vocab_size, (1, args.prompt_len), generator=g)
    rows = []
    for name, model in (("float32", source), (f"INT{args.bits} G{args.group_size}", packed)):
        rows.append((name, *time_prefill_decode(model, prompt, args.new_tokens, args.repeats)))
    if getattr(args, "int8_activations", False):
        set_int8_activations(packed)
        rows.append((f"INT{args.bits} i8act", *time_prefill_decode(packed, prompt, args.new_tokens, args.repeats)))
    print(f"model {folder.name}, {torch.get_num_threads()} threads, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} decoded tokens, median of {args.repeats}")
    print(f"{'weights':<12} {'prefill ms':>11} {'decode ms/token':>16} {'decode tokens/s':>16}")
    for name, tp, td in rows:
        print(f"{name:<12} {1e3 * tp:11.1f} {1e3 * td:16.2f} {1 / max(td, 1e-9):16.1f}")
    (_, fp, fd), (_, qp, qd) = rows[:2]
    print(f"packed / float time: prefill {qp / fp:.2f}x, decode {qd / fd:.2f}x")
    if len(rows) > 2:
        _, ip, idd = rows[2]
        print(f"int8-activation packed / float time: prefill {ip / fp:.2f}x, decode {idd / fd:.2f}x")

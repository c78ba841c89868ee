"""``qalora demo``: the main job end to end, each phase timed.

Default: SmolLM2-135M-Instruct, INT3 with groups of 32 (at INT4 G32 the
quantized model IS the source: its projections come from GGUF Q4_1, which is
that format), RTN base, 40 steps of QA-LoRA on the training part of Python's
documentation, merged into the zeros, saved, reloaded from disk, evaluated on
the held-out part and asked a question.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

__all__ = ["run_demo", "Phases"]


@dataclass
class Phases:
    """Prints each phase as it starts and ends, and keeps its wall time."""

    times: dict = field(default_factory=dict)
    verbose: bool = True

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.verbose:
            print(f"[qalora] {name} ...", flush=True)
        t0 = time.perf_counter()
        yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        if self.verbose:
            print(f"[qalora] {name}: done in {self.times[name]:.1f} s", flush=True)

    def table(self) -> str:
        width = max((len(k) for k in self.times), default=5)
        rows = [f"  {k:<{width}}  {v:7.1f} s" for k, v in self.times.items()]
        rows.append(f"  {'total':<{width}}  {sum(self.times.values()):7.1f} s")
        return "\n".join(rows)




def run_demo(args) -> int:
    from .. import build_info
    from ..training import data
    from .. import loading
    from .. import generation
    from ..checkpoint.quantized import save_model
    from ..training import finetune
    from ..checkpoint import load_quantized
    from ..model import add_adapters, merge_adapters

    t_start = time.perf_counter()
    phases = Phases()
    info = build_info()
    print(f"[qalora] qalora_ext {info['version']}, torch {info['torch']}, CPU kernels {info['cpu_isa_active']}, "
          f"{torch.get_num_threads()} threads")
    label = f"INT{args.bits} G{args.group_size} ({args.method.upper()})"
    eval_kw = dict(num_windows=args.windows, window=args.window)

    with phases("load source model"):
        folder = loading.resolve_model(args.model)
        source, tokenizer, _ = loading.load_model(folder)
        train_text, heldout_text = data.default_corpus_split()
    with phases("perplexity: source"):
        ppl_source = data.heldout_perplexity(source, tokenizer, heldout_text, **eval_kw)
    print(f"[qalora]   source perplexity {ppl_source:.2f}")
    del source
    gc.collect()

    with phases(f"quantize {label}"):
        model, _, _ = loading.quantize(folder, args.bits, args.group_size, args.method,
                                        getattr(torch, args.scale_dtype), getattr(torch, args.zero_dtype),
                                        calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                                        calib_text=train_text, seed=args.seed)
    with phases("perplexity: quantized"):
        ppl_quant = data.heldout_perplexity(model, tokenizer, heldout_text, **eval_kw)
    print(f"[qalora]   quantized perplexity {ppl_quant:.2f}")

    with phases(f"fine-tune ({args.steps} steps x {args.batch_size} x {args.seq_len} tokens)"):
        torch.manual_seed(args.seed)
        add_adapters(model, rank=args.rank, alpha=args.alpha)
        dataset = data.load_training_data(None, tokenizer, args.seq_len)
        result = finetune.finetune(model, dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                seed=args.seed, output_dir=None, progress=True, loss_plot=False)
    print(f"[qalora]   loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, "
          f"{result.tokens_per_second:.0f} tokens/s")

    with phases("merge and save"):
        report = merge_adapters(model)
        out = save_model(model, tokenizer, args.out)
    lost = max(report.values())
    print(f"[qalora]   {len(report)} adapters merged; largest fraction lost to zero rounding {lost:.1e}; "
          f"written to {out}")
    del model
    gc.collect()

    with phases("reload merged model"):
        merged = load_quantized(out)
    with phases("perplexity: fine-tuned, merged"):
        ppl_merged = data.heldout_perplexity(merged, tokenizer, heldout_text, **eval_kw)
    print(f"[qalora]   merged perplexity {ppl_merged:.2f}")

    with phases("generate"):
        reply = generation.generate(merged, tokenizer, args.prompt, max_new_tokens=48)

    total = time.perf_counter() - t_start
    gap = (ppl_quant - ppl_merged) / max(ppl_quant - ppl_source, 1e-9)
    print()
    print("=" * 72)
    print(f"QA-LoRA demo: {folder.name}, {label}, rank {args.rank}, {args.steps} steps")
    print(f"  held-out perplexity ({args.windows} windows x {args.window} tokens of Python's pydoc topics):")
    print(f"    source (float)            {ppl_source:10.2f}")
    print(f"    quantized {label:<16}{ppl_quant:10.2f}")
    print(f"    fine-tuned, merged        {ppl_merged:10.2f}   "
          + (f"({100 * gap:.0f}% of the quantization gap closed)" if math.isfinite(gap) else ""))
    print(f"  adapter lost to zero rounding at merge: {lost:.1e} (largest layer)")
    print(f"  merged INT{args.bits} model: {out}  (qalora_ext.load_quantized or `qalora generate --model {out}`)")
    print(f"  prompt: {args.prompt}")
    print(f"  reply:  {reply}")
    print("  time per phase:")
    print(phases.table())
    print(f"  wall time {total:.1f} s")
    print("=" * 72)
    sys.stdout.flush()
    return 0

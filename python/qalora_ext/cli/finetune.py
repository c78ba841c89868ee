"""``qalora finetune``: train QA-LoRA adapters on a quantized model (quantized first when given a float one)."""

from __future__ import annotations

import argparse
import os

from ..training.precision import AUTOCAST_CHOICES
from . import common

NAME = "finetune"
HELP = "train QA-LoRA adapters on a quantized model"
DESCRIPTION = ("Train QA-LoRA adapters (and, with --train-scales / --train-zeros, the quantized layers' own per-group "
               "scales and zeros; --rank 0 trains those alone). --model may be a quantized folder (from `qalora "
               "quantize`) or a float model, quantized first with the quantization options (GPTQ by default, "
               "calibrated on the --data text file or the default corpus's training part). --init residual starts "
               "the trained quantities at the least-squares fit of the quantization error instead of zero (float "
               "--model only). Runs under `torchrun --nproc-per-node N` for data-parallel training (only the "
               "trained parameters are synchronised).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model_arg(p, "quantized folder or float model")
    common.add_quant_args(p, " (only when --model is a float model)", method="gptq")
    _add_data_args(p.add_argument_group("data"))
    _add_training_args(p.add_argument_group("training"))
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: the model with its adapters, checkpoints, loss.png")


def _add_data_args(d) -> None:
    d.add_argument("--data", metavar="PATH", default=None,
                   help="a text file, or a .jsonl file of instruction/response pairs (formatted with the model's "
                        "chat template; loss on the response only); default: the training part of Python's "
                        "documentation (pydoc topics)")
    d.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default 256)")
    d.add_argument("--max-examples", type=int, default=None, help="use at most this many sequences")


def _add_training_args(t) -> None:
    # None = not given: a resumed run takes the checkpoint's values, and a given one must agree with them.
    t.add_argument("--rank", type=int, default=None,
                   help="adapter rank r (default 16); 0: no adapter, with --train-scales and/or --train-zeros")
    t.add_argument("--alpha", type=float, default=None, help="adapter alpha; scaling = alpha / r (default 16)")
    t.add_argument("--dropout", type=float, default=None, help="dropout on the pooled input (default 0)")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    common.add_trainable_quant_args(t)
    common.add_init_arg(t, note=". Only with a float --model (a quantized folder no longer holds the float weights "
                                "to fit to); a --resume that finds a checkpoint continues from its trained state "
                                "and skips the fit")
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
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the packed model, adapters and optimizer state over the ranks with "
                        "FSDP2 (each rank reads only its rows of a quantized --model folder); writes the adapter, "
                        "not the model, to --out")
    t.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="auto",
                   help="bf16: packed layers, attention and the head under bfloat16 autocast (adapters and "
                        "optimizer state stay float32); none: the model's dtype (float32); auto (default): bf16 on "
                        "cuda and on CPUs with bf16 units (AVX512-BF16 or AMX), else none")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.quantized import save_model
    from ..training import data, finetune, precision

    common.refuse_overwriting_input(args.out, args.model, args.data)
    _adapter_settings(args)
    _init_settings(args)
    device = training_device(args.device)
    autocast = precision.resolve_autocast(args.autocast, device)
    if args.fsdp:
        return _run_fsdp(args, device, autocast)
    from .. import loading

    # The data first: a bad --data file is reported before minutes of quantization.
    tokenizer = loading.load_tokenizer(loading.resolve_model(args.model))
    dataset = data.load_training_data(args.data, tokenizer, args.seq_len, max_examples=args.max_examples)
    lm, tokenizer = _training_model(args, len(dataset) * args.seq_len, device)
    lm.to(device)
    result = finetune.finetune(
        lm, dataset, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        warmup_steps=args.warmup_steps, gradient_checkpointing=args.gradient_checkpointing, output_dir=args.out,
        save_every=args.save_every, resume=args.resume, seed=args.seed, progress=True, loss_plot=True,
        autocast=autocast, quant_lr=args.quant_lr)
    lm.to("cpu")
    if common.rank() == 0:
        out = save_model(lm, tokenizer, args.out)
        last = result.losses[-1] if result.losses else float("nan")
        print(f"[qalora] trained {result.steps_done} steps ({'bf16 autocast' if autocast else 'float32'}), "
              f"final loss {last:.4f}, {result.tokens_per_second:.0f} tokens/s; model with adapters written to {out}"
              + (f"; loss curve {result.plot_path}" if result.plot_path else ""))
    return 0


def _run_fsdp(args: argparse.Namespace, device, autocast) -> int:
    """`--fsdp`: the process group first, then a sharded load (no rank holds the whole model), train, save the adapter."""
    import torch.distributed as dist

    from .. import loading
    from ..checkpoint import save_adapter
    from ..training import data, finetune, fsdp

    folder = loading.resolve_model(args.model)
    if not loading.is_quantized_checkpoint(folder):
        raise ValueError(f"--fsdp loads a quantized folder shard by shard; {args.model} is a float model: quantize it "
                         f"first (qalora quantize --model {args.model} --out DIR)")
    created = not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if created:
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        if not dist.is_initialized():
            print("[qalora] --fsdp with one process: training unsharded", flush=True)
            return run(argparse.Namespace(**{**vars(args), "fsdp": False}))
        tokenizer = loading.load_tokenizer(folder)
        lm = fsdp.load_quantized_sharded(folder, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                                         seed=args.seed, device=device, train_scale=args.train_scales,
                                         train_zero=args.train_zeros)
        held, total = fsdp.resident_packed_bytes(lm)
        print(f"[qalora] FSDP2 rank {dist.get_rank()}: holds {held} of the model's {total} packed bytes "
              f"({held / max(total, 1):.3f})", flush=True)
        dataset = data.load_training_data(args.data, tokenizer, args.seq_len, max_examples=args.max_examples)
        result = finetune.finetune(
            lm, dataset, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
            warmup_steps=args.warmup_steps, gradient_checkpointing=args.gradient_checkpointing,
            output_dir=args.out, save_every=args.save_every, resume=args.resume, seed=args.seed, progress=True,
            loss_plot=True, autocast=autocast, fsdp=True, quant_lr=args.quant_lr)
        with fsdp.full_adapters(lm):
            if dist.get_rank() == 0:
                out = save_adapter(lm, args.out)
                last = result.losses[-1] if result.losses else float("nan")
                print(f"[qalora] trained {result.steps_done} steps with FSDP2 on {dist.get_world_size()} ranks, "
                      f"final loss {last:.4f}, {result.tokens_per_second:.0f} tokens/s; adapter written to {out} "
                      f"(base: {folder})", flush=True)
        dist.barrier()
        return 0
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


_ADAPTER_DEFAULTS = {"rank": 16, "alpha": 16.0, "dropout": 0.0}
# The checkpoint's adapter_config.json keys of --train-scales / --train-zeros.
_FLAG_KEYS = {"train_scales": "train_scale", "train_zeros": "train_zero"}


def _adapter_settings(args: argparse.Namespace) -> None:
    """Fill --rank/--alpha/--dropout/--train-scales/--train-zeros: the checkpoint's when resuming (a given flag
    must agree), else the defaults; then --rank 0 needs one of the two."""
    from ..checkpoint import ADAPTER_CONFIG_NAME
    from ..checkpoint.files import read_json
    from ..training.finetune import latest_checkpoint

    saved = {}
    ckpt = latest_checkpoint(args.out) if args.resume else None
    if ckpt is not None:
        cfg = read_json(ckpt / ADAPTER_CONFIG_NAME, ADAPTER_CONFIG_NAME)
        saved = {k: cfg.get(k) for k in _ADAPTER_DEFAULTS if cfg.get(k) is not None}
    for key, default in _ADAPTER_DEFAULTS.items():
        given = getattr(args, key)
        if given is not None and key in saved and float(given) != float(saved[key]):
            raise ValueError(f"--{key} {given} contradicts the checkpoint being resumed ({ckpt}: {key} "
                             f"{saved[key]}); drop --{key}, or start a new --out")
        if given is None:
            setattr(args, key, saved.get(key, default))
    for flag, key in _FLAG_KEYS.items():
        saved_value = cfg.get(key) if ckpt is not None else None
        saved_value = bool(saved_value) if ckpt is not None else None  # absent from older checkpoints: off
        given = getattr(args, flag)
        if given is not None and saved_value is not None and given != saved_value:
            raise ValueError(f"--{flag.replace('_', '-')} contradicts the checkpoint being resumed ({ckpt}: "
                             f"{key} {saved_value}); drop it, or start a new --out")
        if given is None:
            setattr(args, flag, bool(saved_value))
    common.check_rank(args.rank, args.train_scales, args.train_zeros)


def _init_settings(args: argparse.Namespace) -> None:
    """``--init residual`` needs the float weights: refused for a quantized --model (before any work); a
    resume that finds a checkpoint takes the trained state from it, so the fit is skipped (said so).
    Sets ``args.fit_residual``."""
    args.fit_residual = False
    if getattr(args, "init", "zero") != "residual":
        return
    from .. import loading
    from ..training.finetune import latest_checkpoint

    if loading.is_quantized_checkpoint(loading.resolve_model(args.model)):
        raise ValueError(f"--init residual fits the adapters to the quantization error W - W~, which needs the "
                         f"float weights W; {args.model} is already quantized (its float weights are gone): give "
                         f"the float model as --model (it is quantized first), or drop --init residual")
    ckpt = latest_checkpoint(args.out) if args.resume else None
    if ckpt is not None:
        print(f"[qalora] --resume continues from {ckpt}, which holds the trained state: --init residual (a "
              f"start) is not applied", flush=True)
        return
    args.fit_residual = True


def _training_model(args: argparse.Namespace, data_tokens: int = 0, device=None):
    """The model to fine-tune: a quantized checkpoint as is, or a float model quantized now (GPTQ calibrated
    on the --data text when it holds ``data_tokens`` > --calib-seq-len tokens); with --init residual the new
    adapters are then fitted (on ``device``) to the quantization error on that same calibration text."""
    from .. import loading
    from ..model import add_adapters, freeze_all_but_adapters

    from ..nn import QALoRALinear

    fit_residual = getattr(args, "fit_residual", False)
    folder = loading.resolve_model(args.model)
    calib_text = None
    if loading.is_quantized_checkpoint(folder):
        lm, tokenizer, _ = loading.load_model(folder)
    else:
        if args.method == "gptq" or fit_residual:
            calib_text = _calibration_text(args, data_tokens)
        lm, tokenizer, _ = loading.quantize(folder, **common.quant_options(args), seed=args.seed,
                                            calib_text=calib_text)
    if common.has_adapters(lm):
        layers = [m for m in lm.modules() if isinstance(m, QALoRALinear)]
        for flag, attr in (("--train-scales", "train_scale"), ("--train-zeros", "train_zero")):
            if getattr(args, attr + "s") and not all(getattr(m, attr) for m in layers):
                raise ValueError(f"{flag}: {args.model} already has adapters, trained without it; it applies to "
                                 f"new adapters: fine-tune the quantized base (or merge first: qalora merge)")
        print("[qalora] the model already has adapters: training them further", flush=True)
        freeze_all_but_adapters(lm)
    else:
        import torch

        torch.manual_seed(args.seed)  # the adapters' init: a rerun with the same --seed is the same run
        add_adapters(lm, rank=args.rank, alpha=args.alpha, dropout=args.dropout, train_scale=args.train_scales,
                     train_zero=args.train_zeros)
        if fit_residual:
            _fit_residual(lm, tokenizer, folder, calib_text, args, device)
    return lm, tokenizer


def _fit_residual(lm, tokenizer, folder, calib_text, args: argparse.Namespace, device) -> None:
    """--init residual: the float model is read again (the streaming quantization never held it whole), used
    for the fit and let go; the calibration batches are GPTQ's (same text, sizes and seed)."""
    import gc

    from .. import loading
    from ..quantize.calibration import calibration_batches

    calibration = calibration_batches(tokenizer, calib_text, args.calib_samples, args.calib_seq_len, seed=args.seed)
    # In the dtype the folder stores (the values the quantizer read; half the memory of float32 for a bf16 model).
    config = loading.read_model_config(folder)
    stored = config.get("dtype") or config.get("torch_dtype")
    source, _, _ = loading.load_model(folder, **({"dtype": common.dtype(stored)} if stored in common.DTYPES else {}))
    if device is not None:
        lm.to(device)
    try:
        common.residual_start(lm, source, calibration, progress=common.rank() == 0)
    finally:
        del source
        gc.collect()


def _calibration_text(args: argparse.Namespace, data_tokens: int):
    """GPTQ's (and --init residual's) calibration text: the --data text file (what the model is tuned for), else
    None (the default corpus's training part). A .jsonl file of instruction pairs is not plain text, and a text
    shorter than one calibration window cannot calibrate: None, said so."""
    if args.data is None or str(args.data).endswith(".jsonl"):
        return None
    if data_tokens <= args.calib_seq_len:
        print(f"[qalora] {args.data} holds fewer tokens than one calibration window (--calib-seq-len "
              f"{args.calib_seq_len}): calibrating on the default corpus's training part", flush=True)
        return None
    with open(args.data, encoding="utf-8") as f:
        return f.read()


def training_device(name: str):
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

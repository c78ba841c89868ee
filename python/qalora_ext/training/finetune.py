"""Fine-tune the adapters of a quantized causal LM.

:func:`finetune` trains every parameter that requires grad (after
``add_adapters``: the ``lora_A`` / ``lora_B`` of each ``QALoRALinear``) with
AdamW, writes atomic checkpoints it can resume from bit for bit, and runs
data parallel under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checkpoint import ADAPTER_CONFIG_NAME, load_adapter, save_adapter
from ..checkpoint.files import fsync_dir, pid_alive
from ..model import model_device
from .data import IGNORE_INDEX

__all__ = [
    "TrainResult",
    "finetune",
    "latest_checkpoint",
    "token_nll_sum",
    "CHECKPOINT_PREFIX",
    "TRAINER_STATE_NAME",
    "KEEP_CHECKPOINTS",
]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.pt"
TRAINER_STATE_JSON = "trainer_state.json"
LOSS_PLOT_NAME = "loss.png"
KEEP_CHECKPOINTS = 2
"""How many of the newest checkpoints a run keeps in its output_dir."""

_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
# Temporary directories of an interrupted save: ours, and save_adapter's inside them.
_PARTIAL_RE = re.compile(rf"^\.\.?{CHECKPOINT_PREFIX}\d+\.partial-")
# A loss plot being drawn (_plot_losses): the writer's PID, so only a dead run's is removed.
_PARTIAL_PLOT_RE = re.compile(rf"^\.{re.escape(LOSS_PLOT_NAME)}\.partial-(\d+)\.png$")

PathLike = Union[str, os.PathLike]


@dataclass
class TrainResult:
    """What :func:`finetune` did."""

    losses: list[float] = field(default_factory=list)
    """Mean token NLL of every optimizer step from step 1 (those before a resume included)."""
    steps_done: int = 0
    """Optimizer steps the adapters have taken in total."""
    tokens_per_second: float = 0.0
    """Input tokens of this call (all ranks, padding excluded) per second of its training loop."""
    elapsed: float = 0.0
    """Seconds of this call's training loop (checkpoint writes included)."""
    output_dir: Optional[Path] = None
    plot_path: Optional[Path] = None
    checkpoint: Optional[Path] = None
    """The newest checkpoint in output_dir when the run ended."""
    resumed_from: Optional[Path] = None


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum of next-token NLL, number of predicted tokens)`` of a causal LM batch.

    Position ``t``'s logits predict ``labels[:, t + 1]``; labels equal to
    ``-100`` carry no loss. Computed in float32 whatever the logits' dtype.
    """
    targets = labels[:, 1:]
    logits = logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, int((targets != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _labels_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "labels" in batch:
        return batch["labels"]
    labels = batch["input_ids"]
    if "attention_mask" in batch:
        labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return labels


def _collate(dataset, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    items = [dataset[i] for i in indices]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]).to(device)
            for k in ("input_ids", "labels", "attention_mask") if k in items[0]}


class _DataOrder:
    """The endless sample stream: epoch after epoch, each a fresh permutation.

    One ``torch.Generator`` seeded with ``seed`` draws the epochs' permutations
    in turn, so position ``p`` of the stream depends only on ``seed``, the
    dataset size and ``p``: a resumed run regenerates the same order.
    """

    def __init__(self, n: int, seed: int, position: int = 0) -> None:
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = -1
        self.perm: list[int] = []
        self.position = 0
        self.take(position)

    def take(self, count: int) -> list[int]:
        out = []
        for p in range(self.position, self.position + count):
            epoch = p // self.n
            while self.epoch < epoch:
                self.perm = torch.randperm(self.n, generator=self.generator).tolist()
                self.epoch += 1
            out.append(self.perm[p % self.n])
        self.position += count
        return out


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    created: bool = False


def _setup_distributed(device: torch.device) -> _Dist:
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), False)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), True)


def _rng_state(device: torch.device) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])


def _write_durable(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in output_dir, oldest first."""
    found = []
    if output_dir.is_dir():
        for entry in output_dir.iterdir():
            m = _CHECKPOINT_RE.match(entry.name)
            if m and (entry / TRAINER_STATE_NAME).is_file() and (entry / ADAPTER_CONFIG_NAME).is_file():
                found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The newest complete ``checkpoint-NNNNNN`` directory in output_dir, or None."""
    found = _checkpoints(Path(output_dir))
    return found[-1][1] if found else None


def _save_checkpoint(output_dir: Path, step: int, model: nn.Module, state: dict) -> Path:
    """Write ``output_dir/checkpoint-{step:06d}`` atomically and keep the newest ones.

    Everything goes to a temporary directory inside output_dir (same
    filesystem), is fsynced, and is renamed into place; a crash leaves either
    the previous checkpoints or the new one, never a partial one under the
    final name. The checkpoint directory is itself a loadable adapter.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=output_dir))
    try:
        save_adapter(model, tmp)
        _write_durable(tmp / TRAINER_STATE_NAME, lambda f: torch.save(state, f))
        summary = {k: state[k] for k in ("step", "losses", "samples_seen", "settings")}
        _write_durable(tmp / TRAINER_STATE_JSON, lambda f: f.write(json.dumps(summary, indent=1).encode()))
        fsync_dir(tmp)
        if final.exists():
            # Only reachable when a resumed run rewrites the step it resumed
            # from; the old copy goes only once the new one is in place.
            aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-old-", dir=output_dir))
            os.replace(final, aside / final.name)
            os.replace(tmp, final)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, final)
        fsync_dir(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _checkpoints(output_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    return final


def _remove_partials(output_dir: Path) -> None:
    """Remove what a killed run left: half-written checkpoints, and loss plots whose writer is gone."""
    for entry in output_dir.iterdir():
        if _PARTIAL_RE.match(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        m = _PARTIAL_PLOT_RE.match(entry.name)
        if m and not pid_alive(int(m.group(1))) and entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()


def _plot_losses(losses: list[float], path: Path) -> Path:
    # A bare Figure renders with Agg without touching pyplot's global backend.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean token NLL, nats)")
    ax.set_title("QA-LoRA fine-tune")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _enable_checkpointing(model: nn.Module):
    """Turn on transformers' non-reentrant activation checkpointing; returns the undo, or None if unsupported."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return None
    # transformers 5 renamed gradient_* to activation_* (the old names warn); 4.x has only the old ones.
    if hasattr(model, "activation_checkpointing_enable"):
        enable, disable = model.activation_checkpointing_enable, model.activation_checkpointing_disable
        kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
        already = model.is_activation_checkpointing
    elif hasattr(model, "gradient_checkpointing_enable"):
        enable, disable = model.gradient_checkpointing_enable, model.gradient_checkpointing_disable
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        already = model.is_gradient_checkpointing
    else:
        return None
    if already:
        return lambda: None
    had_input_hook = hasattr(model, "_require_grads_hook")
    enable(**kwargs)

    def undo():
        disable()
        # enable() also made the embeddings' output require grad (for frozen
        # embeddings under reentrant checkpointing); take that back too.
        if not had_input_hook and hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()

    return undo


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel that starts every rank from rank 0's parameters and buffers.

    The buffers are the frozen quantized weights: they are broadcast once at
    start-up, not before every forward (they never change).
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    # Older torch: broadcast_buffers=True would resend every buffer at each
    # forward, and False skips them at start-up too; ranks load the same base.
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _check_resume_settings(ckpt: Path, saved: dict, settings: dict) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in settings.items()
             if k != "world_size" and saved.get(k) != v]
    if diffs:
        raise ValueError(f"resume: {ckpt} was written with other training settings ({'; '.join(diffs)}); "
                         f"resume with the same settings, or start a new output_dir")


# ---------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------


def finetune(
    model: nn.Module,
    dataset,
    *,
    steps: int,
    batch_size: int = 4,
    grad_accum: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    max_grad_norm: Optional[float] = 1.0,
    gradient_checkpointing: bool = False,
    output_dir: Optional[PathLike] = None,
    save_every: int = 0,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    loss_plot: bool = True,
    autocast: Optional[torch.dtype] = None,
    fsdp: bool = False,
    quant_lr: Optional[float] = None,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad up to optimizer step ``steps``.

    ``steps`` counts from the start of the run: a resumed run stops at the
    same step as the uninterrupted one.

    ``dataset``: a map-style dataset of dicts with ``input_ids`` and
    optionally ``labels`` (``-100`` = no loss) and ``attention_mask``, all of
    one length (see :mod:`qalora_ext.training.data`). Without labels the loss is on
    every non-padding token. The loss is the float32 next-token NLL computed
    from ``model(...).logits``, averaged over all predicted tokens of an
    optimizer step (all micro-batches and ranks).

    Data order: an endless stream of epochs, each a permutation drawn from a
    ``torch.Generator`` seeded with ``seed``. An optimizer step takes the next
    ``grad_accum`` global batches of ``batch_size * world_size`` examples;
    rank ``r`` trains on slice ``r`` of each (``batch_size`` is per process).

    Optimizer: AdamW on the trainable parameters; ``max_grad_norm`` clips
    the global gradient norm (``None`` or 0: no clipping). Learning rate:
    linear warmup over the first ``warmup_steps`` steps (step ``s`` uses
    ``lr * (s + 1) / (warmup_steps + 1)``), then CONSTANT ``lr``, as in the
    QLoRA / QA-LoRA recipes; a constant rate also makes "train k steps, then
    resume to N" the same run as "train N".

    ``gradient_checkpointing``: transformers' non-reentrant checkpointing and
    ``use_cache=False`` during the call (both restored afterwards); a model
    without support trains without it, with a warning.

    ``output_dir``: every ``save_every`` steps (0: only at the end) and at the
    end, rank 0 writes ``checkpoint-{step:06d}/`` atomically: the adapter
    (``save_adapter``, so the directory loads with ``load_adapter``), the
    optimizer and scheduler state, the step, the losses, the settings and
    every rank's RNG states. The newest ``KEEP_CHECKPOINTS`` are kept. With
    ``loss_plot``, the loss curve goes to ``output_dir/loss.png``. A fresh
    run (``resume=False``) refuses an output_dir that already holds
    checkpoints, so two runs never mix.

    ``resume=True`` continues from the newest complete checkpoint in
    output_dir: same adapters, optimizer, RNG and data position, so the
    result is bitwise the run that never stopped. The settings that decide
    the run (global batch, grad_accum, seed, lr, weight_decay, warmup,
    clipping, dataset size) must match the checkpoint's (ValueError
    otherwise). With no checkpoint there, it warns and starts from step 0,
    so a preemptible job can always pass ``resume=True``. Under data
    parallelism every rank reads the checkpoint: output_dir must be shared.

    Data parallel: when ``torch.distributed`` is initialised, or WORLD_SIZE >
    1 (torchrun; the process group is then created, gloo on CPU, nccl on
    CUDA, and destroyed at the end), the model is wrapped in
    ``DistributedDataParallel``, which starts every rank from rank 0's
    weights and averages the adapters' gradients, so all ranks end with
    identical adapters. For CUDA, place each rank's model on its own device
    first. Only rank 0 shows progress and writes files.

    ``fsdp=True`` (under data parallelism): instead of DDP, the model is
    sharded with FSDP2 (:func:`qalora_ext.training.fsdp.shard_model`, unless
    it already is: :func:`~qalora_ext.training.fsdp.load_quantized_sharded`),
    so each rank holds 1/world of the packed weights, the adapters and their
    optimizer state. Checkpoints hold the gathered adapters once (loadable by
    a single-process ``load_adapter``) and the gathered optimizer state; a
    checkpoint resumes only in the mode (FSDP or not) that wrote it. The
    model stays sharded after the call. With one process it trains unsharded
    unless the model is already sharded (a one-rank group).

    Dropout masks come from torch's global RNG, which this function does not
    seed (it restores it on resume).

    ``quant_lr``: the learning rate of the trainable scales and zeros
    (``dscale``/``dzero``, whose useful values are 1e-3 to 1e-2 of a weight),
    in their own AdamW group without weight decay; default: ``lr``.

    ``autocast``: ``torch.bfloat16`` runs each forward under
    ``torch.autocast(device, bfloat16)``: the packed layers then take bfloat16
    activations (on CUDA: the tensor-core and cuBLAS paths), the adapters keep
    their float32 master copy and float32 gradients, and the loss is computed
    in float32. ``None`` (default): the model's own dtype. float16 is refused
    (it would need loss scaling).
    """
    _check_arguments(dataset, steps, batch_size, grad_accum, lr, weight_decay, warmup_steps, max_grad_norm,
                     save_every, seed, autocast, output_dir, resume, model)
    if quant_lr is not None and not (isinstance(quant_lr, (int, float)) and math.isfinite(quant_lr) and quant_lr > 0):
        raise ValueError(f"quant_lr must be a finite number > 0 or None; got {quant_lr!r}")
    device = model_device(model)
    ctx = _setup_distributed(device)
    rank0 = ctx.rank == 0
    out = Path(output_dir) if output_dir is not None else None
    settings = {
        "global_batch_size": batch_size * ctx.world_size,
        "grad_accum": grad_accum,
        "seed": seed,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "quant_lr": float(quant_lr) if quant_lr is not None else None,
        # None without them, so checkpoints written before they existed still resume; a resume that
        # would train them where the checkpoint did not (or not where it did) is refused.
        "quant_parameters": sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters()
                                    if p.requires_grad and n.rsplit(".", 1)[-1] in QUANT_PARAMETER_NAMES}) or None,
        "warmup_steps": warmup_steps,
        "max_grad_norm": None if not max_grad_norm else float(max_grad_norm),
        "num_examples": len(dataset),
        "world_size": ctx.world_size,
    }
    if fsdp:
        from .fsdp import is_sharded
    sharded = bool(fsdp) and (ctx.world_size > 1 or is_sharded(model))
    if fsdp and not sharded and rank0:
        warnings.warn("fsdp=True with one process and no process group: training unsharded", stacklevel=2)
    result = TrainResult(output_dir=out)
    config = getattr(model, "config", None)
    old_use_cache = getattr(config, "use_cache", None)
    undo_checkpointing = None
    try:
        saved = _prepare_output_dir(model, out, resume, steps, settings, rank0, result, sharded)
        if sharded:
            from . import fsdp as _fsdp

            if not _fsdp.is_sharded(model):
                _fsdp.shard_model(model)
        if gradient_checkpointing:
            undo_checkpointing = _enable_checkpointing(model)
            if undo_checkpointing is None and rank0:
                warnings.warn(f"{type(model).__name__} does not support gradient checkpointing; training without it",
                              stacklevel=2)
        if old_use_cache is not None:
            config.use_cache = False
        run = _Run(model, dataset, ctx, device, batch_size, grad_accum, lr, weight_decay, warmup_steps,
                   max_grad_norm, seed, autocast, saved, sharded, quant_lr)
        if saved is not None:
            result.losses = list(saved["losses"])
            _restore_rng(saved["rng"], ctx, device, result.resumed_from)
        _train_loop(run, steps, out, save_every, settings, progress and rank0, result)
        if out is not None:
            result.checkpoint = latest_checkpoint(out)
            if loss_plot and rank0 and result.losses:
                result.plot_path = _plot_losses(result.losses, out / LOSS_PLOT_NAME)
        return result
    finally:
        if undo_checkpointing is not None:
            undo_checkpointing()
        if old_use_cache is not None:
            config.use_cache = old_use_cache
        if ctx.created:
            dist.destroy_process_group()


def _check_arguments(dataset, steps, batch_size, grad_accum, lr, weight_decay, warmup_steps, max_grad_norm,
                     save_every, seed, autocast, output_dir, resume, model) -> None:
    """Every argument of :func:`finetune`, checked before anything happens (errors name the argument)."""
    _check_int("steps", steps, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("grad_accum", grad_accum, 1)
    _check_int("warmup_steps", warmup_steps, 0)
    _check_int("save_every", save_every, 0)
    _check_int("seed", seed, 0)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0; got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0; got {weight_decay!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm >= 0):
        raise ValueError(f"max_grad_norm must be None or a number >= 0; got {max_grad_norm!r}")
    try:
        n_examples = len(dataset)
    except TypeError:
        raise TypeError(f"dataset must be a map-style dataset with len(); got {type(dataset).__name__}") from None
    if n_examples == 0:
        raise ValueError("dataset is empty: nothing to train on")
    first = dataset[0]
    if not isinstance(first, dict) or "input_ids" not in first:
        raise ValueError(f"dataset items must be dicts with 'input_ids'; item 0 is {type(first).__name__}"
                         + (f" with keys {sorted(first)}" if isinstance(first, dict) else ""))
    if autocast is not None and autocast != torch.bfloat16:
        raise ValueError(f"autocast must be None or torch.bfloat16; got {autocast!r}"
                         + (" (float16 would need loss scaling)" if autocast == torch.float16 else ""))
    if output_dir is None and (save_every or resume):
        raise ValueError(f"save_every={save_every} and resume={resume} need an output_dir")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no parameter that requires grad; call qalora_ext.add_adapters first")


def _prepare_output_dir(model: nn.Module, out: Optional[Path], resume: bool, steps: int, settings: dict,
                        rank0: bool, result: TrainResult, sharded: bool = False) -> Optional[dict]:
    """Create output_dir, and on resume load the newest checkpoint's adapters; returns its trainer state.

    A fresh run refuses a directory that already holds checkpoints, so two
    runs never mix; a resume checks that the checkpoint was written with the
    same settings.
    """
    if out is not None and rank0:
        out.mkdir(parents=True, exist_ok=True)
        _remove_partials(out)
    if not resume:
        if out is not None and _checkpoints(out):
            raise ValueError(f"{out} already holds checkpoints ({latest_checkpoint(out).name} is the newest); "
                             f"pass resume=True to continue that run, or choose another output_dir")
        return None
    result.resumed_from = latest_checkpoint(out)
    if result.resumed_from is None:
        if rank0:
            warnings.warn(f"resume=True but {out} holds no complete checkpoint; starting from step 0", stacklevel=3)
        return None
    saved = torch.load(result.resumed_from / TRAINER_STATE_NAME, map_location="cpu", weights_only=True)
    _check_resume_settings(result.resumed_from, saved["settings"], settings)
    if saved["step"] > steps:
        raise ValueError(f"resume: {result.resumed_from} is at step {saved['step']}, beyond "
                         f"steps={steps}; ask for at least {saved['step']} steps")
    if bool(saved.get("fsdp")) != sharded:
        how = "with" if saved.get("fsdp") else "without"
        raise ValueError(f"resume: {result.resumed_from} was written by a run {how} FSDP (its optimizer state is "
                         f"stored that way); resume it {how} fsdp")
    if sharded:
        from .fsdp import full_adapters

        with full_adapters(model, writeback=True):
            load_adapter(model, result.resumed_from)
    else:
        load_adapter(model, result.resumed_from)
    return saved


def _restore_rng(rng: list, ctx: _Dist, device: torch.device, ckpt: Path) -> None:
    if ctx.rank < len(rng) and len(rng) == ctx.world_size:
        _set_rng_state(rng[ctx.rank], device)
    elif ctx.rank == 0:
        warnings.warn(f"resume: {ckpt} holds RNG states of {len(rng)} rank(s), this run has "
                      f"{ctx.world_size}; dropout masks will differ from the uninterrupted run", stacklevel=4)


QUANT_PARAMETER_NAMES = ("dscale", "dzero")
"""Trainable quantization parameters (SPEC): their own optimizer group, no weight decay."""


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, quant_lr: Optional[float] = None) -> list[dict]:
    """AdamW groups of ``model``'s trainable parameters: the adapters (``lr``, ``weight_decay``), then,
    when any is trained, ``dscale``/``dzero`` (``quant_lr`` or ``lr``, no weight decay: decay would pull
    the learned scales and zeros back to the quantizer's)."""
    adapter, quant = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (quant if name.rsplit(".", 1)[-1] in QUANT_PARAMETER_NAMES else adapter).append(p)
    groups = [{"params": adapter, "lr": lr, "weight_decay": weight_decay}]
    if quant:
        groups.append({"params": quant, "lr": quant_lr if quant_lr is not None else lr, "weight_decay": 0.0})
    return groups


class _Run:
    """The state of one training run: optimizer, schedule, data order, the (DDP-wrapped) model."""

    def __init__(self, model, dataset, ctx, device, batch_size, grad_accum, lr, weight_decay, warmup_steps,
                 max_grad_norm, seed, autocast, saved, sharded=False, quant_lr=None) -> None:
        self.model, self.dataset, self.ctx, self.device = model, dataset, ctx, device
        self.sharded = sharded
        self.batch_size, self.grad_accum, self.max_grad_norm = batch_size, grad_accum, max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameter_groups(model, lr, weight_decay, quant_lr), lr=lr,
                                           weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))
        self.start = 0
        if saved is not None and sharded:
            from .fsdp import load_optimizer_state_full

            load_optimizer_state_full(model, self.optimizer, saved["optimizer"])
        elif saved is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
        if saved is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
            self.start = saved["step"]
        self.amp = autocast
        self.order = _DataOrder(len(dataset), seed, position=self.start * batch_size * ctx.world_size * grad_accum)

    def autocast(self):
        return (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
                else contextlib.nullcontext())

    def next_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's ``grad_accum`` micro-batches of the next optimizer step."""
        batches = []
        lo, hi = self.ctx.rank * self.batch_size, (self.ctx.rank + 1) * self.batch_size
        for _ in range(self.grad_accum):
            global_idx = self.order.take(self.batch_size * self.ctx.world_size)
            batches.append(_collate(self.dataset, global_idx[lo:hi], self.device))
        return batches

    def step(self, train_model: nn.Module, step: int) -> tuple[float, int]:
        """One optimizer step; returns (mean token NLL of the global batch, input tokens of all ranks)."""
        ctx = self.ctx
        batches = self.next_batches()
        counts = torch.tensor([
            sum(int((_labels_of(b)[:, 1:] != IGNORE_INDEX).sum()) for b in batches),
            sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                for b in batches),
        ], dtype=torch.int64, device=self.device)
        if ctx.world_size > 1:
            dist.all_reduce(counts)
        n_targets, n_tokens = int(counts[0]), int(counts[1])
        if n_targets == 0:
            raise ValueError(f"step {step + 1}: no token to predict in the batch (every label is -100)")
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for i, b in enumerate(batches):
            last = i == self.grad_accum - 1
            # FSDP2 reduce-scatters after every micro-batch (its shards accumulate).
            sync = (contextlib.nullcontext() if last or ctx.world_size == 1 or self.sharded
                    else train_model.no_sync())
            with sync:
                inputs = {"input_ids": b["input_ids"]}
                if "attention_mask" in b:
                    inputs["attention_mask"] = b["attention_mask"]
                with self.autocast():
                    logits = train_model(**inputs).logits
                nll, _ = token_nll_sum(logits, _labels_of(b))
                # DDP and FSDP2 average gradients over ranks; scaling by world_size
                # makes the result the gradient of the global token mean.
                (nll * (ctx.world_size / n_targets)).backward()
            loss_sum += nll.detach()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if ctx.world_size > 1:
            dist.all_reduce(loss_sum)
        return loss_sum.item() / n_targets, n_tokens

    def save(self, out: Path, done: int, losses: list[float], settings: dict) -> Optional[Path]:
        """Rank 0 writes ``checkpoint-{done:06d}`` with every rank's RNG state; all ranks wait for it."""
        ctx = self.ctx
        states = [_rng_state(self.device)]
        if ctx.world_size > 1:
            states = [None] * ctx.world_size
            dist.all_gather_object(states, _rng_state(self.device))
        path = None
        if self.sharded:
            from .fsdp import full_adapters, optimizer_state_full

            optimizer_state = optimizer_state_full(self.model, self.optimizer)
            gathered = full_adapters(self.model)
        else:
            optimizer_state, gathered = None, contextlib.nullcontext()
        with gathered:
            if ctx.rank == 0:
                state = {"step": done, "losses": list(losses), "samples_seen": self.order.position,
                         "settings": settings, "scheduler": self.scheduler.state_dict(), "rng": states,
                         "optimizer": optimizer_state if self.sharded else self.optimizer.state_dict()}
                if self.sharded:
                    state["fsdp"] = True
                path = _save_checkpoint(out, done, self.model, state)
        if ctx.world_size > 1:
            dist.barrier()
        return path


def _train_loop(run: _Run, steps: int, out: Optional[Path], save_every: int, settings: dict, show: bool,
                result: TrainResult) -> None:
    """Steps ``run.start`` .. ``steps``, with progress, tokens/s and checkpoints; fills ``result``."""
    from tqdm.auto import tqdm

    model, ctx = run.model, run.ctx
    train_model = _wrap_ddp(model, run.device) if ctx.world_size > 1 and not run.sharded else model
    was_training = model.training
    model.train()
    bar = tqdm(total=steps, initial=run.start, desc="finetune", unit="step", disable=not show or None)
    tokens = 0
    t0 = time.perf_counter()
    try:
        for step in range(run.start, steps):
            loss, n_tokens = run.step(train_model, step)
            result.losses.append(loss)
            tokens += n_tokens
            done = step + 1
            result.steps_done = done
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
            if out is not None and ((save_every and done % save_every == 0) or done == steps):
                path = run.save(out, done, result.losses, settings)
                if path is not None:
                    result.checkpoint = path
    finally:
        bar.close()
        model.train(was_training)
        # DDP's reducer holds the process group: release it while the group
        # still exists (tearing it down afterwards can hang the rank).
        del train_model
    if ctx.world_size > 1:
        dist.barrier()
    result.steps_done = max(result.steps_done, run.start)
    result.elapsed = time.perf_counter() - t0
    result.tokens_per_second = tokens / result.elapsed if result.elapsed > 0 else 0.0

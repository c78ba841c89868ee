"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for packed quantized models with QA-LoRA adapters.

A ``QuantLinear`` keeps its packed codes, scales, zeros and bias as buffers,
and FSDP2 shards parameters only. :func:`shard_model` therefore turns those
four buffers of every packed layer into FROZEN PARAMETERS of their own
storage dtypes (``packed`` stays int32, ``scale`` float16, ...), then applies
``fully_shard`` to each decoder block and to the root. FSDP2 shards every
parameter along dim 0, which for these tensors is the output dimension: each
rank holds ``1/world`` of the rows at rest, all-gathers a block's rows for
its forward and backward, and frees them after. The all-gather copies bytes
(measured with torch 2.13 on gloo: int32 words arrive bit for bit), so no
packed word is ever viewed as a float. Only the adapters require grad, so
only they get reduce-scattered gradients and optimizer state, sharded like
any parameter.

The conversion happens here only: a model that never goes through
:func:`shard_model` keeps its buffers and today's ``named_parameters()``.
A converted layer refuses what would reinterpret or re-round its stored
words (``.half()``, ``.to(dtype)``, a ``MixedPrecisionPolicy`` with a
``param_dtype``): bfloat16 compute comes from ``torch.autocast``, as in the
unsharded model.

:func:`load_quantized_sharded` builds a saved quantized model on the meta
device, shards it, and lets every rank read only its own rows of each
tensor from the safetensors files, so the full model never exists on one
rank. :func:`full_adapters` gathers the adapters (collective) for saving
with ``save_adapter`` or loading with ``load_adapter``.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..model import freeze_all_but_adapters, quantized_layers
from ..nn import QALoRALinear, QuantLinear

__all__ = [
    "shard_model",
    "is_sharded",
    "full_adapters",
    "resident_packed_bytes",
    "load_quantized_sharded",
    "init_adapters_sharded",
    "materialize",
    "optimizer_state_full",
    "load_optimizer_state_full",
    "PACKED_TENSORS",
]

PACKED_TENSORS = ("packed", "scale", "zero", "bias")
"""The tensors of a ``QuantLinear`` that become frozen, sharded parameters under FSDP2."""

_SHARDED_CLASSES: dict[type, type] = {}


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # torch < 2.6 has it only under _composable
        raise ImportError(f"FSDP2 needs torch.distributed.fsdp.fully_shard (torch >= 2.6); this is torch "
                          f"{torch.__version__}") from e
    return fully_shard


class _ShardedQuantLinearMixin:
    """What a packed layer gains under FSDP2: stored dtypes that nothing may change.

    Mixed into a dynamic subclass of the layer's class (as FSDP2 itself does
    with its ``FSDP<Class>``), so ``isinstance(m, QuantLinear)`` still holds.
    """

    def _apply(self, fn, recurse=True):
        _refuse_dtype_change(fn, type(self).__name__)
        return nn.Module._apply(self, fn, recurse)

    def _check_stored_dtypes(self) -> None:
        for name, want in self._qalora_dtypes.items():
            t = getattr(self, name)
            if t is not None and t.dtype != want:
                raise TypeError(
                    f"{type(self).__name__}.{name} arrived in forward as {t.dtype}, stored as {want}: an FSDP2 "
                    f"MixedPrecisionPolicy(param_dtype=...) casts packed layers' stored tensors; leave param_dtype "
                    f"None and use torch.autocast")

    def forward(self, x, adapter=None, **computed):
        # computed: scale= / zero= that QALoRALinear passes when it trains dscale / dzero.
        self._check_stored_dtypes()
        return super().forward(x, adapter, **computed)


_STORED_DTYPES = (torch.int32, torch.float16, torch.bfloat16, torch.float32)


def _refuse_dtype_change(fn, where: str) -> None:
    """Refuse an ``_apply`` function that changes a dtype (``.half()``, ``.to(dtype)``); device moves pass.

    ``fn`` is opaque (``.half()``, ``.to(dtype)``, ``.to(device)``,
    ``to_empty``): it is run on empty meta probes of the stored dtypes.
    """
    for dtype in _STORED_DTYPES:
        got = fn(torch.empty(0, dtype=dtype, device="meta"))
        if isinstance(got, torch.Tensor) and got.dtype != dtype:
            raise TypeError(
                f"{where}: a dtype cast ({dtype} -> {got.dtype}) of an FSDP2-sharded packed model is refused: it "
                f"would reinterpret the packed int32 words or re-round the stored scales/zeros; use torch.autocast "
                f"for bfloat16 compute (finetune(autocast=torch.bfloat16))")


def _guard_ancestors(model: nn.Module) -> None:
    """Every module above a packed layer checks a cast before any child is touched (no half-cast model)."""
    for m in model.modules():
        if isinstance(m, _ShardedQuantLinearMixin) or "_apply" in vars(m):
            continue
        if any(isinstance(c, _ShardedQuantLinearMixin) for c in m.modules()):
            cls_apply = type(m)._apply

            def guarded(fn, recurse=True, _m=m, _apply=cls_apply):
                _refuse_dtype_change(fn, type(_m).__name__)
                return _apply(_m, fn, recurse)

            m._apply = guarded


def _sharded_class(cls: type) -> type:
    if cls not in _SHARDED_CLASSES:
        _SHARDED_CLASSES[cls] = type(f"Sharded{cls.__name__}", (_ShardedQuantLinearMixin, cls), {})
    return _SHARDED_CLASSES[cls]


def _packed_layers(model: nn.Module) -> list[QuantLinear]:
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, QuantLinear) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def _to_frozen_parameters(layer: QuantLinear) -> None:
    """Move the layer's packed/scale/zero/bias buffers into frozen parameters of the same tensors."""
    if isinstance(layer, _ShardedQuantLinearMixin):
        return
    dtypes = {}
    for name in PACKED_TENSORS:
        t = layer._buffers.get(name)
        if name in layer._buffers:
            del layer._buffers[name]
        if t is None:
            layer._parameters[name] = None
            continue
        layer._parameters[name] = nn.Parameter(t, requires_grad=False)
        dtypes[name] = t.dtype
    layer._qalora_dtypes = dtypes
    layer.__class__ = _sharded_class(type(layer))


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or a submodule) went through ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of every ``nn.ModuleList`` whose elements hold packed layers (a transformer's blocks)."""
    blocks = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            for child in m:
                if any(isinstance(c, QuantLinear) for c in child.modules()):
                    blocks.append(child)
    return blocks


def _check_mp_policy(mp_policy) -> None:
    if mp_policy is None:
        return
    if getattr(mp_policy, "param_dtype", None) is not None:
        raise ValueError(f"shard_model: mp_policy.param_dtype={mp_policy.param_dtype} is refused: FSDP2 would cast "
                         f"every floating parameter, re-rounding the packed layers' stored scales and zeros (and "
                         f"reinterpreting packed words stored as floats); leave param_dtype None and train under "
                         f"torch.autocast (finetune(autocast=torch.bfloat16)), which keeps the stored formats")


@torch.no_grad()
def _broadcast_from_rank0(model: nn.Module, group=None) -> None:
    """Every materialised parameter and buffer of rank 0 to all ranks (as DDP does at start-up)."""
    seen = set()
    for t in (*model.parameters(), *model.buffers()):
        if t is None or id(t) in seen or t.is_meta:
            continue
        seen.add(id(t))
        dist.broadcast(t.data, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)


def shard_model(model: nn.Module, mesh=None, *, reshard_after_forward: bool = True, mp_policy=None,
                sync_module_states: bool = True) -> nn.Module:
    """Apply FSDP2 to a quantized model with adapters, per decoder block then the root; returns ``model``.

    Needs an initialised process group (gloo on CPU, nccl on CUDA) unless
    ``mesh`` (a 1-D ``DeviceMesh``) is given. Every packed layer's codes,
    scales, zeros and bias become frozen parameters of their stored dtypes
    and are sharded by rows (output channels); the adapters are the only
    parameters that require grad. Every other parameter (embeddings, norms,
    an unquantized head) is frozen and sharded too.

    ``sync_module_states``: broadcast rank 0's materialised tensors first (as
    DDP does), so ranks that built different random adapters start equal.
    Pass False when each rank already holds the same values (or only its
    shard: :func:`load_quantized_sharded`).

    ``mp_policy``: an FSDP2 ``MixedPrecisionPolicy``; a ``param_dtype`` is
    refused (it would cast stored words); ``reduce_dtype`` /
    ``output_dtype`` are passed on. For bfloat16 compute use autocast.
    Gradient checkpointing (transformers' non-reentrant) works before or
    after this call.
    """
    _check_mp_policy(mp_policy)
    if is_sharded(model):
        raise ValueError("shard_model: the model is already sharded")
    fully_shard = _fully_shard()
    if mesh is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("shard_model: no process group; run under torchrun (the group is created by "
                               "finetune) or pass mesh=")
        from torch.distributed.device_mesh import init_device_mesh

        device = next((t.device for t in model.parameters() if not t.is_meta), torch.device("cpu"))
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    freeze_all_but_adapters(model)
    if sync_module_states and mesh.size() > 1:
        _broadcast_from_rank0(model, mesh.get_group())
    for layer in _packed_layers(model):
        _to_frozen_parameters(layer)
    _guard_ancestors(model)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in _decoder_blocks(model):
        fully_shard(block, **kwargs)
    for module in _embedding_groups(model):
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _embedding_groups(model: nn.Module) -> list[nn.Module]:
    """The input embedding and an untied output head, each its own FSDP2 group.

    Left in the root group they would stay gathered from the start of the
    forward to the end of the backward (FSDP2 keeps the root unsharded in
    between): a full vocabulary x hidden matrix on every rank. A tied pair
    shares one parameter and stays in the root.
    """
    modules = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            m = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):
            m = None
        if isinstance(m, nn.Module) and m is not model and not any(m is x for x in modules):
            modules.append(m)
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [m for m in modules if all(owners.get(id(p), 0) == 1 for p in m.parameters())]


def _local_rows(full: torch.Tensor, local_shape, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s rows of ``full`` under FSDP2's dim-0 sharding (``torch.chunk``, the last ranks may hold none)."""
    rows = full.shape[0]
    per = math.ceil(rows / world) if rows else 0
    lo, hi = min(rows, rank * per), min(rows, (rank + 1) * per)
    part = full[lo:hi]
    if tuple(part.shape) != tuple(local_shape):
        raise RuntimeError(f"FSDP2 shard of shape {tuple(local_shape)} is not rows {lo}:{hi} of {tuple(full.shape)}")
    return part


def _row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    per = math.ceil(rows / world) if rows else 0
    return min(rows, rank * per), min(rows, (rank + 1) * per)


@contextlib.contextmanager
def full_adapters(model: nn.Module, writeback: bool = False) -> Iterator[nn.Module]:
    """Inside the block every adapter parameter of a sharded ``model`` is a full, plain tensor (collective).

    Every rank must enter it (the adapters are all-gathered). Use it to save
    with ``save_adapter`` (on one rank) or, with ``writeback=True``, to load
    with ``load_adapter``: each rank copies its rows of the full tensors back
    into its shards on exit. On an unsharded model it does nothing.
    """
    from torch.distributed.tensor import DTensor

    swapped = []
    for m in model.modules():
        if not isinstance(m, QALoRALinear):
            continue
        for name in ("lora_A", "lora_B", "dscale", "dzero"):
            p = m._parameters.get(name)  # None: rank 0 (no lora_A / lora_B), or not trained
            if isinstance(p, DTensor):
                full = nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
                m._parameters[name] = full
                swapped.append((m, name, p, full))
    try:
        yield model
    finally:
        for m, name, sharded, full in swapped:
            m._parameters[name] = sharded
        if writeback:
            with torch.no_grad():
                for m, name, sharded, full in swapped:
                    mesh = sharded.device_mesh
                    local = sharded.to_local()
                    local.copy_(_local_rows(full.detach(), local.shape, mesh.get_local_rank(), mesh.size()))


def resident_packed_bytes(model: nn.Module) -> tuple[int, int]:
    """``(bytes this rank holds, bytes of the whole model)`` of every packed layer's codes, scales, zeros, bias.

    For a sharded parameter the bytes held are its local shard's storage
    (FSDP2 pads the last shard to equal rows, so padding counts).
    """
    from torch.distributed.tensor import DTensor

    held = total = 0
    for layer in _packed_layers(model):
        for name in PACKED_TENSORS:
            t = getattr(layer, name, None)
            if t is None:
                continue
            total += t.numel() * t.element_size()
            if isinstance(t, DTensor):
                local = t.to_local()
                held += max(local.untyped_storage().nbytes(), local.numel() * local.element_size())
            else:
                held += t.numel() * t.element_size()
    return held, total


# ---------------------------------------------------------------------------
# Loading: each rank reads its own rows
# ---------------------------------------------------------------------------


def materialize(model: nn.Module, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Allocate (uninitialised) the shards of a model sharded on the meta device; each rank only its own.

    ``to_empty``, except that buffers already materialised (the rotary
    ``inv_freq`` that ``build_transformers_model`` recomputes on the CPU)
    keep their values.
    """
    kept = {}
    for mname, m in model.named_modules():
        for bname, b in m._buffers.items():
            if b is not None and not b.is_meta:
                kept[(mname, bname)] = b
    model.to_empty(device=device)
    for (mname, bname), b in kept.items():
        model.get_submodule(mname)._buffers[bname] = b.to(device)
    return model


def init_adapters_sharded(model: nn.Module, seed: int) -> None:
    """Give the sharded model's adapters SPEC's init (A Kaiming-uniform, B = 0) drawn as one process would.

    ``torch.manual_seed(seed)`` then each adapter in module order draws its
    full ``A`` (small: rank x groups) exactly as ``QALoRALinear.reset_adapter``
    does, and every rank keeps its rows; so the result equals
    ``torch.manual_seed(seed); add_adapters(...)`` on an unsharded model.
    """
    torch.manual_seed(seed)
    with full_adapters(model, writeback=True):
        for m in quantized_layers(model).values():
            if isinstance(m, QALoRALinear):
                m.reset_adapter()


def load_quantized_sharded(directory: Union[str, os.PathLike], mesh=None, *, device: Union[str, torch.device] = "cpu",
                           rank: Optional[int] = None,
                           alpha: float = 16, dropout: float = 0.0, seed: int = 0, verify: bool = True,
                           reshard_after_forward: bool = True, train_scale: bool = False,
                           train_zero: bool = False) -> nn.Module:
    """Load a quantized checkpoint straight into an FSDP2-sharded model: no rank holds the full model.

    The architecture is built on the meta device from ``config.json``, the
    packed layers are planned from the checkpoint's module table (as
    ``load_quantized`` does), the model is sharded on meta, every rank
    allocates only its shards and reads its rows of each tensor from the
    safetensors files (``safe_open(...).get_slice``). Adapters saved in the
    checkpoint are loaded; without them, adapters of ``rank`` / ``alpha`` /
    ``dropout`` are added and initialised from ``seed``
    (:func:`init_adapters_sharded`). ``rank=None`` with no saved adapters
    means rank 16; ``train_scale`` / ``train_zero`` add trainable ``dscale`` /
    ``dzero`` to those new adapters (sharded by rows like the adapters, and
    gathered by :func:`full_adapters`). ``device``: where each rank's shards live (``cuda:N``
    under NCCL). Needs an initialised process group. Returns the sharded
    model in train mode.
    """
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from ..checkpoint.quantized import _plan_layers, _read_quant_config, _set_child
    from ..loading.transformers_model import build_transformers_model
    from ..model import add_adapters

    directory = Path(os.path.realpath(os.fspath(directory)))
    config, qc = _read_quant_config(directory, verify)
    tied, tied_modules = qc.get("tied", {}) or {}, qc.get("tied_modules", {}) or {}
    model = build_transformers_model(config, directory)
    new_layers = _plan_layers(model, qc["modules"], tied_modules)
    for name, layer in new_layers.items():
        _set_child(model, name, layer)
    for alias, source in tied_modules.items():
        _set_child(model, alias, new_layers[source])
    has_saved_adapters = any(isinstance(m, QALoRALinear) for m in model.modules())
    wrapped: set[str] = set()
    if not has_saved_adapters:
        add_adapters(model, rank=16 if rank is None else rank, alpha=alpha, dropout=dropout,
                     train_scale=bool(train_scale), train_zero=bool(train_zero))
        wrapped = {n for n, m in model.named_modules() if isinstance(m, QALoRALinear)}
    else:
        layers = [m for m in model.modules() if isinstance(m, QALoRALinear)]
        for flag, on in (("train_scale", train_scale), ("train_zero", train_zero)):
            if on and not all(getattr(m, flag) for m in layers):
                raise ValueError(f"load_quantized_sharded: {flag}=True, but {directory} holds adapters trained "
                                 f"without it; it applies to new adapters (a checkpoint without adapters)")
    kept_keys = {n for n, b in model.named_buffers() if not b.is_meta}
    _check_ties(model, tied, directory)
    device = torch.device(device)
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    shard_model(model, mesh, reshard_after_forward=reshard_after_forward, sync_module_states=False)
    materialize(model, device)

    files = [f for f in qc["files"] if f.endswith(".safetensors")]
    where: dict[str, str] = {}
    for fname in files:
        with safe_open(str(directory / fname), framework="pt") as f:
            for key in f.keys():
                where[key] = fname
    handles = {}
    try:
        with torch.no_grad():
            for key, t in (*model.named_parameters(), *model.named_buffers()):
                if key in kept_keys:
                    continue
                stored = _stored_key(key, wrapped)
                src = stored if stored in where else tied.get(stored)
                if src is None or src not in where:
                    if key.endswith(("lora_A", "lora_B", "dscale", "dzero")) and not has_saved_adapters:
                        continue
                    raise RuntimeError(f"{directory}: no tensor {key!r} in the checkpoint's files")
                fname = where[src]
                if fname not in handles:
                    handles[fname] = safe_open(str(directory / fname), framework="pt")
                sl = handles[fname].get_slice(src)
                if isinstance(t, DTensor):
                    mesh_ = t.device_mesh
                    local = t.to_local()
                    rows = sl.get_shape()[0]
                    lo, hi = _row_range(rows, mesh_.get_local_rank(), mesh_.size())
                    part = sl[lo:hi]
                    if tuple(part.shape) != tuple(local.shape):
                        raise RuntimeError(f"{directory}: {src} rows {lo}:{hi} have shape {tuple(part.shape)}, the "
                                           f"shard {tuple(local.shape)}")
                    if part.dtype != local.dtype:
                        raise RuntimeError(f"{directory}: {src} is stored as {part.dtype}, the model holds "
                                           f"{local.dtype}")
                    local.copy_(part)
                else:
                    t.copy_(sl[:])
    finally:
        handles.clear()
    if not has_saved_adapters:
        init_adapters_sharded(model, seed)
    return model.train()


def _check_ties(model: nn.Module, tied: dict, directory: Path) -> None:
    """The meta build ties what its config says; the checkpoint must tie the same (else refuse)."""
    first: dict[int, str] = {}
    for key, t in model.named_parameters(remove_duplicate=False):
        if id(t) in first and tied.get(key) != first[id(t)]:
            raise RuntimeError(f"{directory}: the model built from config.json ties {key!r} to {first[id(t)]!r}, "
                               f"the checkpoint stores them apart; load it with load_quantized instead")
        first.setdefault(id(t), key)


def optimizer_state_full(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state with every sharded tensor gathered, keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state_full(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state from :func:`optimizer_state_full` into the optimizer of a sharded model (each rank its rows)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _stored_key(key: str, wrapped: set) -> str:
    """The file's name of ``key``: ``NAME.base.packed`` of an adapter added at load time is ``NAME.packed`` there."""
    owner, _, attr = key.rpartition(".")
    if owner.endswith(".base") and owner[: -len(".base")] in wrapped:
        return f"{owner[: -len('.base')]}.{attr}"
    return key

"""Model surgery: quantize every linear layer, add adapters, merge them.

All three walk ``model.named_modules()`` and replace children in place;
they return the model for chaining.
"""

from __future__ import annotations

import re
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .format import check_bits, check_group_size
from .nn import MERGE_WARN_FRACTION, QALoRALinear, QuantLinear

__all__ = ["quantize_model", "quantization_targets", "quantized_layers", "model_device", "set_module", "warn_unquantized", "add_adapters", "merge_adapters",
           "find_output_heads", "freeze_all_but_adapters", "set_int8_activations"]

TargetModules = Optional[Union[str, Iterable[str]]]


def _matches(name: str, target_modules: TargetModules) -> bool:
    """PEFT's convention: a string is a regex matched against the full name;
    a list matches names equal to an entry or ending in '.' + entry."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: QALoRALinear or QuantLinear}``: every packed layer once, in module order.

    A ``QuantLinear`` inside a ``QALoRALinear`` is represented by its wrapper
    (the layer with its adapter), never listed again as ``NAME.base``. A layer
    object registered under two names is listed under its first.
    """
    layers: dict[str, nn.Module] = {}
    wrapped: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, QALoRALinear):
            layers[name] = m
            wrapped.add(id(m.base))
        elif isinstance(m, QuantLinear) and id(m) not in wrapped:
            layers[name] = m
    return layers


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def find_output_heads(model: nn.Module) -> set[str]:
    """Names of linear layers that are output heads or tied to an embedding."""
    heads: set[str] = set()
    out_emb = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out_emb = get_out()
        except (NotImplementedError, AttributeError):
            out_emb = None
    emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if m is out_emb or name.split(".")[-1] in ("lm_head", "output", "embed_out") or id(m.weight) in emb_weights:
            heads.add(name)
    return heads


def quantization_targets(model: nn.Module, group_size: int,
                         target_modules: TargetModules = None) -> tuple[list[str], list[str]]:
    """``(names to quantize, descriptions of layers skipped for in_features % group_size)``.

    ``target_modules=None``: every ``nn.Linear`` except output heads and layers
    tied to embeddings. Works on a model whose parameters are on the meta device.
    """
    heads = find_output_heads(model) if target_modules is None else set()
    todo, skipped = [], []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or name in heads or not _matches(name, target_modules):
            continue
        if m.in_features % group_size:
            skipped.append(f"{name} (in_features={m.in_features})")
        else:
            todo.append(name)
    if target_modules is not None and not todo and not skipped:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear layer")
    return todo, skipped


def warn_unquantized(caller: str, skipped: list[str], group_size: int, stacklevel: int = 2) -> None:
    """One warning listing the layers left float because in_features is not a multiple of group_size."""
    if skipped:
        warnings.warn(
            f"{caller}: {len(skipped)} layer(s) left unquantized because in_features is not a multiple of "
            f"group_size={group_size}: " + ", ".join(skipped),
            stacklevel=stacklevel + 1,
        )


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 32,
    method: str = "rtn",
    scale_dtype: torch.dtype = torch.float16,
    zero_dtype: torch.dtype = torch.float32,
    target_modules: TargetModules = None,
    progress: bool = True,
    calibration=None,
) -> nn.Module:
    """Replace ``nn.Linear`` layers by packed ``QuantLinear`` layers, in place.

    ``target_modules=None``: every ``nn.Linear`` except output heads and layers
    tied to embeddings. Layers whose in_features is not a multiple of
    ``group_size`` are left as they are, listed in one warning.
    ``method="gptq"`` needs ``calibration`` (an iterable of input-id batches)
    and runs :func:`qalora_ext.quantize.gptq.quantize_model_gptq`.
    """
    check_bits(bits)
    check_group_size(group_size)
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq'; got {method!r}")
    if method == "gptq":
        if calibration is None:
            raise ValueError("method='gptq' needs calibration data: calibration=[input_ids batches, ...] "
                             "(qalora_ext.quantize.calibration.calibration_batches makes them from text)")
        from .quantize.gptq import quantize_model_gptq

        return quantize_model_gptq(model, calibration, bits=bits, group_size=group_size, scale_dtype=scale_dtype,
                                   zero_dtype=zero_dtype, target_modules=target_modules, progress=progress)
    if calibration is not None:
        raise ValueError("calibration is only used by method='gptq'; round-to-nearest (method='rtn') needs none")
    todo, skipped = quantization_targets(model, group_size, target_modules)
    warn_unquantized("quantize_model", skipped, group_size, stacklevel=2)
    from tqdm.auto import tqdm

    for name in tqdm(todo, desc=f"quantize INT{bits} G{group_size}", disable=not progress or None, leave=False):
        layer = model.get_submodule(name)
        set_module(model, name, QuantLinear.from_linear(layer, bits, group_size, scale_dtype, zero_dtype))
    return model


def add_adapters(
    model: nn.Module,
    rank: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
    target_modules: TargetModules = None,
    *,
    train_scale: bool = False,
    train_zero: bool = False,
) -> nn.Module:
    """Wrap quantized layers in ``QALoRALinear`` adapters, in place.

    ``target_modules=None``: every ``QuantLinear``. Everything else in the
    model is frozen (``requires_grad=False``), so the adapters are its only
    trainable parameters. ``train_scale`` / ``train_zero`` also train each
    layer's per-group scales / zeros (float32 ``dscale`` / ``dzero``, SPEC
    "Trainable quantization parameters"); ``rank=0`` trains those alone.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and _matches(n, target_modules)]
    # A QuantLinear already inside an adapter is not wrapped twice.
    wrapped = {n + ".base" for n, m in model.named_modules() if isinstance(m, QALoRALinear)}
    unwrapped = [n for n in names if n not in wrapped]
    if names and not unwrapped:
        raise ValueError("add_adapters: every matching quantized layer already has an adapter")
    names = unwrapped
    if not names:
        raise ValueError("add_adapters: no quantized layer matched; call quantize_model first"
                         + (f" (target_modules={target_modules!r})" if target_modules is not None else ""))
    for name in names:
        set_module(model, name, QALoRALinear(model.get_submodule(name), rank, alpha, dropout, use_rslora,
                                             train_scale=train_scale, train_zero=train_zero))
    freeze_all_but_adapters(model)
    return model


def freeze_all_but_adapters(model: nn.Module) -> nn.Module:
    """``requires_grad`` only on the adapters' parameters (``lora_A``, ``lora_B``, and ``dscale`` / ``dzero``
    where turned on); QA-LoRA trains nothing else."""
    adapter_params = {id(p) for m in model.modules() if isinstance(m, QALoRALinear)
                      for p in m.trainable_parameters().values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_params)
    return model


def merge_adapters(model: nn.Module) -> dict[str, float]:
    """Fold every adapter into its layer's zeros, in place (SPEC "Merge").

    Returns ``{layer name: fraction of the adapter lost to zero rounding}``;
    warns once if any layer lost more than 1%.
    """
    report: dict[str, float] = {}
    names = [n for n, m in model.named_modules() if isinstance(m, QALoRALinear)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Every layer is merged (and checked: NaN adapters, overflowing zeros)
        # before any is replaced, so an error leaves the model as it was.
        merged: dict[str, QuantLinear] = {}
        for name in names:
            try:
                merged[name] = model.get_submodule(name).merge()
            except ValueError as e:
                raise ValueError(f"merge_adapters: layer {name!r}: {e}") from e
            report[name] = merged[name].merge_lost_fraction
        for name, layer in merged.items():
            set_module(model, name, layer)
    bad = {n: f for n, f in report.items() if f > MERGE_WARN_FRACTION}
    if bad:
        worst = max(bad, key=bad.get)
        warnings.warn(
            f"merge_adapters: {len(bad)} layer(s) lost more than 1% of their adapter to zero rounding "
            f"(worst: {worst}, {100 * bad[worst]:.2f}%); store zeros as float32 to keep it",
            stacklevel=2,
        )
    return report


def set_int8_activations(model: nn.Module, enabled: bool = True) -> int:
    """Turn the opt-in int8-activation path of every packed layer on or off.

    Only forward passes that need no gradient use it (``ops.qlinear_int8``):
    generation and evaluation. Returns the number of packed layers changed.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.int8_activations = bool(enabled)
    return len(layers)

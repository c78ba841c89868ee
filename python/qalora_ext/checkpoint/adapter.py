"""Stand-alone QA-LoRA adapters: :func:`save_adapter`, :func:`load_adapter`.

An adapter uses PEFT's file names (``adapter_config.json``,
``adapter_model.safetensors``) but the ``peft_type`` ``"QALORA_EXT"``, so PEFT
refuses it instead of loading it as a plain LoRA (our adapter acts on
group-MEAN-pooled inputs; a LoRA loader would apply it to the full input and
silently compute something else). Its config records the pooling convention,
group size and every layer's hyper-parameters (SPEC "Checkpoints").

Trainable quantization parameters (SPEC) are stored beside the adapter as
``<layer>.dscale`` / ``<layer>.dzero`` (float32, (out_features, groups)),
names PEFT never writes (its keys end in ``.weight``), and recorded per layer
as ``train_scale`` / ``train_zero``; a layer of rank 0 has no ``lora_A`` /
``lora_B``. Such an adapter is written as format version 2, which readers of
version 1 refuse by version; an adapter without them is still version 1 and
loads as before.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..model import freeze_all_but_adapters
from ..nn import QALoRALinear, QuantLinear
from .files import (
    CheckpointError,
    PathLike,
    atomic_directory,
    check_format_version,
    library_version,
    missing_dir_hint,
    read_json,
    save_tensors,
    short_list,
    verify_files,
    write_json,
)
from .quantized import (
    QUANT_METHOD,
    _get_module,
    _set_child,
    adapter_entry,
    adapter_flags,
    format_version_for,
    quantized_modules,
)

__all__ = ["ADAPTER_PEFT_TYPE", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "save_adapter", "load_adapter"]

ADAPTER_PEFT_TYPE = "QALORA_EXT"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def _own_adapter_file(name: str) -> bool:
    return name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)


def save_adapter(model: nn.Module, directory: PathLike) -> Path:
    """Save only the QA-LoRA adapters of ``model`` (a few MB), atomically.

    The base model is not saved: the adapter is meant to be loaded onto the
    same quantized base (see :func:`load_adapter`). The config records the
    pooling convention and group size so no reader can apply it as a plain
    LoRA, plus every layer's hyper-parameters (a model may mix ranks).
    Trained ``dscale`` / ``dzero`` are saved with it (float32, bit for bit) and
    come back with :func:`load_adapter`. Returns the adapter directory's path.
    """
    modules, _ = quantized_modules(model)
    layers = {n: m for n, m in modules.items() if isinstance(m, QALoRALinear)}
    if not layers:
        raise ValueError("save_adapter: the model has no QALoRALinear layer; call add_adapters first")
    per_layer = {}
    tensors = {}
    for name, m in layers.items():
        per_layer[name] = {
            **adapter_entry(m),
            "group_size": m.group_size,
            "bits": m.bits,
            "in_features": m.in_features,
            "out_features": m.out_features,
        }
        for pname, p in m.trainable_parameters().items():
            tensors[f"{name}.{pname}"] = p.detach()

    def uniform(key):
        values = {e[key] for e in per_layer.values()}
        return values.pop() if len(values) == 1 else None

    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": ADAPTER_PEFT_TYPE,
        "format_version": format_version_for(layers.values()),
        "library": QUANT_METHOD,
        "library_version": library_version(),
        "base_model_name_or_path": base_name,
        "pooling": "mean",
        "group_size": uniform("group_size"),
        "r": uniform("rank"),
        "rank": uniform("rank"),
        "lora_alpha": uniform("alpha"),
        "alpha": uniform("alpha"),
        "lora_dropout": uniform("dropout"),
        "dropout": uniform("dropout"),
        "use_rslora": uniform("use_rslora"),
        "scaling": uniform("scaling"),
        "train_scale": uniform("train_scale"),
        "train_zero": uniform("train_zero"),
        "target_modules": list(layers),
        "layers": per_layer,
    }
    with atomic_directory(directory, _own_adapter_file) as tmp:
        config["files"] = {ADAPTER_WEIGHTS_NAME: save_tensors(tensors, tmp / ADAPTER_WEIGHTS_NAME)}
        write_json(tmp / ADAPTER_CONFIG_NAME, config)
    return Path(os.path.realpath(os.fspath(directory)))


def load_adapter(model: nn.Module, directory: PathLike, *, verify: bool = True) -> nn.Module:
    """Load adapters saved by :func:`save_adapter` onto a quantized model; returns it.

    A PEFT adapter trained with ``LoraConfig(use_qalora=True)`` (PEFT's
    ``save_pretrained``, e.g. on our layers through
    ``qalora_ext.prepare_lora_config``) is detected and converted to SPEC's
    mean pooling (``A_ours = L * A_peft``); the conversion is recorded as
    ``model.qalora_adapter_import``.

    Each target layer must exist and be quantized with the adapter's group
    size (the pooling groups are the quantization groups, SPEC). A plain
    ``QuantLinear`` is wrapped in a new ``QALoRALinear``; an existing
    ``QALoRALinear`` of the same rank gets its parameters overwritten in place
    (an optimizer holding them keeps working), one of another rank is
    replaced. Everything is checked before any layer changes, so an error
    leaves the model as it was. A different bit width of the base is allowed
    (the shapes agree) but warned about: the adapter was trained to correct
    another quantization.
    """
    directory = Path(os.path.realpath(os.fspath(directory)))
    if _is_peft_qalora(directory):
        return _load_peft_qalora(model, directory)
    cfg, cfg_path = _read_adapter_config(directory)
    verify_files(directory, cfg.get("files"), verify)
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise CheckpointError(f"{cfg_path}: target_modules lists no layers")
    configs = {name: _layer_config(name, cfg, cfg_path) for name in targets}
    tensors = _load_adapter_tensors(directory, configs)
    # Every layer is planned (and every value checked) before any layer changes.
    plan = [_plan_layer(model, name, configs[name], cfg_path, tensors) for name in targets]
    for name, layer, base, lc, params in plan:
        _apply_layer(model, name, layer, base, lc, params)
    freeze_all_but_adapters(model)
    return model


def _is_peft_qalora(directory: Path) -> bool:
    """A PEFT adapter saved with ``LoraConfig(use_qalora=True)`` (PEFT's pooling convention, not ours)."""
    cfg_path = directory / ADAPTER_CONFIG_NAME
    if not cfg_path.is_file():
        return False
    cfg = read_json(cfg_path, ADAPTER_CONFIG_NAME)
    return str(cfg.get("peft_type", "")).upper() == "LORA" and bool(cfg.get("use_qalora", False))


def _load_peft_qalora(model: nn.Module, directory: Path) -> nn.Module:
    """Convert on load (``A_ours = L * A_peft``, SPEC) and record what was done as
    ``model.qalora_adapter_import`` (the importer's report: source, convention, per-layer factors)."""
    from ..interop.peft_import import import_peft_qalora

    report = import_peft_qalora(model, directory)
    model.qalora_adapter_import = report
    return model


def _read_adapter_config(directory: Path) -> tuple[dict, Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such adapter directory{missing_dir_hint(directory)}")
    cfg_path = directory / ADAPTER_CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no {ADAPTER_CONFIG_NAME}; not a complete qalora_ext adapter")
    cfg = read_json(cfg_path, ADAPTER_CONFIG_NAME)
    peft_type = cfg.get("peft_type")
    if peft_type != ADAPTER_PEFT_TYPE:
        hint = (" (a PEFT LoRA adapter: it acts on the full input, not on group-pooled inputs, and cannot be "
                "loaded as a QA-LoRA adapter without conversion)") if peft_type == "LORA" else ""
        raise CheckpointError(f"{cfg_path}: peft_type is {peft_type!r}, not {ADAPTER_PEFT_TYPE!r}{hint}")
    check_format_version(cfg.get("format_version"), str(cfg_path))
    if cfg.get("pooling") != "mean":
        raise CheckpointError(f"{cfg_path}: pooling is {cfg.get('pooling')!r}; only 'mean' pooling is supported "
                              f"(SPEC: an importer converts other conventions)")
    return cfg, cfg_path


def _param_names(lc: dict) -> tuple[str, ...]:
    """The tensors one layer's entry says the file holds: lora_A, lora_B (rank > 0), dscale, dzero (when trained)."""
    return (*(("lora_A", "lora_B") if lc["rank"] != 0 else ()), *(("dscale",) if lc["train_scale"] else ()),
            *(("dzero",) if lc["train_zero"] else ()))


def _load_adapter_tensors(directory: Path, configs: dict) -> dict:
    tensors = load_file(str(directory / ADAPTER_WEIGHTS_NAME), device="cpu")
    want = {f"{n}.{p}" for n, lc in configs.items() for p in _param_names(lc)}
    if set(tensors) != want:
        missing, extra = want - set(tensors), set(tensors) - want
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS_NAME}: tensors do not match target_modules"
                              + (f"; missing: {short_list(missing)}" if missing else "")
                              + (f"; unexpected: {short_list(extra)}" if extra else ""))
    return tensors


def _layer_config(name: str, cfg: dict, cfg_path: Path) -> dict:
    """One target's hyper-parameters (its entry in ``layers``, else the config's uniform values), checked."""
    layers_cfg = cfg.get("layers") or {}
    if not isinstance(layers_cfg, dict):
        raise CheckpointError(f"{cfg_path}: 'layers' must be an object of per-layer entries; got {layers_cfg!r}")
    entry = layers_cfg.get(name)
    if entry is not None and not isinstance(entry, dict):
        raise CheckpointError(f"{cfg_path}: layer {name!r}: its entry in 'layers' must be an object; got {entry!r}")
    lc = dict(entry or {})
    for key, fallback in (("rank", "rank"), ("alpha", "alpha"), ("dropout", "dropout"),
                          ("use_rslora", "use_rslora"), ("group_size", "group_size")):
        if lc.get(key) is None:
            lc[key] = cfg.get(fallback)
    if any(lc[k] is None for k in ("rank", "alpha", "dropout", "use_rslora", "group_size")):
        raise CheckpointError(f"{cfg_path}: layer {name!r} has incomplete hyper-parameters {lc}")
    if lc.get("pooling", "mean") != "mean":
        raise CheckpointError(f"{cfg_path}: layer {name!r} pooling is {lc['pooling']!r}; only 'mean' is supported")
    for key in ("train_scale", "train_zero"):  # absent: written before they existed (or not trained)
        if lc.get(key) is None:
            lc[key] = cfg.get(key) if cfg.get(key) is not None else False
    lc["train_scale"], lc["train_zero"] = adapter_flags(lc, f"{cfg_path}: layer {name!r}")
    try:
        QALoRALinear.check_hyperparameters(lc["rank"], lc["alpha"], lc["dropout"], train_scale=lc["train_scale"],
                                           train_zero=lc["train_zero"])
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: layer {name!r}: {e}") from e
    return lc


def _plan_layer(model: nn.Module, name: str, lc: dict, cfg_path: Path, tensors: dict) -> tuple:
    """``(name, layer, base, hyper-parameters, {parameter name: tensor})`` of one target, every value checked."""
    layer = _get_module(model, name)
    if layer is None:
        raise CheckpointError(f"load_adapter: the model has no layer {name!r} (an adapter target)")
    if not isinstance(layer, (QuantLinear, QALoRALinear)):
        raise CheckpointError(f"load_adapter: layer {name!r} is a {type(layer).__name__}, not a quantized layer; "
                              f"quantize the model (quantize_model / load_quantized) first")
    base = layer.base if isinstance(layer, QALoRALinear) else layer
    if base.group_size != lc["group_size"]:
        raise CheckpointError(f"load_adapter: layer {name!r} is quantized with group_size={base.group_size} but "
                              f"the adapter was trained with group_size={lc['group_size']}: its pooling groups "
                              f"must be the quantization groups")
    rank = int(lc["rank"])
    groups = base.in_features // base.group_size
    params = {p: tensors[f"{name}.{p}"] for p in _param_names(lc)}
    if rank:
        A, B = params["lora_A"], params["lora_B"]
        wantA = (rank, groups)
        wantB = (base.out_features, rank)
        if tuple(A.shape) != wantA or tuple(B.shape) != wantB:
            raise CheckpointError(f"load_adapter: layer {name!r}: adapter shapes A {tuple(A.shape)}, "
                                  f"B {tuple(B.shape)} do not fit the layer (expected A {wantA}, B {wantB})")
    for p in ("dscale", "dzero"):
        t = params.get(p)
        if t is None:
            continue
        if tuple(t.shape) != (base.out_features, groups) or t.dtype != torch.float32:
            raise CheckpointError(f"load_adapter: layer {name!r}: {p} is {t.dtype} {tuple(t.shape)}; expected "
                                  f"float32 {(base.out_features, groups)} (out_features, groups)")
    want_scaling = QALoRALinear.scaling_for(rank, lc["alpha"], lc["use_rslora"])
    if "scaling" in lc and not math.isclose(want_scaling, float(lc["scaling"]),
                                            rel_tol=1e-6):
        raise CheckpointError(f"{cfg_path}: layer {name!r}: scaling {lc['scaling']} does not match alpha/rank")
    if lc.get("bits") is not None and lc["bits"] != base.bits:
        warnings.warn(f"load_adapter: layer {name!r} is INT{base.bits} but the adapter was trained on "
                      f"INT{lc['bits']}", stacklevel=3)
    return name, layer, base, lc, params


def _apply_layer(model: nn.Module, name: str, layer: nn.Module, base: QuantLinear, lc: dict,
                 params: dict[str, torch.Tensor]) -> None:
    """Copy into an adapter of the same rank and the same trained quantities (an optimizer holding its
    parameters keeps working), else wrap the base anew as the file describes it: the file is the
    layer's whole trained state, so a ``dscale`` / ``dzero`` it does not hold is not kept."""
    rank, alpha, dropout, rs = int(lc["rank"]), float(lc["alpha"]), float(lc["dropout"]), bool(lc["use_rslora"])
    train_scale, train_zero = lc["train_scale"], lc["train_zero"]
    dev = base.packed.device
    if (isinstance(layer, QALoRALinear) and layer.rank == rank and layer.train_scale == train_scale
            and layer.train_zero == train_zero):
        target = layer
        layer.alpha, layer.dropout, layer.use_rslora = alpha, dropout, rs
    else:
        target = QALoRALinear(base, rank, alpha, dropout, rs, train_scale=train_scale, train_zero=train_zero)
        target.train(layer.training)
    with torch.no_grad():
        for pname, p in target.trainable_parameters().items():
            p.copy_(params[pname].to(dev, torch.float32))
    if target is not layer:
        _set_child(model, name, target)

"""Build a transformers model from a config without allocating its weights.

Used by every loader that fills a model from files (our checkpoints, GPTQ
checkpoints, streaming quantization): the architecture comes from
``config.json``, the parameters are created on the meta device and assigned
from the files afterwards. Depends on torch and transformers only.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.files import CheckpointError
from ..checkpoint.quantized import CONFIG_NAME

__all__ = ["build_transformers_model"]



def build_transformers_model(config: dict, directory: Path) -> nn.Module:
    """The architecture ``config`` (a ``config.json`` dict) describes, with its weights on the meta device.

    Built under ``torch.device("meta")``, a thread-local mode: nothing global
    is patched, so other threads building models meanwhile are unaffected.
    Non-persistent buffers that a meta build leaves empty (rotary ``inv_freq``)
    are rebuilt on the CPU. Only transformers model classes are built (the
    class named in ``architectures`` must be a ``PreTrainedModel``), and a
    config whose layer count disagrees with the checkpoint's module table is
    refused before anything is built.
    """
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise CheckpointError(f"{directory}: {CONFIG_NAME} holds no transformers model config (no model_type); "
                              f"pass the model to load into: load_quantized(directory, model=...)")
    try:
        import transformers
    except ImportError as e:
        raise ImportError("load_quantized(model=None) rebuilds the model with transformers, which is not "
                          "installed: pip install transformers, or pass model=") from e
    _check_layer_count(cfg, (config.get("quantization_config") or {}).get("modules"), directory)
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory}: transformers cannot build a config of model_type {model_type!r} "
                              f"({e}); pass model=") from e
    cls = _model_class(transformers, cfg.get("architectures"), directory)
    with torch.device("meta"):
        if cls is not None:
            model = cls._from_config(hf_config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
    _rebuild_non_persistent_buffers(model, directory)
    return model


def _model_class(transformers, archs, directory: Path):
    """The class ``architectures[0]`` names, if it is a transformers model class (anything else is refused)."""
    if not archs:
        return None
    if not isinstance(archs, list) or not isinstance(archs[0], str):
        raise CheckpointError(f"{directory}: 'architectures' in {CONFIG_NAME} must be a list of class names; "
                              f"got {archs!r}")
    cls = getattr(transformers, archs[0], None)
    if cls is None:
        return None  # unknown here: the auto class picks one from model_type
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{directory}: 'architectures' names {archs[0]!r}, which is not a transformers model "
                              f"class; refusing to call it")
    return cls


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _check_layer_count(cfg: dict, modules, directory: Path) -> None:
    """A config edited to 5,000 layers must fail now, not after building 5,000 layers."""
    if not isinstance(modules, dict) or not modules:
        return
    indices = {int(m.group(1)) for name in modules for m in [_LAYER_INDEX.search(name)] if m}
    if not indices:
        return
    for key in _LAYER_COUNT_KEYS:
        n = cfg.get(key)
        if n is None:
            continue
        if isinstance(n, bool) or not isinstance(n, int) or n != max(indices) + 1:
            raise CheckpointError(f"{directory}: {CONFIG_NAME} says {key}={n!r} but the checkpoint's quantized "
                                  f"layers are those of {max(indices) + 1} decoder layers; the config does not "
                                  f"belong to these weights")
        return


def _rebuild_non_persistent_buffers(model: nn.Module, directory: Path) -> None:
    """Recompute on the CPU the non-persistent buffers (never saved) that the meta build left empty.

    They are computed at construction (rotary ``inv_freq``), so each owning
    module is constructed again on the CPU from its config, and its buffers
    (and tensor attributes such as ``original_inv_freq``) are taken from it.
    """
    for name, module in model.named_modules():
        empty = [b for b in module._non_persistent_buffers_set
                 if module._buffers.get(b) is not None and module._buffers[b].is_meta]
        if not empty:
            continue
        config = getattr(module, "config", None) or getattr(model, "config", None)
        try:
            with torch.device("cpu"):
                fresh = type(module)(config=config)
        except Exception as e:  # noqa: BLE001 - any constructor failure means: cannot rebuild
            raise CheckpointError(f"{directory}: cannot rebuild the non-saved buffers {empty} of {name!r} "
                                  f"({type(module).__name__}) after building the model on the meta device "
                                  f"({type(e).__name__}: {e}); pass model= to load_quantized") from e
        for b in empty:
            module._buffers[b] = fresh._buffers[b]
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.is_meta and isinstance(getattr(fresh, attr, None),
                                                                               torch.Tensor):
                setattr(module, attr, getattr(fresh, attr))

"""Build a transformers model from a config without allocating its weights.

Used by every loader that fills a model from files (our checkpoints, GPTQ
checkpoints, streaming quantization): the architecture comes from
``config.json``, the parameters are created on the meta device and assigned
from the files afterwards. Depends on torch and transformers only.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from torch import nn

from ..checkpoint.files import CheckpointError
from ..checkpoint.quantized import CONFIG_NAME

__all__ = ["build_transformers_model"]



@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device, buffers real.

    Parameters are all overwritten by the checkpoint, so allocating and
    randomly initialising them would only cost time and memory. Buffers stay
    real because some (rotary ``inv_freq``) are computed at construction and
    not saved (non-persistent): on meta they could never be recovered. This
    is what accelerate's ``init_empty_weights(include_buffers=False)`` does,
    without depending on accelerate. It patches ``nn.Module`` globally while
    active, so do not build other models concurrently in other threads.
    """
    old = nn.Module.register_parameter

    def register_parameter(self, name, param):
        old(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = old


def build_transformers_model(config: dict, directory: Path) -> nn.Module:
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
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{directory}: transformers cannot build a config of model_type {model_type!r} "
                              f"({e}); pass model=") from e
    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    with _parameters_on_meta():
        if cls is not None and hasattr(cls, "_from_config"):
            model = cls._from_config(hf_config)
        elif cls is not None:
            model = cls(hf_config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return model



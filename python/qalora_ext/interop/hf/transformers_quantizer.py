"""transformers' side: ``quant_method: "qalora_ext"`` as a registered quantization config and quantizer.

With these registered (``import qalora_ext`` does it, see ``interop/hf/__init__.py``),
``AutoModelForCausalLM.from_pretrained(folder)`` reads a folder written by
``save_quantized`` (``qalora quantize / merge / finetune / import``):

1. transformers builds the architecture on the meta device;
2. :meth:`QALoRAExtHfQuantizer._process_model_before_weight_loading` replaces
   every layer the checkpoint's module table names by an empty (meta)
   ``QuantLinear`` (or ``QALoRALinear`` when the folder holds an adapter),
   with the stored bits, group size and storage dtypes; shared layers are
   shared again;
3. transformers reads each tensor once into the model (codes, scales, zeros
   and biases are buffers whose meta dtypes are the stored ones, so
   ``dtype=`` casts only the float parts: embeddings, norms, float heads);
4. :meth:`_process_model_after_weight_loading` checks that every packed layer
   holds the storage dtypes its entry declares, freezes all but the adapters,
   and gives the model a ``save_pretrained`` that writes through
   :func:`qalora_ext.save_quantized` (atomic, hashed, bit for bit), so both
   ``from_pretrained`` and ``load_quantized`` read the folder back.

Only pre-quantized folders load this way (``requires_calibration``): quantize
a float model with ``qalora quantize`` / ``qalora_ext.loading.quantize``.
"""

from __future__ import annotations

import os
import types
from typing import Any, Optional

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ...checkpoint.files import CheckpointError, check_format_version, dtype_name
from ...checkpoint.quantized import QUANT_METHOD, save_quantized
from ...checkpoint.quantized import build_layer as _build_checkpoint_layer
from ...format import KNOWN_LAYOUTS
from ...model import freeze_all_but_adapters, set_module
from ...nn import QALoRALinear

__all__ = ["QALoRAExtConfig", "QALoRAExtHfQuantizer", "register", "build_layer"]


class QALoRAExtConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a qalora_ext folder, as transformers holds it.

    Every key of the stored dict is kept as an attribute (so ``to_dict()``
    writes back what was read); the constructor checks the format version, the
    packed layout and the module table, so a folder this version cannot read
    fails in ``from_pretrained`` with the reason instead of loading garbage.
    """

    def __init__(self, quant_method: str = QUANT_METHOD, format_version: Any = None, packed_layout: Any = None,
                 modules: Optional[dict] = None, tied: Optional[dict] = None, tied_modules: Optional[dict] = None,
                 **kwargs) -> None:
        self.quant_method = quant_method
        self.format_version = format_version
        self.packed_layout = packed_layout
        self.modules = modules
        self.tied = {} if tied is None else tied
        self.tied_modules = {} if tied_modules is None else tied_modules
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.post_init()

    def post_init(self) -> None:
        where = "quantization_config"
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"{where}: quant_method must be {QUANT_METHOD!r}; got {self.quant_method!r}")
        try:
            check_format_version(self.format_version, where)
        except CheckpointError as e:
            raise ValueError(str(e)) from None
        if self.packed_layout not in KNOWN_LAYOUTS:
            raise ValueError(f"{where}: packed_layout {self.packed_layout!r} is not known to this qalora_ext "
                             f"(known: {KNOWN_LAYOUTS}); upgrade qalora_ext")
        if not isinstance(self.modules, dict) or not self.modules:
            raise ValueError(f"{where}: modules must list the quantized layers (a non-empty object); "
                             f"got {self.modules!r}")
        if not isinstance(self.tied, dict) or not isinstance(self.tied_modules, dict):
            raise ValueError(f"{where}: tied and tied_modules must be objects")


def build_layer(name: str, entry: dict) -> nn.Module:
    """An empty (meta) layer shaped as a module-table ``entry``: ``load_quantized``'s own construction."""
    try:
        return _build_checkpoint_layer(name, entry)
    except CheckpointError as e:
        raise ValueError(f"quantization_config: {e}") from e


def _check_device_map(device_map) -> None:
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    for v in values:
        if isinstance(v, str) and v in ("disk", "meta"):
            raise ValueError(f"device_map: qalora_ext layers cannot be offloaded to {v!r}; use 'cpu', 'cuda' "
                             f"or a map onto devices (got {device_map!r})")


class QALoRAExtHfQuantizer(HfQuantizer):
    """Loads qalora_ext folders in ``from_pretrained``; says the model trains (adapters) and saves."""

    requires_calibration = True  # pre-quantized folders only: no quantize-on-load
    requires_parameters_quantization = False

    def validate_environment(self, *args, **kwargs) -> None:
        device_map = kwargs.get("device_map")
        if device_map is not None:
            _check_device_map(device_map)

    def _process_model_before_weight_loading(self, model, **kwargs):
        qc = self.quantization_config
        layers: dict[str, nn.Module] = {}
        for name, entry in qc.modules.items():
            try:
                current = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"quantization_config lists layer {name!r} but the {type(model).__name__} "
                                 f"built from config.json has no such module") from None
            if not isinstance(current, nn.Linear):
                raise ValueError(f"quantization_config: layer {name!r} is a {type(current).__name__} in the "
                                 f"model, expected nn.Linear")
            got = (current.in_features, current.out_features)
            want = (entry.get("in_features"), entry.get("out_features"))
            if got != want:
                raise ValueError(f"quantization_config: layer {name!r} has (in, out) features {want}, the model "
                                 f"{got}")
            layers[name] = build_layer(name, entry)
        for name, layer in layers.items():
            set_module(model, name, layer)
        for alias, source in qc.tied_modules.items():
            if source not in layers:
                raise ValueError(f"quantization_config: shared layer {alias!r} -> {source!r}: no such layer")
            set_module(model, alias, layers[source])
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        qc = self.quantization_config
        for name, entry in qc.modules.items():
            layer = model.get_submodule(name)
            base = layer.base if isinstance(layer, QALoRALinear) else layer
            got = (dtype_name(base.scale.dtype), dtype_name(base.zero.dtype))
            if got != (entry["scale_dtype"], entry["zero_dtype"]):
                raise ValueError(f"layer {name!r}: loaded scale/zero dtypes {got} differ from the stored "
                                 f"{(entry['scale_dtype'], entry['zero_dtype'])}")
            if base.bias is not None and base.bias.dtype != torch.float32:
                base.bias = base.bias.float()  # our bias buffer is float32 whatever dtype= says
        if any(isinstance(m, QALoRALinear) for m in model.modules()):
            freeze_all_but_adapters(model)
        install_save_pretrained(model)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def _save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None,
                     max_shard_size="2GB", safe_serialization: bool = True, push_to_hub: bool = False,
                     variant: Optional[str] = None, **kwargs):
    """``save_pretrained`` of a model with qalora_ext layers: :func:`qalora_ext.save_quantized` (atomic,
    sha256-recorded, bit for bit) plus the generation config, so ``from_pretrained`` and
    ``load_quantized`` both read the folder. ``state_dict`` is ignored: the model's own tensors are
    written (they are what the module table describes)."""
    if push_to_hub:
        raise ValueError("save_pretrained(push_to_hub=True) is not supported for qalora_ext models: save, then "
                         "upload the folder with huggingface_hub.upload_folder")
    if variant is not None:
        raise ValueError(f"save_pretrained: variant={variant!r} is not supported for qalora_ext models")
    if not safe_serialization:
        raise ValueError("save_pretrained: qalora_ext models are saved as safetensors only "
                         "(safe_serialization=True)")
    unknown = set(kwargs) - {"token", "save_peft_format", "save_original_format", "distributed_checkpoint"}
    if unknown:
        raise TypeError(f"save_pretrained: unexpected arguments for a qalora_ext model: {sorted(unknown)}")
    if not is_main_process:
        return None
    os.makedirs(save_directory, exist_ok=True)
    gen = getattr(self, "generation_config", None)
    if gen is not None and callable(getattr(self, "can_generate", None)) and self.can_generate():
        gen.save_pretrained(save_directory)  # before the weights: config.json, written last, marks completeness
    return save_quantized(self, save_directory, max_shard_size=max_shard_size)


def install_save_pretrained(model: nn.Module) -> nn.Module:
    """Give ``model`` (a transformers model holding qalora_ext layers) our ``save_pretrained``.

    transformers' own writes ``config.json`` before the shards and cannot
    record their hashes, so its folders would not pass ``load_quantized``'s
    integrity check; the instance method survives PEFT's ``merge_and_unload``
    (which returns the same model object).
    """
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    return model


def register() -> None:
    """Register the config and the quantizer under ``"qalora_ext"`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QALoRAExtConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QALoRAExtHfQuantizer)


register()  # importing this module registers (the import hook in interop/hf/__init__.py imports it)

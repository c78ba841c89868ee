"""Checkpoints on disk: durable files, quantized models, stand-alone adapters.

``files``      atomic directories, size + sha256 records, JSON, errors
``quantized``  :func:`save_quantized` / :func:`load_quantized` (SPEC "Checkpoints")
``adapter``    :func:`save_adapter` / :func:`load_adapter`
"""

from __future__ import annotations

from .adapter import ADAPTER_CONFIG_NAME, ADAPTER_PEFT_TYPE, ADAPTER_WEIGHTS_NAME, load_adapter, save_adapter
from .files import CheckpointError, parse_size
from .quantized import CONFIG_NAME, QUANT_METHOD, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, load_quantized, save_quantized

__all__ = [
    "save_quantized",
    "load_quantized",
    "save_adapter",
    "load_adapter",
    "CheckpointError",
    "parse_size",
    "QUANT_METHOD",
    "ADAPTER_PEFT_TYPE",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
]

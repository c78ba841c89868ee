"""Getting a model: where it comes from, building it, quantizing it while reading it.

``sources``             the default model, Hugging Face folders, ``.gguf`` files
                        (converted once into a cache), our checkpoints; tokenizers
``transformers_model``  a transformers architecture built from its config with
                        parameters on the meta device (no weights allocated)
``streaming``           quantize a float folder shard by shard (RTN or GPTQ)
"""

from __future__ import annotations

from .sources import (
    DEFAULT_MODEL_NAME,
    TESTED_FAMILIES,
    cache_dir,
    convert_gguf,
    default_model_folder,
    find_smollm2_gguf,
    is_quantized_checkpoint,
    load_model,
    load_tokenizer,
    read_model_config,
    resolve_model,
)
from .streaming import ShardReader, quantize, quantize_pretrained
from .transformers_model import build_transformers_model

__all__ = [
    "DEFAULT_MODEL_NAME",
    "TESTED_FAMILIES",
    "cache_dir",
    "convert_gguf",
    "default_model_folder",
    "find_smollm2_gguf",
    "is_quantized_checkpoint",
    "load_model",
    "load_tokenizer",
    "read_model_config",
    "resolve_model",
    "ShardReader",
    "quantize",
    "quantize_pretrained",
    "build_transformers_model",
]

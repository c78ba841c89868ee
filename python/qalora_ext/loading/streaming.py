"""Quantize a float model folder while reading it (streaming quantization).

The model is built with its parameters on the meta device and each tensor is
read from its safetensors shard only when its layer is reached, so peak memory
is the quantized model plus one layer's (RTN) or one decoder block's (GPTQ)
float weights, not the float model.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..format import check_bits, check_group_size
from ..model import quantization_targets, set_module
from ..nn import QuantLinear
from .sources import PathLike, check_family, is_quantized_checkpoint, load_tokenizer, read_model_config, resolve_model
from .transformers_model import build_transformers_model

__all__ = ["ShardReader", "quantize_pretrained", "quantize", "release_freed_memory"]


class ShardReader:
    """Reads single tensors from a folder's safetensors files (one file or an indexed set of shards).

    Each read opens the shard, copies the one tensor out and closes it, so no
    shard stays mapped and memory holds only what the caller keeps.
    """

    def __init__(self, folder: PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            with open(index) as f:
                self.files = {k: self.folder / v for k, v in json.load(f)["weight_map"].items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(os.fspath(single), framework="pt") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.folder} has no model.safetensors or model.safetensors.index.json "
                                    f"(only safetensors checkpoints can be quantized while streaming)")

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.files:
            raise ValueError(f"{self.folder}: no tensor {key!r} in the checkpoint "
                             f"(an incomplete checkpoint, or another architecture)")
        with safe_open(os.fspath(self.files[key]), framework="pt") as f:
            return f.get_tensor(key)


def _materialize(model: nn.Module, prefix: str, reader: ShardReader, dtype: torch.dtype,
                 skip: Callable[[str], bool] = lambda name: False) -> None:
    """Give every meta parameter and saved buffer under ``prefix`` its tensor from the checkpoint (assigned)."""
    root = model.get_submodule(prefix) if prefix else model
    for name, param in list(root.named_parameters(recurse=True)):
        full = f"{prefix}.{name}" if prefix else name
        if param.device.type != "meta" or skip(full):
            continue
        owner_name, _, attr = full.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        value = reader.get(full)
        if value.is_floating_point():
            value = value.to(dtype)
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    for name, buf in list(root.named_buffers(recurse=True)):
        full = f"{prefix}.{name}" if prefix else name
        owner_name, _, attr = full.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if buf.device.type != "meta" or skip(full) or attr in owner._non_persistent_buffers_set:
            continue
        value = reader.get(full)
        owner._buffers[attr] = value.to(dtype) if value.is_floating_point() else value


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise).

    Each layer's float weights are freed right after quantization, but glibc
    raises its mmap threshold after such frees and then keeps later blocks of
    that size in the heap: without a trim, resident memory grows like the
    float model even though nothing references it.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _tie_output_head(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and isinstance(out, nn.Linear):
        out.weight = inp.weight


def quantize_pretrained(
    model: Optional[PathLike] = None,
    bits: int = 4,
    group_size: int = 32,
    method: str = "rtn",
    scale_dtype: torch.dtype = torch.float16,
    zero_dtype: torch.dtype = torch.float32,
    target_modules=None,
    calibration: Optional[Sequence] = None,
    progress: bool = True,
    **gptq_options,
) -> nn.Module:
    """Quantize a float model folder layer by layer while reading it from its shards.

    The model is built with its parameters on the meta device. RTN reads each
    target layer's weight, quantizes it and drops the float copy before the
    next. GPTQ (``calibration``: input-id batches) works block by block: a
    decoder block's float weights are read just before it is calibrated and
    replaced by packed layers right after. Layers left unquantized (output
    head, layers whose in_features is not a multiple of ``group_size``, listed
    in a warning) are read as they are. Returns the quantized model, on CPU,
    in eval mode.
    """
    check_bits(bits)
    check_group_size(group_size)
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq'; got {method!r}")
    if method == "gptq" and not calibration:
        raise ValueError("method='gptq' needs calibration data (a list of input-id batches)")
    folder = resolve_model(model)
    if is_quantized_checkpoint(folder):
        raise ValueError(f"{folder} is already quantized by qalora_ext; quantize its float source instead")
    config = read_model_config(folder)
    check_family(config, folder)
    reader = ShardReader(folder)
    lm = build_transformers_model(config, folder)
    todo = _streaming_targets(lm, group_size, target_modules, folder)
    if method == "rtn":
        _quantize_rtn_streaming(lm, reader, todo, bits, group_size, scale_dtype, zero_dtype, progress)
    else:
        _quantize_gptq_streaming(lm, reader, todo, calibration, bits, group_size, scale_dtype, zero_dtype, progress,
                                 gptq_options)
    _tie_output_head(lm)
    left = [n for n, p in (*lm.named_parameters(), *lm.named_buffers()) if p.device.type == "meta"]
    if left:
        raise ValueError(f"{folder}: tensors missing from the checkpoint: {left[:5]}")
    lm.eval()
    return lm


def _streaming_targets(lm: nn.Module, group_size: int, target_modules, folder: Path) -> list[str]:
    """The layers to quantize; one warning lists those left float, an error when none fits the group size."""
    todo, skipped = quantization_targets(lm, group_size, target_modules)
    if not todo:
        widths = sorted({int(s.rpartition("=")[2].rstrip(")")) for s in skipped})
        raise ValueError(f"{folder}: no layer can be quantized with group_size={group_size}: the layers' "
                         f"in_features {widths} are not multiples of it; use a group size that divides them")
    if skipped:
        warnings.warn(
            f"{len(skipped)} of {len(todo) + len(skipped)} layers are left unquantized (float32) because their "
            f"in_features is not a multiple of group_size={group_size}: " + ", ".join(skipped), stacklevel=3)
    return todo


def _quantize_rtn_streaming(lm: nn.Module, reader: ShardReader, todo: list[str], bits: int, group_size: int,
                            scale_dtype: torch.dtype, zero_dtype: torch.dtype, progress: bool) -> None:
    """Each target's float weight is read, quantized and dropped before the next; then the rest is read."""
    from tqdm.auto import tqdm

    for name in tqdm(todo, desc=f"quantize INT{bits} G{group_size} (RTN)", disable=not progress or None):
        layer = lm.get_submodule(name)
        weight = reader.get(name + ".weight").to(torch.float32)
        bias = reader.get(name + ".bias").to(torch.float32) if layer.bias is not None else None
        q = QuantLinear(layer.in_features, layer.out_features, bits, group_size, bias is not None,
                        scale_dtype, zero_dtype, device="meta")
        packed, scale, zero = ops.quantize_rtn(weight, bits, group_size, scale_dtype, zero_dtype)
        q.load_packed(packed, scale, zero, bias)
        set_module(lm, name, q)
        del weight, bias, packed, scale, zero
        release_freed_memory()
    _materialize(lm, "", reader, torch.float32)


def _quantize_gptq_streaming(lm: nn.Module, reader: ShardReader, todo: list[str], calibration, bits: int,
                             group_size: int, scale_dtype: torch.dtype, zero_dtype: torch.dtype, progress: bool,
                             gptq_options: dict) -> None:
    """Everything outside the decoder blocks is read first; each block's float weights just before its turn."""
    from ..quantize.gptq import find_blocks, quantize_model_gptq

    blocks_name, _ = find_blocks(lm, todo)

    def in_blocks(name: str) -> bool:
        return bool(blocks_name) and name.startswith(blocks_name + ".")

    _materialize(lm, "", reader, torch.float32, skip=in_blocks)

    def before_block(index: int, block: nn.Module) -> None:
        release_freed_memory()
        _materialize(lm, f"{blocks_name}.{index}", reader, torch.float32)

    quantize_model_gptq(lm, calibration, bits=bits, group_size=group_size, scale_dtype=scale_dtype,
                        zero_dtype=zero_dtype, target_modules=sorted(todo), progress=progress,
                        before_block=before_block, **gptq_options)


def quantize(model: Optional[PathLike] = None, bits: int = 3, group_size: int = 32, method: str = "rtn",
             scale_dtype: torch.dtype = torch.float16, zero_dtype: torch.dtype = torch.float32,
             calib_samples: int = 128, calib_seq_len: int = 256, calib_text: Optional[str] = None,
             seed: int = 0, progress: bool = True):
    """Quantize a float model (default: SmolLM2) while reading it; returns ``(model, tokenizer, source folder)``."""
    folder = resolve_model(model)
    tokenizer = load_tokenizer(folder)
    calibration = None
    if method == "gptq":
        from ..quantize.calibration import calibration_batches

        calibration = calibration_batches(tokenizer, calib_text, calib_samples, calib_seq_len, seed=seed)
    lm = quantize_pretrained(folder, bits, group_size, method, scale_dtype, zero_dtype,
                             calibration=calibration, progress=progress)
    return lm, tokenizer, folder



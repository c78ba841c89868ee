"""Export a quantized (merged, or still adapted) model to MLX, in mlx-lm's folder layout.

MLX's affine quantization is the same arithmetic as ours, ``w = scale * q +
bias`` per group of ``G`` contiguous input channels, and (for bits 2, 3 and 4)
the same packing: each row of ``q`` is one little-endian bitstream in
``uint32`` words, code ``i`` at bits ``[b*i, b*i + b)`` of the row, so for
b = 3 codes 10, 21 straddle words exactly as in our layout 1. The only
difference on disk is that our rows are padded to a multiple of 4 words for
128-bit GPU loads; MLX rows are exactly ``K*b/32`` words. So the export
copies the codes bit for bit (dropping the padding words), and

* ``<layer>.weight``  uint32 (N, K*b/32): our codes, unchanged;
* ``<layer>.scales``  (N, K/G) in ``scale_dtype``: our scales (exact when
  representable, which they are when ours are already of that dtype), with
  a trained ``dscale`` folded in (``scale + dscale``, float64) and rounded
  ONCE to ``scale_dtype``;
* ``<layer>.biases``  (N, K/G) in ``scale_dtype``: our zeros, with any
  adapter and trained ``dzero`` folded in (``zero + dzero + s * (B @ A) / G``,
  float64) and rounded ONCE to ``scale_dtype``;
* ``<layer>.bias``    the linear bias, if the layer has one.

Worked example (b = 3, K = 64, G = 32, one row): our packed row has
``64*3/32 = 6`` code words plus 2 padding words (S = 8); the MLX row is the
first 6 words, ``scales`` and ``biases`` have 2 columns.

MLX keeps scales and biases in the model's float dtype (16 bits in practice;
MLX 0.32 accepts float32 too, and then biases hold our float32 zeros
exactly). A merged adapter is a small shift of each zero, so 16-bit biases
can round much of it away: the export measures that (SPEC "Merge": the lost
fraction ``||zero16 - zero - delta|| / ||delta||``) when it is given a model
that still holds its ``QALoRALinear`` adapters, and warns above 1%. Given an
already merged model the adapter is unknown, so it reports the weight change
caused by rounding the zeros instead.

Everything that is not a quantized layer (embeddings, norms, a float output
head) is written as it is, cast to ``dtype``. ``config.json`` is the model's
transformers config plus mlx-lm's ``"quantization"`` block: the most common
``bits`` / ``group_size``, a per-layer ``{"group_size", "bits", "mode"}`` for
layers that differ, and ``false`` for every float linear / embedding layer, so
mlx-lm's loader quantizes exactly the layers we quantized (it would also infer
that from which ``.scales`` tensors exist; the explicit entries keep loaders
that do not infer correct).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..checkpoint.files import atomic_directory, dtype_name, fsync_dir, hash_file, parse_size, write_json
from ..checkpoint.quantized import CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, model_config_dict, plan_shards
from ..format import LAYOUT_CANONICAL, KNOWN_LAYOUTS, round_to_storage
from ..model import quantized_layers
from ..nn import MERGE_WARN_FRACTION, QALoRALinear, QuantLinear

__all__ = [
    "export_mlx",
    "MLXExportReport",
    "MLX_SUPPORTED_MODEL_TYPES",
    "MLX_STORAGE_DTYPES",
    "mlx_packed",
]

MLX_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
"""transformers model types whose tensor names mlx-lm's model classes use as they are."""

MLX_STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

MLX_MAX_SHARD_SIZE = "5GB"  # mlx-lm's own shard limit (MAX_FILE_SIZE_GB)

_SAFETENSORS_METADATA = {"format": "mlx"}
_SHARD_RE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
_HEAD = "lm_head.weight"

# What a tokenizer (and generation defaults) may be made of; copied when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)
_TOKENIZER_GLOBS = ("*.tiktoken",)

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class MLXExportReport:
    """What :func:`export_mlx` wrote and what the 16-bit storage cost.

    ``lost_fraction``: fraction of the merged adapters lost to rounding the
    biases (SPEC's measure, over all adapted layers together), ``None`` when
    the model held no adapters (a merged model: the adapter is not known).
    ``zero_rounding_error``: ``||W_mlx - W~|| / ||W~||`` over all quantized
    weights, ``W~`` our weights with adapters merged in float64.
    ``max_weight_change``: ``max |W_mlx - W~|`` over the same weights.
    """

    path: Path
    tensors: int
    bytes: int
    files: dict
    quantized_layers: int
    adapter_layers: int
    bits: int
    group_size: int
    scale_dtype: str
    dtype: str
    lost_fraction: Optional[float]
    lost_fraction_per_layer: dict = field(default_factory=dict)
    zero_rounding_error: float = 0.0
    max_weight_change: float = 0.0
    inexact_scales: int = 0
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"MLX export: {self.path}",
            f"  {self.tensors} tensors, {self.bytes / 1e6:.2f} MB in {len(self.files)} file(s); "
            f"{self.quantized_layers} quantized layers (default INT{self.bits} G{self.group_size}), "
            f"scales/biases {self.scale_dtype}, other tensors {self.dtype}",
        ]
        if self.lost_fraction is None:
            lines.append("  adapter lost to bias rounding: unknown (merged model; export the unmerged model, or "
                         "pass --adapter, to measure it)")
        else:
            lines.append(f"  adapter lost to bias rounding: {100 * self.lost_fraction:.3f}% "
                         f"over {self.adapter_layers} adapted layers")
        lines.append(f"  weight change from rounding to {self.scale_dtype}: relative {self.zero_rounding_error:.3g}, "
                     f"max abs {self.max_weight_change:.3g}"
                     + (f"; {self.inexact_scales} scales not representable" if self.inexact_scales else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _storage_dtype(dtype: Any, what: str) -> torch.dtype:
    if isinstance(dtype, str) and dtype in MLX_STORAGE_DTYPES:
        return MLX_STORAGE_DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in MLX_STORAGE_DTYPES.values():
        return dtype
    raise ValueError(f"{what} must be 'float16', 'bfloat16' or 'float32' (or the torch dtype); got {dtype!r}")


def mlx_packed(layer: QuantLinear) -> torch.Tensor:
    """The layer's codes in MLX's packing: uint32 (N, K*b/32), our row bitstream without its padding."""
    if layer.layout != LAYOUT_CANONICAL:
        raise ValueError(f"packed layout {layer.layout} is not the canonical layout {LAYOUT_CANONICAL} "
                         f"({KNOWN_LAYOUTS[LAYOUT_CANONICAL]}); repack it first")
    words = layer.in_features * layer.bits // 32
    return layer.packed[:, :words].detach().to("cpu").contiguous().view(torch.uint32)


def _round(x64: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    # round_to_storage saturates at the largest finite value; IEEE (and MLX) would give inf: refuse.
    big = x64.abs().max().item() if x64.numel() else 0.0
    if not math.isfinite(big) or big > torch.finfo(dtype).max:
        raise ValueError(f"{what}: values overflow {dtype_name(dtype)} (largest |value| {big:.6g}, the largest "
                         f"{dtype_name(dtype)} is {torch.finfo(dtype).max:.6g}); export with scale_dtype='float32'")
    return round_to_storage(x64, dtype)


def _find_tokenizer_files(folder: Path) -> list[Path]:
    found = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    for pattern in _TOKENIZER_GLOBS:
        found += sorted(p for p in folder.glob(pattern) if p.is_file())
    return found


def _own_file(fname: str) -> bool:
    """Files of a previous export that a new one replaces (anything else in ``out_dir`` is kept)."""
    return (fname in (CONFIG_NAME, WEIGHTS_INDEX_NAME) or _SHARD_RE.fullmatch(fname) is not None
            or fname in TOKENIZER_FILES)


def _mlx_config(model: nn.Module, quantization: dict, tied: bool, dtype: torch.dtype) -> dict:
    config = model_config_dict(model)
    if config is None:
        raise ValueError("export_mlx: the model has no transformers config (model.config); mlx-lm needs config.json "
                         "to rebuild the architecture")
    config = dict(config)
    for key in ("quantization_config", "quantization", "_name_or_path"):
        config.pop(key, None)
    # transformers >= 5 keeps rope_theta / scaling inside rope_parameters; mlx-lm reads the flat keys (and
    # each mlx-lm model class has its own default theta, so a missing key silently changes the model).
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" not in config and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    config["tie_word_embeddings"] = bool(tied)
    config["dtype" if "dtype" in config else "torch_dtype"] = dtype_name(dtype)
    config["quantization"] = quantization
    config["quantization_config"] = quantization  # mlx-lm writes both (Hugging Face's model tree reads the second)
    return dict(sorted(config.items()))


def _check_architecture(model: nn.Module, layers: dict[str, nn.Module]) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MLX_SUPPORTED_MODEL_TYPES:
        raise ValueError(f"export_mlx: model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(MLX_SUPPORTED_MODEL_TYPES)}: architectures whose tensor names mlx-lm uses as "
                         f"they are)")
    # Every module holding saved tensors must be one mlx-lm's classes know how to read.
    inside = tuple(n + "." for n in layers)
    for name, m in model.named_modules():
        if name in layers or name.startswith(inside):
            continue
        own = [k for k, v in m._parameters.items() if v is not None]
        own += [k for k, v in m._buffers.items() if v is not None and k not in m._non_persistent_buffers_set]
        if not own:
            continue
        cls = type(m).__name__
        if isinstance(m, (nn.Linear, nn.Embedding)) or cls.endswith("RMSNorm"):
            if type(m) is not nn.Linear and isinstance(m, nn.Linear):
                raise ValueError(f"export_mlx: layer {name!r} is a {cls} (a subclass of nn.Linear that MLX does "
                                 f"not know); merge or remove it before exporting")
            continue
        raise ValueError(f"export_mlx: layer {name!r} ({cls}) holds tensors {own} that mlx-lm's {model_type} model "
                         f"has no place for; only quantized linears, nn.Linear, nn.Embedding and RMSNorm layers "
                         f"can be exported")
    return model_type


def _output_head_tied(model: nn.Module) -> bool:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_in) or not callable(get_out):
        return False
    emb, head = get_in(), get_out()
    return (isinstance(head, nn.Linear) and isinstance(emb, nn.Embedding)
            and head.weight.data_ptr() == emb.weight.data_ptr() and head.weight.shape == emb.weight.shape)


def _quantization_block(layers: dict[str, nn.Module]) -> tuple[tuple[int, int], dict]:
    """mlx-lm's ``"quantization"``: the most common ``(bits, group_size)`` as default, the others per layer."""
    bases = {n: (m.base if isinstance(m, QALoRALinear) else m) for n, m in layers.items()}
    common = Counter((b.bits, b.group_size) for b in bases.values()).most_common(1)[0][0]
    quantization: dict[str, Any] = {"group_size": common[1], "bits": common[0], "mode": "affine"}
    for n, b in bases.items():
        if (b.bits, b.group_size) != common:
            quantization[n] = {"group_size": b.group_size, "bits": b.bits, "mode": "affine"}
    return common, quantization


def _tokenizer_source(model: nn.Module, tokenizer: Any) -> tuple[list[Path], Any]:
    """``(files to copy, object to save_pretrained)``, decided before anything is written (bad arguments fail early)."""
    if tokenizer is None:
        src = getattr(getattr(model, "config", None), "_name_or_path", None)
        return (_find_tokenizer_files(Path(src)) if src and os.path.isdir(src) else []), None
    if isinstance(tokenizer, (str, os.PathLike)):
        folder = Path(tokenizer)
        if not folder.is_dir():
            raise ValueError(f"export_mlx: tokenizer folder {folder} does not exist")
        tok_files = _find_tokenizer_files(folder)
        if not tok_files:
            raise ValueError(f"export_mlx: no tokenizer files in {folder} (looked for {', '.join(TOKENIZER_FILES)})")
        return tok_files, None
    if callable(getattr(tokenizer, "save_pretrained", None)):
        return [], tokenizer
    raise ValueError(f"export_mlx: tokenizer must be a folder or an object with save_pretrained; got "
                     f"{type(tokenizer).__name__}")


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------


@torch.no_grad()
def _export_layer(name: str, m: nn.Module, sdt: torch.dtype, fdt: torch.dtype) -> tuple[dict, dict]:
    """MLX tensors of one quantized layer, and its error statistics (all float64)."""
    base = m.base if isinstance(m, QALoRALinear) else m
    G = base.group_size
    zero = base.zero.detach().to("cpu", torch.float64)
    scale = base.scale.detach().to("cpu", torch.float64)
    delta = m.zero_delta().cpu() if isinstance(m, QALoRALinear) else None
    dscale = m.scale_delta() if isinstance(m, QALoRALinear) else None
    exact_zero = zero if delta is None else zero + delta
    if dscale is not None:
        dscale = dscale.cpu()
        scale = scale + dscale  # the merged scale (SPEC), rounded once below like the biases
    scales = _round(scale, sdt, f"{name}.scales")
    biases = _round(exact_zero, sdt, f"{name}.biases")
    tensors = {f"{name}.weight": mlx_packed(base), f"{name}.scales": scales, f"{name}.biases": biases}
    if base.bias is not None:
        tensors[f"{name}.bias"] = base.bias.detach().to("cpu", torch.float64).to(fdt)

    codes = base.codes().to("cpu", torch.float64)
    ds = (scales.double() - scale).repeat_interleave(G, dim=1)
    dz = (biases.double() - exact_zero).repeat_interleave(G, dim=1)
    change = ds * codes + dz
    ref = scale.repeat_interleave(G, dim=1) * codes + exact_zero.repeat_interleave(G, dim=1)
    stats = {
        "change_sq": change.square().sum().item(),
        "ref_sq": ref.square().sum().item(),
        "max_change": change.abs().max().item(),
        "inexact_scales": int((scales.double() != scale).sum().item()),
        "adapter": delta is not None,
    }
    if delta is not None and dscale is None:
        stats["lost_sq"] = (biases.double() - zero - delta).square().sum().item()
        stats["delta_sq"] = delta.square().sum().item()
    elif delta is not None:
        # Weight space (SPEC): a scale error counts times q. Divided by G to stay in the zeros'
        # units that the other layers add up in.
        trained = dscale.repeat_interleave(G, dim=1) * codes + delta.repeat_interleave(G, dim=1)
        stats["lost_sq"] = change.square().sum().item() / G
        stats["delta_sq"] = trained.square().sum().item() / G
    return tensors, stats


def _float_tensors(model: nn.Module, layers: dict[str, nn.Module], tied: bool, fdt: torch.dtype,
                   model_type: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every other state-dict tensor cast to ``fdt``, in state-dict order; and the float linear/embedding layers."""
    prefixes = tuple(n + "." for n in layers)
    tensors: dict[str, torch.Tensor] = {}
    unquantized: list[str] = []
    for key, t in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        if tied and key == _HEAD:
            continue  # mlx-lm uses the embedding as the head (tie_word_embeddings)
        if not t.is_floating_point():
            raise ValueError(f"export_mlx: tensor {key!r} is {t.dtype}, not a float tensor; mlx-lm's {model_type} "
                             f"model has no place for it")
        if t.is_meta:
            raise ValueError(f"export_mlx: tensor {key!r} is on the meta device (never loaded)")
        out = t.detach().to("cpu").to(fdt).contiguous()
        if not torch.isfinite(out).all() and torch.isfinite(t).all():
            raise ValueError(f"export_mlx: tensor {key!r} overflows {dtype_name(fdt)}; export with dtype='float32'")
        tensors[key] = out
        mod, _, leaf = key.rpartition(".")
        if leaf == "weight" and isinstance(model.get_submodule(mod), (nn.Linear, nn.Embedding)):
            unquantized.append(mod)
    if not tied and _HEAD not in tensors and "lm_head" not in layers:
        raise ValueError("export_mlx: the model's output head is not tied to the embedding and there is no "
                         "'lm_head' to write; mlx-lm's model needs one or the other")
    return tensors, unquantized


# ---------------------------------------------------------------------------
# Measures
# ---------------------------------------------------------------------------


def _adapter_loss(stats: dict[str, dict]) -> tuple[Optional[float], dict[str, float], int]:
    """``(lost fraction over all adapted layers or None, per layer, adapted layers)`` (SPEC "Merge")."""
    adapted = {n: s for n, s in stats.items() if s["adapter"]}
    if not adapted:
        return None, {}, 0
    per_layer = {n: 0.0 if s["delta_sq"] == 0.0 else math.sqrt(s["lost_sq"] / s["delta_sq"])
                 for n, s in adapted.items()}
    d = sum(s["delta_sq"] for s in adapted.values())
    lost = 0.0 if d == 0.0 else math.sqrt(sum(s["lost_sq"] for s in adapted.values()) / d)
    return lost, per_layer, len(adapted)


def _note_and_warn(notes: list[str], lost: Optional[float], per_layer: dict[str, float], inexact: int,
                   weight_change: float, sdt: torch.dtype) -> None:
    """Notes for the report; warnings (at export_mlx's caller) above MERGE_WARN_FRACTION."""
    if lost is None:
        notes.append("the model holds no adapters (merged): the fraction of the adapter lost to rounding the "
                     "biases cannot be known without it; zero_rounding_error is the weight change instead")
    if inexact:
        notes.append(f"{inexact} scales are not representable in {dtype_name(sdt)} and were rounded")
    if lost is not None and lost > MERGE_WARN_FRACTION:
        worst = max(per_layer, key=per_layer.get)
        warnings.warn(
            f"export_mlx: {100 * lost:.2f}% of the merged adapters is lost rounding the biases to "
            f"{dtype_name(sdt)} (worst layer {worst}: {100 * per_layer[worst]:.2f}%); export with "
            f"scale_dtype='float32' to keep it", stacklevel=3)
    if weight_change > MERGE_WARN_FRACTION:
        warnings.warn(f"export_mlx: rounding scales and biases to {dtype_name(sdt)} changes the weights by "
                      f"{100 * weight_change:.2f}% (relative norm)", stacklevel=3)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _write_folder(target: Path, tensors: dict[str, torch.Tensor], shards: list[list[str]], tok_files: list[Path],
                  tok_object: Any, config: dict) -> dict[str, dict]:
    """Write the folder atomically (config.json last); returns ``{file name: size and sha256}``."""
    from safetensors.torch import save_file

    for f in tok_files:
        if Path(os.path.realpath(f.parent)) == target:
            raise ValueError(f"export_mlx: out_dir {target} is the folder the tokenizer is read from; export to a "
                             f"new folder")
    files: dict[str, dict] = {}
    with atomic_directory(target, _own_file) as tmp:
        weight_map: dict[str, str] = {}
        for i, keys in enumerate(shards):
            fname = WEIGHTS_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in keys}, str(tmp / fname), metadata=dict(_SAFETENSORS_METADATA))
            files[fname] = hash_file(tmp / fname, fsync=True)
            weight_map.update(dict.fromkeys(keys, fname))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            files[WEIGHTS_INDEX_NAME] = write_json(tmp / WEIGHTS_INDEX_NAME, index)
        for f in tok_files:
            if (tmp / f.name).exists():
                (tmp / f.name).unlink()
            shutil.copy2(f, tmp / f.name)
            files[f.name] = hash_file(tmp / f.name, fsync=True)
        if tok_object is not None:
            before = set(os.listdir(tmp))
            tok_object.save_pretrained(str(tmp))
            for fname in sorted(set(os.listdir(tmp)) - before):
                files[fname] = hash_file(tmp / fname, fsync=True)
        files[CONFIG_NAME] = write_json(tmp / CONFIG_NAME, config)  # last: marks a complete folder
        fsync_dir(tmp)
    return files


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def export_mlx(
    model: nn.Module,
    out_dir: PathLike,
    *,
    tokenizer: Any = None,
    scale_dtype: Union[str, torch.dtype] = "float16",
    dtype: Union[str, torch.dtype, None] = None,
    max_shard_size: Union[int, str] = MLX_MAX_SHARD_SIZE,
    progress: bool = True,
) -> MLXExportReport:
    """Write ``model`` (a quantized transformers causal LM) as an mlx-lm model folder at ``out_dir``.

    ``model`` may hold ``QALoRALinear`` adapters: they are merged into the
    exported biases in float64 (the model itself is not changed) and the
    fraction of each adapter lost to rounding is measured exactly. A merged
    model (only ``QuantLinear``) is exported as it is.

    ``tokenizer``: a folder to copy the tokenizer files from, or an object
    with ``save_pretrained`` (a transformers tokenizer); ``None`` looks in the
    folder named by ``model.config._name_or_path`` and warns when it finds
    none (``mlx_lm.load`` needs them). ``scale_dtype``: of MLX's scales and
    biases, ``"float16"`` (default), ``"bfloat16"`` or ``"float32"`` (exact
    zeros; MLX accepts it, at twice the bytes of metadata). ``dtype``: of
    every other float tensor, default ``scale_dtype``. The folder is written
    into a hidden sibling and renamed into place at the end; an existing
    ``out_dir`` is replaced (files in it that the export does not write are
    kept). Returns an :class:`MLXExportReport`.

    Raises ``ValueError`` for architectures mlx-lm's classes do not name as
    transformers does, layers it has no place for, a model without quantized
    layers, and scales or biases that overflow ``scale_dtype``.
    """
    sdt = _storage_dtype(scale_dtype, "scale_dtype")
    fdt = sdt if dtype is None else _storage_dtype(dtype, "dtype")
    limit = parse_size(max_shard_size)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("export_mlx: the model has no QuantLinear layer; quantize it first (quantize_model / "
                         "quantize_pretrained)")
    model_type = _check_architecture(model, layers)
    tied = _output_head_tied(model)
    common, quantization = _quantization_block(layers)
    tok_files, tok_object = _tokenizer_source(model, tokenizer)
    notes: list[str] = []
    if not tok_files and tok_object is None:
        msg = "no tokenizer files were found to copy; mlx_lm.load needs them (pass tokenizer=FOLDER)"
        notes.append(msg)
        warnings.warn(f"export_mlx: {msg}", stacklevel=2)

    # Tensors: quantized layers first (converted), then everything else in state-dict order.
    from tqdm.auto import tqdm

    tensors: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    for name in tqdm(list(layers), desc=f"export MLX ({dtype_name(sdt)})", disable=not progress or None,
                     leave=False):
        tensors_of_layer, stats[name] = _export_layer(name, layers[name], sdt, fdt)
        tensors.update(tensors_of_layer)
    float_tensors, unquantized = _float_tensors(model, layers, tied, fdt, model_type)
    tensors.update(float_tensors)
    quantization.update(dict.fromkeys(unquantized, False))  # keep them float where a loader would quantize
    config = _mlx_config(model, quantization, tied, fdt)

    change_sq = sum(s["change_sq"] for s in stats.values())
    ref_sq = sum(s["ref_sq"] for s in stats.values())
    weight_change = 0.0 if not ref_sq else math.sqrt(change_sq / ref_sq)
    lost, per_layer, adapter_layers = _adapter_loss(stats)
    inexact = sum(s["inexact_scales"] for s in stats.values())
    _note_and_warn(notes, lost, per_layer, inexact, weight_change, sdt)

    target = Path(os.path.realpath(os.fspath(out_dir)))
    files = _write_folder(target, tensors, plan_shards(tensors, limit), tok_files, tok_object, config)
    return MLXExportReport(
        path=target, tensors=len(tensors), bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        files=files, quantized_layers=len(layers), adapter_layers=adapter_layers, bits=common[0],
        group_size=common[1], scale_dtype=dtype_name(sdt), dtype=dtype_name(fdt), lost_fraction=lost,
        lost_fraction_per_layer=per_layer, zero_rounding_error=weight_change,
        max_weight_change=max((s["max_change"] for s in stats.values()), default=0.0), inexact_scales=inexact,
        notes=notes,
    )

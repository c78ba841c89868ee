"""Quantized model checkpoints (SPEC "Checkpoints"): :func:`save_quantized`, :func:`load_quantized`.

A quantized checkpoint is a directory laid out the way Hugging Face lays out
its own (``config.json``, ``model.safetensors`` or ``model-0000i-of-0000n``
shards with ``model.safetensors.index.json``), so the usual tools can list,
copy and upload it. ``config.json`` carries a ``quantization_config`` whose
``quant_method`` is ``"qalora_ext"``: its module table is what lets a loader
build the packed layers before any tensor is read.

Three properties matter more than speed here:

* Atomicity. A checkpoint is written into a hidden sibling directory and
  renamed into place only once complete, with ``config.json`` written last
  inside it (:func:`.files.atomic_directory`). An exception or Ctrl-C
  mid-save leaves the previous checkpoint (or nothing) at the target, never a
  mix of old and new shards.
* Integrity. ``config.json`` records every file's size and sha256; loading
  checks them first, so a truncated upload or a flipped bit is reported by
  file name instead of surfacing as garbage logits.
* Exactness. Packed codes, scales, zeros and adapters are stored bit for bit
  in their storage dtypes; a load gives back a model whose outputs are
  identical to the saved one's.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ..format import FORMAT_VERSION_TRAINABLE_QUANT, KNOWN_LAYOUTS, LAYOUT_CANONICAL
from ..model import freeze_all_but_adapters, quantized_layers, set_module
from ..nn import QALoRALinear, QuantLinear
from .files import (
    CheckpointError,
    PathLike,
    atomic_directory,
    check_format_version,
    dtype_from_name,
    dtype_name,
    library_version,
    missing_dir_hint,
    parse_size,
    read_json,
    save_tensors,
    short_list,
    verify_files,
    write_json,
)

__all__ = [
    "QUANT_METHOD",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "save_quantized",
    "load_quantized",
    "quantized_modules",
    "adapter_entry",
    "adapter_flags",
    "format_version_for",
    "model_config_dict",
    "plan_shards",
    "build_layer",
    "save_model",
]

QUANT_METHOD = "qalora_ext"

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    try:
        set_module(model, name, new)
    except AttributeError as e:
        raise CheckpointError(f"the model has no parent module for layer {name!r}: "
                              f"is it the same architecture as the checkpoint?") from e


def _get_module(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# ---------------------------------------------------------------------------
# Model inspection
# ---------------------------------------------------------------------------


def quantized_modules(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``({name: QuantLinear or QALoRALinear}, {alias name: source name})``.

    A ``QuantLinear`` inside a ``QALoRALinear`` is described by the wrapper
    (one entry per layer, with its adapter). A layer object registered under
    two names (shared weights) is recorded once plus an alias, so a load can
    share it again instead of building two.
    """
    modules = quantized_layers(model)
    if "" in modules:
        raise ValueError("the model itself is a quantized layer; save a module that contains it")
    first = {id(m): n for n, m in modules.items()}
    tied: dict[str, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in first and name != first[id(m)]:
            tied[name] = first[id(m)]
    return modules, tied


def _module_entry(m: nn.Module) -> dict:
    base = m.base if isinstance(m, QALoRALinear) else m
    if base.layout != LAYOUT_CANONICAL:
        raise ValueError(f"layer uses packed layout {base.layout}; only the canonical layout {LAYOUT_CANONICAL} "
                         f"({KNOWN_LAYOUTS[LAYOUT_CANONICAL]}) is written to disk: repack it first")
    entry = {
        "bits": base.bits,
        "group_size": base.group_size,
        "in_features": base.in_features,
        "out_features": base.out_features,
        "bias": base.bias is not None,
        "scale_dtype": dtype_name(base.scale.dtype),
        "zero_dtype": dtype_name(base.zero.dtype),
        "layout": base.layout,
        "adapter": None,
    }
    if isinstance(m, QALoRALinear):
        entry["adapter"] = adapter_entry(m)
    return entry


def adapter_entry(m: QALoRALinear) -> dict:
    """One adapted layer's hyper-parameters as checkpoints record them (rank 0: no lora_A / lora_B;
    ``train_scale`` / ``train_zero``: the layer also holds float32 ``dscale`` / ``dzero``)."""
    return {
        "rank": m.rank,
        "alpha": m.alpha,
        "dropout": m.dropout,
        "use_rslora": m.use_rslora,
        "scaling": m.scaling,
        "pooling": "mean",
        "train_scale": m.train_scale,
        "train_zero": m.train_zero,
    }


def format_version_for(layers) -> int:
    """The lowest format version that holds ``layers`` (QuantLinear / QALoRALinear modules): version 1
    unless one has ``dscale`` / ``dzero`` or rank 0, which a version-1 reader would misread."""
    for m in layers:
        if isinstance(m, QALoRALinear) and (m.rank == 0 or m.train_scale or m.train_zero):
            return FORMAT_VERSION_TRAINABLE_QUANT
    return 1


def adapter_flags(ad: dict, where: str) -> tuple[bool, bool]:
    """``(train_scale, train_zero)`` of a recorded adapter entry (absent: False, as written before they existed)."""
    flags = []
    for key in ("train_scale", "train_zero"):
        v = ad.get(key, False)
        if not isinstance(v, bool):
            raise CheckpointError(f"{where}: {key} must be true or false; got {v!r}")
        flags.append(v)
    return flags[0], flags[1]


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor kept once, plus ``{alias: source}``.

    Tied embeddings / lm_head are one tensor under two names; safetensors
    refuses to write shared memory and writing it twice would double the file
    and untie it on load. The first name in state-dict order is the source.
    """
    unique: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"cannot save {key!r}: it is a {type(t).__name__} (extra state), and safetensors "
                             f"holds only tensors")
        if t.is_meta:
            raise ValueError(f"cannot save {key!r}: it is on the meta device (never loaded)")
        if t.numel():
            sig = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if sig in seen:
                tied[key] = seen[sig]
                continue
            seen[sig] = key
        unique[key] = t
    return unique, tied


def plan_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Greedy, in state-dict order, as Hugging Face does; a tensor larger than
    the limit gets a shard of its own rather than an error."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def model_config_dict(model: nn.Module) -> Optional[dict]:
    """The transformers config of ``model`` as a JSON-ready dict, or None."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        return None
    to_json = getattr(config, "to_json_string", None)
    if callable(to_json):
        try:
            d = json.loads(to_json(use_diff=False))
        except TypeError:
            d = config.to_dict()
    else:
        d = config.to_dict()
    d = dict(d)
    # save_pretrained records the class so a loader can rebuild the right head.
    if not d.get("architectures"):
        d["architectures"] = [type(model).__name__]
    return d


# ---------------------------------------------------------------------------
# save_quantized / load_quantized
# ---------------------------------------------------------------------------


def _own_model_file(name: str) -> bool:
    return name in (CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME) or _SHARD_RE.fullmatch(name) is not None


def save_quantized(model: nn.Module, directory: PathLike, max_shard_size: Union[int, str] = "2GB") -> Path:
    """Save a quantized model (with or without adapters) as a checkpoint directory.

    The whole state dict is saved, not only the quantized layers, so the
    directory is a complete model: embeddings, norms and float heads included.
    The module table in ``quantization_config`` is what lets a loader build the
    packed layers before any tensor is read (their shapes are not those of the
    float layers they replace). Files already in ``directory`` that are not
    ours (a tokenizer, a README) are kept; our own stale shards are not.

    Returns the checkpoint's path.
    """
    return _save(model, directory, max_shard_size)


def _save(model: nn.Module, directory: PathLike, max_shard_size: Union[int, str], tokenizer=None) -> Path:
    """save_quantized, plus ``tokenizer.save_pretrained`` written into the same atomic directory."""
    limit = parse_size(max_shard_size)
    modules, tied_modules = quantized_modules(model)
    if not modules:
        raise ValueError("save_quantized: the model has no QuantLinear layer; call quantize_model first "
                         "(use save_pretrained / torch.save for a float model)")
    entries = {}
    for name, m in modules.items():
        try:
            entries[name] = _module_entry(m)
        except ValueError as e:
            raise ValueError(f"save_quantized: {name}: {e}") from e
    tensors, tied = _unique_state(model)
    qconfig = _quantization_config(entries, tied, tied_modules, format_version_for(modules.values()))
    model_config = model_config_dict(model)
    with atomic_directory(directory, _own_model_file) as tmp:
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp)
        qconfig["files"] = _write_shards(tensors, plan_shards(tensors, limit), tmp, _layer_metadata(entries))
        config = dict(model_config) if model_config is not None else {}
        config["quantization_config"] = qconfig
        write_json(tmp / CONFIG_NAME, config)  # last: its presence marks a complete checkpoint
    return Path(os.path.realpath(os.fspath(directory)))


def _write_tokenizer(tokenizer, tmp: Path) -> None:
    """The tokenizer's files into the atomic directory ``tmp``, replacing those carried over from the old folder.

    Carried-over files are hard links to the old folder's: writing into them
    would change the old version in place. So the tokenizer is saved into a
    fresh subfolder of ``tmp`` (removed with it if the save dies) and its files
    are renamed over the links.
    """
    staging = tmp / ".qalora-tokenizer"
    staging.mkdir()
    tokenizer.save_pretrained(os.fspath(staging))
    for name in sorted(os.listdir(staging)):
        dst = tmp / name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        elif os.path.lexists(dst):
            dst.unlink()
        os.rename(staging / name, dst)
    staging.rmdir()


def _quantization_config(entries: dict, tied: dict, tied_modules: dict, format_version: int) -> dict:
    def uniform(key):
        values = {e[key] for e in entries.values()}
        return values.pop() if len(values) == 1 else None

    return {
        "quant_method": QUANT_METHOD,
        "format_version": format_version,
        "library_version": library_version(),
        "bits": uniform("bits"),
        "group_size": uniform("group_size"),
        "scale_dtype": uniform("scale_dtype"),
        "zero_dtype": uniform("zero_dtype"),
        "packed_layout": LAYOUT_CANONICAL,
        "packed_layout_name": KNOWN_LAYOUTS[LAYOUT_CANONICAL],
        "modules": entries,
        "tied": tied,
        "tied_modules": tied_modules,
    }


# The packed layers' bits, group size and layout are also written into every
# weights file's safetensors metadata, so that an edited config.json (3 bits
# changed to 4, say) cannot silently reinterpret the codes.
_LAYERS_METADATA_KEY = "qalora_ext.layers"


def _layer_metadata(entries: dict) -> dict[str, str]:
    table = {name: [e["bits"], e["group_size"], e["layout"]] for name, e in entries.items()}
    return {_LAYERS_METADATA_KEY: json.dumps(table, sort_keys=True, separators=(",", ":"))}


def _check_layer_metadata(path: Path, metadata: Optional[dict], modules: dict) -> None:
    """The weights file's record of each packed layer agrees with config.json (files without it pass)."""
    raw = (metadata or {}).get(_LAYERS_METADATA_KEY)
    if raw is None:
        return  # written before the record existed
    try:
        table = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable {_LAYERS_METADATA_KEY} metadata ({e})") from e
    for name, entry in modules.items():
        stored = table.get(name)
        want = [entry.get("bits"), entry.get("group_size"), entry.get("layout")]
        if stored is not None and list(stored) != want:
            raise CheckpointError(
                f"{path}: layer {name!r} was written with bits={stored[0]}, group_size={stored[1]}, "
                f"layout={stored[2]} but config.json says bits={want[0]}, group_size={want[1]}, layout={want[2]}; "
                f"the config was edited or belongs to another checkpoint")


def _write_shards(tensors: dict, shards: list[list[str]], tmp: Path, metadata: dict) -> dict[str, dict]:
    """The weight files (one, or shards with an index) in ``tmp``; returns their size/sha256 records."""
    files: dict[str, dict] = {}
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(shards):
        fname = WEIGHTS_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        files[fname] = save_tensors({k: tensors[k] for k in keys}, tmp / fname, metadata)
        weight_map.update(dict.fromkeys(keys, fname))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        files[WEIGHTS_INDEX_NAME] = write_json(tmp / WEIGHTS_INDEX_NAME, index)
    return files


def _read_quant_config(directory: Path, verify: bool) -> tuple[dict, dict]:
    """Read and check ``config.json`` and the files it lists; ``(config, quantization_config)``."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory{missing_dir_hint(directory)}")
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; not a complete qalora_ext checkpoint "
                              f"(an interrupted save, or not a checkpoint directory){missing_dir_hint(directory)}")
    config = read_json(cfg_path, CONFIG_NAME)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_path}: no quantization_config; not a qalora_ext checkpoint "
                              f"(a float checkpoint loads with transformers' from_pretrained)")
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{cfg_path}: quant_method is {qc.get('quant_method')!r}, not {QUANT_METHOD!r}; "
                              f"this checkpoint is not in the qalora_ext format")
    check_format_version(qc.get("format_version"), str(cfg_path))
    layout = qc.get("packed_layout")
    if isinstance(layout, bool) or not isinstance(layout, int) or layout not in KNOWN_LAYOUTS:
        raise CheckpointError(f"{cfg_path}: packed_layout {layout!r} is not known to this qalora_ext "
                              f"(known: {KNOWN_LAYOUTS}); upgrade qalora_ext")
    if qc.get("packed_layout_name", KNOWN_LAYOUTS[layout]) != KNOWN_LAYOUTS[layout]:
        raise CheckpointError(f"{cfg_path}: packed_layout {layout} is named {qc.get('packed_layout_name')!r}, "
                              f"expected {KNOWN_LAYOUTS[layout]!r}")
    if not isinstance(qc.get("modules"), dict) or not qc["modules"]:
        raise CheckpointError(f"{cfg_path}: quantization_config lists no quantized modules")
    verify_files(directory, qc.get("files"), verify)
    return config, qc


def build_layer(name: str, entry: dict) -> nn.Module:
    """An empty (meta) layer shaped as ``entry``, ready for assign-loading."""
    try:
        layout = entry["layout"]
        if isinstance(layout, bool) or not isinstance(layout, int) or layout not in KNOWN_LAYOUTS:
            raise CheckpointError(f"packed layout {layout!r} is not known (known: {KNOWN_LAYOUTS})")
        ql = QuantLinear(
            int(entry["in_features"]), int(entry["out_features"]), entry["bits"], entry["group_size"],
            bool(entry["bias"]),
            dtype_from_name(entry["scale_dtype"], "scale_dtype"),
            dtype_from_name(entry["zero_dtype"], "zero_dtype"),
            layout, device="meta",
        )
        ad = entry.get("adapter")
        if ad is None:
            return ql
        if not isinstance(ad, dict):
            raise CheckpointError(f"module {name!r}: its adapter entry must be an object; got {ad!r}")
        if ad.get("pooling", "mean") != "mean":
            raise CheckpointError(f"adapter pooling {ad.get('pooling')!r} is not supported (only 'mean')")
        train_scale, train_zero = adapter_flags(ad, f"module {name!r}")
        layer = QALoRALinear(ql, int(ad["rank"]), float(ad["alpha"]), float(ad["dropout"]), bool(ad["use_rslora"]),
                             train_scale=train_scale, train_zero=train_zero)
        if "scaling" in ad and not math.isclose(layer.scaling, float(ad["scaling"]), rel_tol=1e-6):
            raise CheckpointError(f"adapter scaling {ad['scaling']} does not match alpha/rank ({layer.scaling})")
        return layer
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"module {name!r}: bad entry in quantization_config ({type(e).__name__}: {e})") from e


def _resolve_tensor_slot(model: nn.Module, key: str) -> tuple[nn.Module, str, Optional[dict]]:
    prefix, _, attr = key.rpartition(".")
    owner = _get_module(model, prefix) if prefix else model
    if owner is None:
        return model, attr, None
    if attr in owner._parameters:
        return owner, attr, owner._parameters
    if attr in owner._buffers:
        return owner, attr, owner._buffers
    return owner, attr, None


def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make every alias the same tensor object as its source again.

    The checkpoint, not the model's config, says what was tied: a model saved
    with an untied head must not be re-tied by ``tie_weights()`` because its
    config says ``tie_word_embeddings``. So aliases are assigned directly.
    """
    for alias, source in tied.items():
        _, sattr, sslots = _resolve_tensor_slot(model, source)
        _, aattr, aslots = _resolve_tensor_slot(model, alias)
        if sslots is None or aslots is None:
            raise CheckpointError(f"tied tensor {alias!r} -> {source!r}: not found in the model")
        src = sslots[sattr]
        if aslots is not sslots or aattr != sattr:
            if isinstance(aslots.get(aattr), nn.Parameter) and not isinstance(src, nn.Parameter):
                src = nn.Parameter(src, requires_grad=False)
            aslots[aattr] = src


def load_quantized(directory: PathLike, model: Optional[nn.Module] = None, device: Union[str, torch.device] = "cpu",
                   *, verify: bool = True) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized`; returns the model in eval mode.

    ``model``: an instance of the saved architecture, float (fresh from its
    constructor) or already quantized; its layers named in the checkpoint are
    replaced by packed layers and every tensor is loaded (strictly: missing or
    unexpected keys are an error). Without ``model``, the architecture is
    rebuilt from the transformers config in ``config.json``.

    All files are checked (size and sha256; ``verify=False`` skips the hash of
    very large checkpoints you trust) before anything is read, so a corrupted
    download fails with the file's name before the model is touched. Tensors
    are assigned, not copied, so the model's previous tensors are not kept
    alive and layers built on the meta device cost nothing until loaded.
    Names and shapes are checked against the model before it is changed, so
    a checkpoint that does not fit raises and leaves ``model`` as it was.
    """
    directory = Path(os.path.realpath(os.fspath(directory)))
    device = torch.device(device)
    config, qc = _read_quant_config(directory, verify)
    tied = qc.get("tied", {})
    tied_modules = qc.get("tied_modules", {})
    if not isinstance(tied, dict) or not isinstance(tied_modules, dict):
        raise CheckpointError(f"{directory}: 'tied' / 'tied_modules' in quantization_config must be objects")
    if model is None:
        from ..loading.transformers_model import build_transformers_model

        model = build_transformers_model(config, directory)

    # Validate everything against the model before changing it, so a checkpoint
    # that does not fit leaves the model as it was.
    new_layers = _plan_layers(model, qc["modules"], tied_modules)
    files = [f for f in qc["files"] if f.endswith(".safetensors")]
    file_shapes = _stored_shapes(directory, files, qc["files"], tied, qc["modules"])
    _check_state_fits(directory, model, new_layers, tied_modules, tied, file_shapes)

    for name, layer in new_layers.items():
        _set_child(model, name, layer)
    for alias, source in tied_modules.items():
        _set_child(model, alias, new_layers[source])
    _assign_tensors(directory, model, files, device)
    _retie(model, tied)
    _check_loaded(directory, model, qc["modules"])
    if any(isinstance(m, QALoRALinear) for m in model.modules()):
        # As after add_adapters: only the adapters train (freshly built modules
        # and load_state_dict(assign=True) leave every parameter trainable).
        freeze_all_but_adapters(model)
    model.to(device)
    return model.eval()


def _plan_layers(model: nn.Module, modules: dict, tied_modules: dict) -> dict[str, nn.Module]:
    """The empty (meta) packed layers the checkpoint's module table describes, checked against ``model``."""
    new_layers: dict[str, nn.Module] = {}
    for name, entry in modules.items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"module {name!r}: bad entry in quantization_config")
        current = _get_module(model, name) if name else None
        if current is None:
            raise CheckpointError(f"the model has no layer {name!r} (recorded in the checkpoint); "
                                  f"is it the same architecture?")
        if not isinstance(current, (nn.Linear, QuantLinear, QALoRALinear)):
            raise CheckpointError(f"layer {name!r} is a {type(current).__name__}; expected nn.Linear, QuantLinear "
                                  f"or QALoRALinear")
        shape = (getattr(current, "in_features", None), getattr(current, "out_features", None))
        if shape != (entry.get("in_features"), entry.get("out_features")):
            raise CheckpointError(f"layer {name!r}: the model has in/out features {shape}, the checkpoint "
                                  f"{(entry.get('in_features'), entry.get('out_features'))}")
        new_layers[name] = build_layer(name, entry)
    for alias, source in tied_modules.items():
        if source not in new_layers or not alias or _get_module(model, alias) is None:
            raise CheckpointError(f"shared layer {alias!r} -> {source!r} does not fit the model")
    return new_layers


def _stored_shapes(directory: Path, files: list[str], recorded: dict, tied: dict, modules: dict) -> dict[str, tuple]:
    """``{tensor name: shape}`` from the safetensors headers (no data read), index and ties checked."""
    file_shapes: dict[str, tuple] = {}
    file_of: dict[str, str] = {}
    for fname in files:
        try:
            with safe_open(str(directory / fname), framework="pt") as f:
                _check_layer_metadata(directory / fname, f.metadata(), modules)
                for k in f.keys():
                    if k in file_of:
                        raise CheckpointError(f"{directory}: tensor {k!r} is in both {file_of[k]} and {fname}")
                    file_of[k] = fname
                    file_shapes[k] = tuple(f.get_slice(k).get_shape())
        except SafetensorError as e:
            raise CheckpointError(f"{directory / fname}: not a readable safetensors file ({e})") from e
    if WEIGHTS_INDEX_NAME in recorded:
        index = read_json(directory / WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME)
        if index.get("weight_map") != file_of:
            raise CheckpointError(f"{directory}: {WEIGHTS_INDEX_NAME} does not match the shards' contents")
    bad_ties = {a: s for a, s in tied.items() if s not in file_of}
    if bad_ties:
        raise CheckpointError(f"{directory}: tied aliases point at tensors not in the checkpoint: {bad_ties}")
    return file_shapes


def _check_state_fits(directory: Path, model: nn.Module, new_layers: dict[str, nn.Module], tied_modules: dict,
                      tied: dict, file_shapes: dict[str, tuple]) -> None:
    """The stored names and shapes are exactly the model's once its layers are replaced (strict load)."""
    replaced = set(new_layers) | set(tied_modules)
    expected: dict[str, tuple] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        parts = k.split(".")
        if not any(".".join(parts[:i]) in replaced for i in range(1, len(parts))):
            expected[k] = tuple(t.shape)
    for prefix, source in (*((n, n) for n in new_layers), *tied_modules.items()):
        for k, t in new_layers[source].state_dict(keep_vars=True).items():
            expected[f"{prefix}.{k}"] = tuple(t.shape)
    missing = set(expected) - set(file_shapes) - set(tied)
    unexpected = (set(file_shapes) | set(tied)) - set(expected)
    if missing or unexpected:
        msg = [f"{directory}: the checkpoint does not fit the model"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {short_list(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {short_list(unexpected)}")
        raise CheckpointError("; ".join(msg))
    wrong = [f"{k} {shape} vs {expected[k]}" for k, shape in file_shapes.items() if shape != expected[k]]
    if wrong:
        raise CheckpointError(f"{directory}: tensor shapes do not fit the model (file vs model): {short_list(wrong)}")


def _assign_tensors(directory: Path, model: nn.Module, files: list[str], device: torch.device) -> None:
    """Read each file once and assign its tensors into the model (no copy into the old tensors)."""
    load_device = str(device) if device.type != "meta" else "cpu"
    for fname in files:
        tensors = load_file(str(directory / fname), device=load_device)
        try:
            model.load_state_dict(tensors, strict=False, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"{directory / fname}: {e}") from e
        del tensors


def _check_loaded(directory: Path, model: nn.Module, modules: dict) -> None:
    """Nothing left on meta, and every packed layer holds the storage dtypes its entry declares."""
    left = [n for n, t in (*model.named_parameters(remove_duplicate=False),
                           *model.named_buffers(remove_duplicate=False)) if t.is_meta]
    if left:
        raise CheckpointError(f"{directory}: tensors left unloaded (still on the meta device): {short_list(left)}")
    for name, entry in modules.items():
        layer = model.get_submodule(name)
        base = layer.base if isinstance(layer, QALoRALinear) else layer
        got = (dtype_name(base.scale.dtype), dtype_name(base.zero.dtype))
        if got != (entry["scale_dtype"], entry["zero_dtype"]):
            raise CheckpointError(f"layer {name!r}: stored scale/zero dtypes {got} differ from the config's "
                                  f"{(entry['scale_dtype'], entry['zero_dtype'])}")


def save_model(model: nn.Module, tokenizer, out: PathLike, max_shard_size: Union[int, str] = "2GB") -> Path:
    """Save a quantized model (adapters included, if any) with its tokenizer; loads with load_quantized.

    The tokenizer and the weights go into the folder together, in one atomic
    replacement: an interrupted save leaves the previous folder as it was
    (old tokenizer beside old weights) or the new one, never a mix.
    """
    return _save(model, out, max_shard_size, tokenizer=tokenizer)

"""Saving and loading quantized models and QA-LoRA adapters (SPEC "Checkpoints").

A quantized checkpoint is a directory laid out the way Hugging Face lays out
its own (``config.json``, ``model.safetensors`` or ``model-0000i-of-0000n``
shards with ``model.safetensors.index.json``), so the usual tools can list,
copy and upload it. Stock transformers cannot *load* it: ``config.json``
carries a ``quantization_config`` whose ``quant_method`` is ``"qalora_ext"``,
and only :func:`load_quantized` knows how to rebuild the packed layers it
describes. A stand-alone adapter uses PEFT's file names but the ``peft_type``
``"QALORA_EXT"``, so PEFT refuses it instead of loading it as a plain LoRA
(our adapter acts on group-MEAN-pooled inputs; a LoRA loader would apply it to
the full input and silently compute something else).

Three properties matter more than speed here:

* Atomicity. A checkpoint is written into a hidden sibling directory and
  renamed into place only once complete, with ``config.json`` written last
  inside it. An exception or Ctrl-C mid-save leaves the previous checkpoint
  (or nothing) at the target, never a mix of old and new shards.
* Integrity. ``config.json`` records every file's size and sha256; loading
  checks them first, so a truncated upload or a flipped bit is reported by
  file name instead of surfacing as garbage logits.
* Exactness. Packed codes, scales, zeros and adapters are stored bit for bit
  in their storage dtypes; a load gives back a model whose outputs are
  identical to the saved one's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .format import FORMAT_VERSION, KNOWN_LAYOUTS, LAYOUT_CANONICAL
from .nn import QALoRALinear, QuantLinear
from .model import set_module
from .model import freeze_all_but_adapters

__all__ = [
    "save_quantized",
    "load_quantized",
    "save_adapter",
    "load_adapter",
    "CheckpointError",
    "parse_size",
    "QUANT_METHOD",
    "ADAPTER_PEFT_TYPE",
]

QUANT_METHOD = "qalora_ext"
ADAPTER_PEFT_TYPE = "QALORA_EXT"

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_SAFETENSORS_METADATA = {"format": "pt"}
_HASH_CHUNK = 1 << 20

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete, corrupted, or does not fit the model.

    A ``ValueError`` so callers that already catch bad-argument errors catch
    these too, but a class of its own so a caller can tell "the files are bad"
    apart from a bug elsewhere.
    """


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(size: Union[int, str]) -> int:
    """Bytes in ``size``: an int, or a string such as ``"2GB"``, ``"500MB"``, ``"10KiB"``.

    Decimal units (KB = 1000) follow Hugging Face's ``max_shard_size``, so the
    same string gives the same shards as ``save_pretrained``; binary units
    (KiB = 1024) are accepted for people who mean them.
    """
    if isinstance(size, bool):
        raise TypeError(f"max_shard_size must be an int or a string like '2GB'; got {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", size.lower())
        if m is None:
            raise ValueError(f"cannot parse size {size!r}; use an int (bytes) or e.g. '2GB', '500MB', '10KB'")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""])
    else:
        raise TypeError(f"max_shard_size must be an int or a string like '2GB'; got {type(size).__name__}")
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive; got {size!r}")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: Any, what: str) -> torch.dtype:
    if name not in _DTYPES:
        raise CheckpointError(f"{what}: unknown storage dtype {name!r} (known: {sorted(_DTYPES)})")
    return _DTYPES[name]


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


def _short_list(names, limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _json_default(obj: Any) -> Any:
    # Model configs may hold dtypes or sets; JSON has neither.
    if isinstance(obj, torch.dtype):
        return _dtype_name(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _library_version() -> Optional[str]:
    try:
        from . import _C

        return _C.__version__
    except Exception:  # pragma: no cover - version is informative only
        return None


# ---------------------------------------------------------------------------
# Durable writes and integrity
# ---------------------------------------------------------------------------


def _hash_file(path: Path, fsync: bool = False) -> dict:
    """Size and sha256 of ``path``, read back from disk.

    Hashing what is on disk (not the bytes we meant to write) is what a later
    load will compare against; fsync-ing the same descriptor makes the data
    durable before the directory is renamed into place.
    """
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return {"size": size, "sha256": h.hexdigest()}


def _write_json(path: Path, obj: Any) -> dict:
    data = (json.dumps(obj, indent=2, default=_json_default) + "\n").encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _fsync_dir(path: Path) -> None:
    # Makes renames and new entries durable; not possible on every OS.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict:
    """Write one safetensors file; returns its size and sha256."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for k, t in tensors.items():
        t = t.detach().to("cpu")
        # safetensors refuses tensors that share memory or do not cover their
        # storage; ties were already removed, so any remaining overlap (views of
        # one buffer) is written as separate copies.
        ptr = t.untyped_storage().data_ptr()
        complete = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if not t.is_contiguous() or not complete or (t.numel() and ptr in storages):
            t = t.contiguous().clone()
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            storages.add(ptr)
        out[k] = t
    save_file(out, str(path), metadata=dict(_SAFETENSORS_METADATA))
    return _hash_file(path, fsync=True)


def _verify_files(directory: Path, files: Any, verify_hash: bool) -> None:
    """Check every recorded file before anything is loaded from it.

    Size first (cheap, catches interrupted copies), then sha256 (catches bit
    rot and partial overwrites that kept the size). Errors name the file.
    """
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{directory}: the config lists no weight files; not a complete qalora_ext checkpoint")
    for name, rec in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointError(f"{directory}: invalid file name {name!r} in the config")
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: checkpoint file {name} is missing")
        try:
            want_size, want_sha = int(rec["size"]), str(rec["sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{directory}: bad integrity record for {name} in the config ({e!r})") from e
        size = path.stat().st_size
        if size < want_size:
            raise CheckpointError(f"{directory}: checkpoint file {name} is truncated "
                                  f"({size} bytes on disk, {want_size} expected)")
        if size != want_size:
            raise CheckpointError(f"{directory}: checkpoint file {name} has the wrong size "
                                  f"({size} bytes on disk, {want_size} expected)")
        if verify_hash and _hash_file(path)["sha256"] != want_sha:
            raise CheckpointError(f"{directory}: checkpoint file {name} is corrupted (sha256 mismatch)")


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: {what} must hold a JSON object")
    return obj


def _check_format_version(version: Any, where: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: format_version {version} is newer than this qalora_ext reads "
                              f"(up to {FORMAT_VERSION}); upgrade qalora_ext")


def _missing_dir_hint(target: Path) -> str:
    # After a crash between the two renames of a replace, the previous
    # checkpoint sits in a hidden sibling; say so rather than just "not found".
    try:
        old = sorted(p.name for p in target.parent.glob(f".{target.name}.old-*"))
    except OSError:
        old = []
    return f" (a previous checkpoint was left at {target.parent / old[0]} by an interrupted save)" if old else ""


# ---------------------------------------------------------------------------
# Atomic directory replacement
# ---------------------------------------------------------------------------


def _unique_sibling(target: Path, tag: str, create: bool) -> Path:
    for _ in range(100):
        path = target.parent / f".{target.name}.{tag}-{secrets.token_hex(4)}"
        if create:
            try:
                os.mkdir(path)  # honours the umask, unlike mkdtemp's 0700
            except FileExistsError:
                continue
            return path
        if not os.path.lexists(path):
            return path
    raise FileExistsError(f"could not find a free name next to {target}")


def _carry_over(old: Path, new: Path, own: Callable[[str], bool]) -> None:
    """Copy into ``new`` what the previous directory held that we do not write.

    A tokenizer or README saved next to the weights must survive a re-save;
    our own files (which may be stale shards of a different count) must not.
    Hard links keep this cheap for large files.
    """
    for entry in os.scandir(old):
        if own(entry.name):
            continue
        dst = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, dst)


def _link_or_copy(src: str, dst: Union[str, Path]) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def _atomic_directory(directory: PathLike, own: Callable[[str], bool]) -> Iterator[Path]:
    """Yield a temporary sibling of ``directory``; on success move it into place.

    Everything is written next to the target (same filesystem, so the final
    rename is atomic). An existing target is renamed aside and deleted only
    once the new one is in place; on any exception, KeyboardInterrupt
    included, the temporary directory is removed and the old target restored.
    """
    target = Path(os.path.realpath(os.fspath(directory)))
    if os.path.lexists(target) and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_sibling(target, "tmp", create=True)
    try:
        if target.is_dir():
            _carry_over(target, tmp, own)
        yield tmp
        _fsync_dir(tmp)
        old = None
        moved_aside = False
        try:
            if os.path.lexists(target):
                old = _unique_sibling(target, "old", create=False)
                os.rename(target, old)
                moved_aside = True
            os.rename(tmp, target)
        except BaseException:
            if moved_aside and not os.path.lexists(target):
                os.rename(old, target)
            raise
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------
# Model inspection
# ---------------------------------------------------------------------------


def _quantized_modules(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``({name: QuantLinear or QALoRALinear}, {alias name: source name})``.

    A ``QuantLinear`` inside a ``QALoRALinear`` is described by the wrapper
    (one entry per layer, with its adapter). A layer object registered under
    two names (shared weights) is recorded once plus an alias, so a load can
    share it again instead of building two.
    """
    entries = list(model.named_modules(remove_duplicate=False))
    wrappers = {n for n, m in entries if isinstance(m, QALoRALinear)}
    modules: dict[str, nn.Module] = {}
    tied: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, m in entries:
        if isinstance(m, QALoRALinear):
            pass
        elif isinstance(m, QuantLinear):
            parent, _, leaf = name.rpartition(".")
            if leaf == "base" and (parent in wrappers) and isinstance(_get_module(model, parent), QALoRALinear):
                continue
        else:
            continue
        if id(m) in first:
            tied[name] = first[id(m)]
            continue
        if name == "":
            raise ValueError("the model itself is a quantized layer; save a module that contains it")
        first[id(m)] = name
        modules[name] = m
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
        "scale_dtype": _dtype_name(base.scale.dtype),
        "zero_dtype": _dtype_name(base.zero.dtype),
        "layout": base.layout,
        "adapter": None,
    }
    if isinstance(m, QALoRALinear):
        entry["adapter"] = _adapter_entry(m)
    return entry


def _adapter_entry(m: QALoRALinear) -> dict:
    return {
        "rank": m.rank,
        "alpha": m.alpha,
        "dropout": m.dropout,
        "use_rslora": m.use_rslora,
        "scaling": m.scaling,
        "pooling": "mean",
    }


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


def _plan_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
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


def _model_config_dict(model: nn.Module) -> Optional[dict]:
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
    limit = parse_size(max_shard_size)
    modules, tied_modules = _quantized_modules(model)
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

    def uniform(key):
        values = {e[key] for e in entries.values()}
        return values.pop() if len(values) == 1 else None

    qconfig = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
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
    model_config = _model_config_dict(model)

    shards = _plan_shards(tensors, limit)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with _atomic_directory(directory, _own_model_file) as tmp:
        files: dict[str, dict] = {}
        weight_map: dict[str, str] = {}
        for i, keys in enumerate(shards):
            fname = WEIGHTS_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            files[fname] = _save_tensors({k: tensors[k] for k in keys}, tmp / fname)
            weight_map.update(dict.fromkeys(keys, fname))
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            files[WEIGHTS_INDEX_NAME] = _write_json(tmp / WEIGHTS_INDEX_NAME, index)
        qconfig["files"] = files
        config = dict(model_config) if model_config is not None else {}
        config["quantization_config"] = qconfig
        _write_json(tmp / CONFIG_NAME, config)  # last: its presence marks a complete checkpoint
    return Path(os.path.realpath(os.fspath(directory)))


def _read_quant_config(directory: Path, verify: bool) -> tuple[dict, dict]:
    """Read and check ``config.json`` and the files it lists; ``(config, quantization_config)``."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory{_missing_dir_hint(directory)}")
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; not a complete qalora_ext checkpoint "
                              f"(an interrupted save, or not a checkpoint directory){_missing_dir_hint(directory)}")
    config = _read_json(cfg_path, CONFIG_NAME)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_path}: no quantization_config; not a qalora_ext checkpoint "
                              f"(a float checkpoint loads with transformers' from_pretrained)")
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{cfg_path}: quant_method is {qc.get('quant_method')!r}, not {QUANT_METHOD!r}; "
                              f"this checkpoint is not in the qalora_ext format")
    _check_format_version(qc.get("format_version"), str(cfg_path))
    layout = qc.get("packed_layout")
    if layout not in KNOWN_LAYOUTS:
        raise CheckpointError(f"{cfg_path}: packed_layout {layout!r} is not known to this qalora_ext "
                              f"(known: {KNOWN_LAYOUTS}); upgrade qalora_ext")
    if qc.get("packed_layout_name", KNOWN_LAYOUTS[layout]) != KNOWN_LAYOUTS[layout]:
        raise CheckpointError(f"{cfg_path}: packed_layout {layout} is named {qc.get('packed_layout_name')!r}, "
                              f"expected {KNOWN_LAYOUTS[layout]!r}")
    if not isinstance(qc.get("modules"), dict) or not qc["modules"]:
        raise CheckpointError(f"{cfg_path}: quantization_config lists no quantized modules")
    _verify_files(directory, qc.get("files"), verify)
    return config, qc


def _build_layer(name: str, entry: dict) -> nn.Module:
    """An empty (meta) layer shaped as ``entry``, ready for assign-loading."""
    try:
        layout = entry["layout"]
        if layout not in KNOWN_LAYOUTS:
            raise CheckpointError(f"packed layout {layout!r} is not known (known: {KNOWN_LAYOUTS})")
        ql = QuantLinear(
            int(entry["in_features"]), int(entry["out_features"]), entry["bits"], entry["group_size"],
            bool(entry["bias"]),
            _dtype_from_name(entry["scale_dtype"], "scale_dtype"),
            _dtype_from_name(entry["zero_dtype"], "zero_dtype"),
            layout, device="meta",
        )
        ad = entry.get("adapter")
        if ad is None:
            return ql
        if ad.get("pooling", "mean") != "mean":
            raise CheckpointError(f"adapter pooling {ad.get('pooling')!r} is not supported (only 'mean')")
        layer = QALoRALinear(ql, int(ad["rank"]), float(ad["alpha"]), float(ad["dropout"]), bool(ad["use_rslora"]))
        if "scaling" in ad and not math.isclose(layer.scaling, float(ad["scaling"]), rel_tol=1e-6):
            raise CheckpointError(f"adapter scaling {ad['scaling']} does not match alpha/rank ({layer.scaling})")
        return layer
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"module {name!r}: bad entry in quantization_config ({type(e).__name__}: {e})") from e


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


def _build_transformers_model(config: dict, directory: Path) -> nn.Module:
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
    if not isinstance(tied, dict) or not isinstance(qc.get("tied_modules", {}), dict):
        raise CheckpointError(f"{directory}: 'tied' / 'tied_modules' in quantization_config must be objects")
    if model is None:
        model = _build_transformers_model(config, directory)

    # Validate everything against the model before changing it, so a checkpoint
    # that does not fit leaves the model as it was.
    new_layers: dict[str, nn.Module] = {}
    for name, entry in qc["modules"].items():
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
        new_layers[name] = _build_layer(name, entry)
    tied_modules = qc.get("tied_modules", {})
    for alias, source in tied_modules.items():
        if source not in new_layers or not alias or _get_module(model, alias) is None:
            raise CheckpointError(f"shared layer {alias!r} -> {source!r} does not fit the model")

    files = [f for f in qc["files"] if f.endswith(".safetensors")]
    file_shapes: dict[str, tuple] = {}
    file_of: dict[str, str] = {}
    for fname in files:
        with safe_open(str(directory / fname), framework="pt") as f:
            for k in f.keys():
                if k in file_of:
                    raise CheckpointError(f"{directory}: tensor {k!r} is in both {file_of[k]} and {fname}")
                file_of[k] = fname
                file_shapes[k] = tuple(f.get_slice(k).get_shape())
    if WEIGHTS_INDEX_NAME in qc["files"]:
        index = _read_json(directory / WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME)
        if index.get("weight_map") != file_of:
            raise CheckpointError(f"{directory}: {WEIGHTS_INDEX_NAME} does not match the shards' contents")
    bad_ties = {a: s for a, s in tied.items() if s not in file_of}
    if bad_ties:
        raise CheckpointError(f"{directory}: tied aliases point at tensors not in the checkpoint: {bad_ties}")

    # The model's state-dict shapes as they will be once the layers are replaced.
    replaced = set(new_layers) | set(tied_modules)
    expected: dict[str, tuple] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        parts = k.split(".")
        if not any(".".join(parts[:i]) in replaced for i in range(1, len(parts))):
            expected[k] = tuple(t.shape)
    for prefix, source in (*((n, n) for n in new_layers), *tied_modules.items()):
        for k, t in new_layers[source].state_dict(keep_vars=True).items():
            expected[f"{prefix}.{k}"] = tuple(t.shape)
    missing = set(expected) - set(file_of) - set(tied)
    unexpected = (set(file_of) | set(tied)) - set(expected)
    if missing or unexpected:
        msg = [f"{directory}: the checkpoint does not fit the model"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {_short_list(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
        raise CheckpointError("; ".join(msg))
    wrong = [f"{k} {file_shapes[k]} vs {expected[k]}" for k in file_of if file_shapes[k] != expected[k]]
    if wrong:
        raise CheckpointError(f"{directory}: tensor shapes do not fit the model (file vs model): {_short_list(wrong)}")

    for name, layer in new_layers.items():
        _set_child(model, name, layer)
    for alias, source in tied_modules.items():
        _set_child(model, alias, new_layers[source])

    load_device = str(device) if device.type != "meta" else "cpu"
    for fname in files:
        tensors = load_file(str(directory / fname), device=load_device)
        try:
            model.load_state_dict(tensors, strict=False, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"{directory / fname}: {e}") from e
        del tensors
    _retie(model, tied)

    left = [n for n, t in (*model.named_parameters(remove_duplicate=False),
                           *model.named_buffers(remove_duplicate=False)) if t.is_meta]
    if left:
        raise CheckpointError(f"{directory}: tensors left unloaded (still on the meta device): {_short_list(left)}")
    for name, entry in qc["modules"].items():
        layer = model.get_submodule(name)
        base = layer.base if isinstance(layer, QALoRALinear) else layer
        got = (_dtype_name(base.scale.dtype), _dtype_name(base.zero.dtype))
        if got != (entry["scale_dtype"], entry["zero_dtype"]):
            raise CheckpointError(f"layer {name!r}: stored scale/zero dtypes {got} differ from the config's "
                                  f"{(entry['scale_dtype'], entry['zero_dtype'])}")
    if any(isinstance(m, QALoRALinear) for m in model.modules()):
        # As after add_adapters: only the adapters train (freshly built modules
        # and load_state_dict(assign=True) leave every parameter trainable).
        freeze_all_but_adapters(model)
    model.to(device)
    return model.eval()


# ---------------------------------------------------------------------------
# save_adapter / load_adapter
# ---------------------------------------------------------------------------


def _own_adapter_file(name: str) -> bool:
    return name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)


def save_adapter(model: nn.Module, directory: PathLike) -> Path:
    """Save only the QA-LoRA adapters of ``model`` (a few MB), atomically.

    The base model is not saved: the adapter is meant to be loaded onto the
    same quantized base (see :func:`load_adapter`). The config records the
    pooling convention and group size so no reader can apply it as a plain
    LoRA, plus every layer's hyper-parameters (a model may mix ranks).
    Returns the adapter directory's path.
    """
    modules, _ = _quantized_modules(model)
    layers = {n: m for n, m in modules.items() if isinstance(m, QALoRALinear)}
    if not layers:
        raise ValueError("save_adapter: the model has no QALoRALinear layer; call add_adapters first")
    per_layer = {}
    tensors = {}
    for name, m in layers.items():
        per_layer[name] = {
            **_adapter_entry(m),
            "group_size": m.group_size,
            "bits": m.bits,
            "in_features": m.in_features,
            "out_features": m.out_features,
        }
        tensors[f"{name}.lora_A"] = m.lora_A.detach()
        tensors[f"{name}.lora_B"] = m.lora_B.detach()

    def uniform(key):
        values = {e[key] for e in per_layer.values()}
        return values.pop() if len(values) == 1 else None

    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": ADAPTER_PEFT_TYPE,
        "format_version": FORMAT_VERSION,
        "library": QUANT_METHOD,
        "library_version": _library_version(),
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
        "target_modules": list(layers),
        "layers": per_layer,
    }
    with _atomic_directory(directory, _own_adapter_file) as tmp:
        config["files"] = {ADAPTER_WEIGHTS_NAME: _save_tensors(tensors, tmp / ADAPTER_WEIGHTS_NAME)}
        _write_json(tmp / ADAPTER_CONFIG_NAME, config)
    return Path(os.path.realpath(os.fspath(directory)))


def load_adapter(model: nn.Module, directory: PathLike, *, verify: bool = True) -> nn.Module:
    """Load adapters saved by :func:`save_adapter` onto a quantized model; returns it.

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
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such adapter directory{_missing_dir_hint(directory)}")
    cfg_path = directory / ADAPTER_CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no {ADAPTER_CONFIG_NAME}; not a complete qalora_ext adapter")
    cfg = _read_json(cfg_path, ADAPTER_CONFIG_NAME)
    peft_type = cfg.get("peft_type")
    if peft_type != ADAPTER_PEFT_TYPE:
        hint = (" (a PEFT LoRA adapter: it acts on the full input, not on group-pooled inputs, and cannot be "
                "loaded as a QA-LoRA adapter without conversion)") if peft_type == "LORA" else ""
        raise CheckpointError(f"{cfg_path}: peft_type is {peft_type!r}, not {ADAPTER_PEFT_TYPE!r}{hint}")
    _check_format_version(cfg.get("format_version"), str(cfg_path))
    if cfg.get("pooling") != "mean":
        raise CheckpointError(f"{cfg_path}: pooling is {cfg.get('pooling')!r}; only 'mean' pooling is supported "
                              f"(SPEC: an importer converts other conventions)")
    _verify_files(directory, cfg.get("files"), verify)
    targets = cfg.get("target_modules")
    layers_cfg = cfg.get("layers") or {}
    if not isinstance(targets, list) or not targets:
        raise CheckpointError(f"{cfg_path}: target_modules lists no layers")

    tensors = load_file(str(directory / ADAPTER_WEIGHTS_NAME), device="cpu")
    want = {f"{n}.{p}" for n in targets for p in ("lora_A", "lora_B")}
    if set(tensors) != want:
        missing, extra = want - set(tensors), set(tensors) - want
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS_NAME}: tensors do not match target_modules"
                              + (f"; missing: {_short_list(missing)}" if missing else "")
                              + (f"; unexpected: {_short_list(extra)}" if extra else ""))

    plan = []
    for name in targets:
        lc = dict(layers_cfg.get(name) or {})
        for key, fallback in (("rank", "rank"), ("alpha", "alpha"), ("dropout", "dropout"),
                              ("use_rslora", "use_rslora"), ("group_size", "group_size")):
            if lc.get(key) is None:
                lc[key] = cfg.get(fallback)
        if any(lc[k] is None for k in ("rank", "alpha", "dropout", "use_rslora", "group_size")):
            raise CheckpointError(f"{cfg_path}: layer {name!r} has incomplete hyper-parameters {lc}")
        if lc.get("pooling", "mean") != "mean":
            raise CheckpointError(f"{cfg_path}: layer {name!r} pooling is {lc['pooling']!r}; only 'mean' is supported")
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
        A, B = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        wantA = (rank, base.in_features // base.group_size)
        wantB = (base.out_features, rank)
        if tuple(A.shape) != wantA or tuple(B.shape) != wantB:
            raise CheckpointError(f"load_adapter: layer {name!r}: adapter shapes A {tuple(A.shape)}, B {tuple(B.shape)} "
                                  f"do not fit the layer (expected A {wantA}, B {wantB})")
        want_scaling = QALoRALinear.scaling_for(rank, lc["alpha"], lc["use_rslora"])
        if "scaling" in lc and not math.isclose(want_scaling, float(lc["scaling"]),
                                                rel_tol=1e-6):
            raise CheckpointError(f"{cfg_path}: layer {name!r}: scaling {lc['scaling']} does not match alpha/rank")
        if lc.get("bits") is not None and lc["bits"] != base.bits:
            warnings.warn(f"load_adapter: layer {name!r} is INT{base.bits} but the adapter was trained on "
                          f"INT{lc['bits']}", stacklevel=2)
        plan.append((name, layer, base, lc, A, B))

    for name, layer, base, lc, A, B in plan:
        rank, alpha, dropout, rs = int(lc["rank"]), float(lc["alpha"]), float(lc["dropout"]), bool(lc["use_rslora"])
        dev = base.packed.device
        if isinstance(layer, QALoRALinear) and layer.rank == rank:
            with torch.no_grad():
                layer.lora_A.copy_(A.to(dev, torch.float32))
                layer.lora_B.copy_(B.to(dev, torch.float32))
            layer.alpha, layer.dropout, layer.use_rslora = alpha, dropout, rs
        else:
            new = QALoRALinear(base, rank, alpha, dropout, rs)
            with torch.no_grad():
                new.lora_A.copy_(A.to(dev, torch.float32))
                new.lora_B.copy_(B.to(dev, torch.float32))
            new.train(layer.training)
            _set_child(model, name, new)
    freeze_all_but_adapters(model)
    return model

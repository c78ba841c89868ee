"""Import PEFT QA-LoRA adapters (``LoraConfig(use_qalora=True)``) as qalora_ext adapters.

What PEFT computes (``peft.tuners.lora.variants.QALoraLinearVariant.forward``,
read from PEFT 0.21.2, the version this module was tested against)::

    x' = dropout(x)                                    # on the full input
    pooled = x'.view(..., L, G).mean(-1) * L           # L = K / qalora_group_size
    y = base(x) + scaling * (pooled @ A_peft^T) @ B^T

with ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA) and
``A_peft`` of shape ``(r, L)``. SPEC pools by the plain mean, so the same
layer in our convention has

    A_ours = L * A_peft,    B_ours = B_peft,   same r, alpha, rsLoRA, G.

(PEFT's ``* L`` makes its pooled value ``sum(x_group) * L / G``; with
``L * A`` we keep the product exact up to one float32 rounding of ``A``.)
Dropout differs only in training: PEFT drops entries of ``x`` before
pooling, SPEC drops the pooled vector; inference is identical.

PEFT pools over ``qalora_group_size`` channels while the base was quantized
with its own group size; SPEC requires the two to be the same, so an adapter
whose ``qalora_group_size`` differs from a target layer's quantization group
is refused (it would need a pooling the fused kernels do not compute).

Entry points: :func:`import_peft_qalora` (attach to a loaded quantized
model) and :func:`convert_peft_qalora` (folders in, our adapter folder out).
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..checkpoint.adapter import ADAPTER_CONFIG_NAME, ADAPTER_PEFT_TYPE, ADAPTER_WEIGHTS_NAME
from ..checkpoint.files import dtype_name, read_json
from ..model import freeze_all_but_adapters, set_module
from ..nn import QALoRALinear, QuantLinear

__all__ = ["read_peft_qalora_config", "peft_to_ours_A", "import_peft_qalora", "convert_peft_qalora",
           "PEFT_POOLING_NOTE"]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

PEFT_POOLING_NOTE = ("PEFT use_qalora pools mean(x) * L (L = in_features / group_size); qalora_ext pools mean(x): "
                     "converted with A_ours = L * A_peft, B unchanged")

_PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def read_peft_qalora_config(adapter_dir: PathLike) -> dict:
    """Read and check a PEFT adapter's ``adapter_config.json``; refuses anything but a plain QA-LoRA.

    Returns the config dict (PEFT's keys). Raises ``ValueError`` naming what
    is unsupported (not LoRA, ``use_qalora`` off, DoRA, trained biases,
    ``modules_to_save``, ``fan_in_fan_out`` ...).
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir}: no such adapter directory")
    path = adapter_dir / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{adapter_dir}: no {ADAPTER_CONFIG_NAME}; not a PEFT adapter folder")
    cfg = read_json(path, "the adapter config")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type == ADAPTER_PEFT_TYPE:
        raise ValueError(f"{path}: already a qalora_ext adapter; load it with qalora_ext.load_adapter")
    if peft_type != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only PEFT LoRA adapters trained with "
                         f"use_qalora=True can be imported")
    if not cfg.get("use_qalora", False):
        raise ValueError(f"{path}: use_qalora is not true: this is a plain LoRA adapter, which acts on the full "
                         f"input, not on group-pooled inputs, and has no exact QA-LoRA form. Merge it into the "
                         f"float model and quantize that (qalora quantize), or train a QA-LoRA adapter "
                         f"(PEFT LoraConfig(use_qalora=True, qalora_group_size=G) or qalora train)")
    problems = []
    if cfg.get("use_dora"):
        problems.append("use_dora=True (DoRA)")
    if cfg.get("lora_bias"):
        problems.append("lora_bias=True (a trained bias on lora_B)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg.get('bias')!r} (trained base biases)")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save={cfg.get('modules_to_save')!r} (fully trained modules)")
    if cfg.get("trainable_token_indices"):
        problems.append("trainable_token_indices (trained embedding rows)")
    if cfg.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=True (Conv1D layers)")
    if cfg.get("layer_replication"):
        problems.append("layer_replication")
    for key in ("alora_invocation_tokens", "velora_config", "monteclora_config"):
        if cfg.get(key):
            problems.append(f"{key} (another LoRA variant)")
    if problems:
        raise ValueError(f"{path}: unsupported PEFT options for a QA-LoRA import: {'; '.join(problems)}")
    g = cfg.get("qalora_group_size", 16)  # PEFT's default
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"{path}: qalora_group_size must be a positive int; got {g!r}")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{path}: r must be a positive int; got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"{path}: lora_alpha must be a finite number; got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is not None and not isinstance(cfg.get(key), dict):
            raise ValueError(f"{path}: {key} must be an object")
    return cfg


def _pattern_value(patterns: Optional[dict], name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def peft_to_ours_A(lora_A: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """PEFT's ``A`` (r, L) -> ours: ``L * A`` in float32 (PEFT pools mean * L, we pool mean)."""
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
    groups = in_features // group_size
    if lora_A.dim() != 2 or lora_A.shape[1] != groups:
        raise ValueError(f"lora_A must have shape (r, {groups}); got {tuple(lora_A.shape)}")
    # float64 product then one rounding: the exact L * A, rounded once to float32
    return (lora_A.detach().double() * groups).to(torch.float32)


def _load_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = adapter_dir / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        bins = [p.name for p in adapter_dir.glob("adapter_model.bin")]
        raise ValueError(f"{adapter_dir}: no {ADAPTER_WEIGHTS_NAME}"
                         + (" (adapter_model.bin found: only safetensors adapters are imported; re-save with "
                            "save_pretrained(safe_serialization=True))" if bins else ""))
    return load_file(str(path), device="cpu")


def _resolve(model: nn.Module, peft_name: str) -> tuple[str, Optional[nn.Module]]:
    """Our module name for a PEFT key's module path (PEFT prefixes ``base_model.model.``)."""
    candidates = [peft_name]
    if peft_name.startswith(_PEFT_PREFIX):
        candidates.insert(0, peft_name[len(_PEFT_PREFIX):])
    for name in candidates:
        try:
            return name, model.get_submodule(name)
        except AttributeError:
            continue
    return candidates[0], None


def _lora_pairs(tensors: dict[str, torch.Tensor], adapter_name: Optional[str],
                weights_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{PEFT module path: {"lora_A": A, "lora_B": B}}`` of one adapter; anything else in the file is refused."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            unsupported.append(key)
            continue
        if m.group("adapter") is not None and m.group("adapter") != adapter_name:
            if adapter_name is None:
                adapter_name = m.group("adapter")  # a single named adapter
            else:
                continue
        pairs.setdefault(m.group("module"), {})[m.group("which")] = t
    if unsupported:
        shown = ", ".join(sorted(unsupported)[:10]) + (" ..." if len(unsupported) > 10 else "")
        raise ValueError(f"{weights_path}: tensors other than lora_A / lora_B weights "
                         f"({len(unsupported)}: {shown}); DoRA magnitudes, biases, embeddings and "
                         f"modules_to_save cannot be imported as QA-LoRA adapters")
    if not pairs:
        raise ValueError(f"{weights_path}: no lora_A / lora_B tensors")
    return pairs


def _plan_layer(model: nn.Module, peft_name: str, pair: dict[str, torch.Tensor], cfg: dict) -> tuple:
    """Check one target layer against its adapter; ``(name, layer, base, rank, alpha, groups, A, B)``."""
    group_size = cfg.get("qalora_group_size", 16)
    name, layer = _resolve(model, peft_name)
    if set(pair) != {"lora_A", "lora_B"}:
        raise ValueError(f"{name}: the adapter has {sorted(pair)} but needs both lora_A and lora_B")
    if layer is None:
        raise ValueError(f"{name}: the adapter targets this layer but the model has no such module "
                         f"(a different base model?)")
    if isinstance(layer, QALoRALinear):
        if layer.train_scale or layer.train_zero:
            # Importing replaces the layer's adapter; its trained scales / zeros would go with it.
            raise ValueError(f"{name}: the layer holds trained scales/zeros (dscale/dzero) that importing a PEFT "
                             f"adapter would drop; merge them first (merge_adapters / qalora merge) and import "
                             f"onto the merged model, or save them (save_adapter)")
        base = layer.base
    elif isinstance(layer, QuantLinear):
        base = layer
    else:
        raise ValueError(f"{name}: is a {type(layer).__name__}, not a quantized layer; QA-LoRA adapters attach "
                         f"to quantized layers (load_quantized / quantize_model first)")
    if base.group_size != group_size:
        raise ValueError(f"{name}: the adapter pools over qalora_group_size={group_size} input channels but the "
                         f"layer is quantized with group_size={base.group_size}; SPEC needs the pooling "
                         f"groups to be the quantization groups. Quantize the base with group_size="
                         f"{group_size} or train the adapter with qalora_group_size={base.group_size}")
    A, B = pair["lora_A"], pair["lora_B"]
    rank = int(_pattern_value(cfg.get("rank_pattern"), name, cfg["r"]))
    alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8)))
    groups = base.in_features // base.group_size
    if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != (rank, groups) or tuple(B.shape) != (base.out_features,
                                                                                              rank):
        raise ValueError(f"{name}: adapter shapes lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)} do not fit "
                         f"rank {rank} on a layer with in_features={base.in_features} (L = {groups} groups of "
                         f"{group_size}) and out_features={base.out_features}: expected lora_A ({rank}, {groups}), "
                         f"lora_B ({base.out_features}, {rank})")
    for what, t in (("lora_A", A), ("lora_B", B)):
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: {what} must be finite floats")
    return name, layer, base, rank, alpha, groups, A, B


def _attach(model: nn.Module, plan: list[tuple], use_rslora: bool, dropout: float) -> dict[str, dict]:
    """Replace each planned layer by a ``QALoRALinear`` holding the converted adapter; the per-layer report."""
    layers_report = {}
    for name, layer, base, rank, alpha, groups, A, B in plan:
        new = QALoRALinear(base, rank, alpha, dropout, use_rslora)
        with torch.no_grad():
            dev = base.packed.device
            new.lora_A.copy_(peft_to_ours_A(A, base.in_features, base.group_size).to(dev))
            new.lora_B.copy_(B.detach().to(dev, torch.float32))
        new.train(layer.training)
        set_module(model, name, new)
        layers_report[name] = {"rank": rank, "alpha": alpha, "use_rslora": use_rslora, "scaling": new.scaling,
                               "groups": groups, "group_size": base.group_size, "A_factor": groups,
                               "source_dtype": dtype_name(A.dtype)}
    return layers_report


def import_peft_qalora(model: nn.Module, adapter_dir: PathLike, *, adapter_name: Optional[str] = None) -> dict:
    """Attach a PEFT ``use_qalora`` adapter to a quantized model as ``QALoRALinear`` layers, in place.

    Every target layer must be a ``QuantLinear`` (or ``QALoRALinear``, whose
    adapter is replaced) quantized with ``group_size == qalora_group_size``.
    ``A`` is converted to SPEC's mean pooling (``A_ours = L * A_peft``), ``B``,
    rank, alpha, rsLoRA and dropout are copied. Everything is checked before
    the model changes. Returns a report: ``{"source", "peft_version",
    "conversion", "group_size", "layers": {name: {rank, alpha, use_rslora,
    scaling, groups, ...}}, "notes"}``; the model is frozen but for adapters.
    ``adapter_name``: the PEFT adapter name inside the keys, when they carry
    one (``...lora_A.<name>.weight``); by default keys without a name.
    """
    adapter_dir = Path(os.path.realpath(os.fspath(adapter_dir)))
    cfg = read_peft_qalora_config(adapter_dir)
    pairs = _lora_pairs(_load_tensors(adapter_dir), adapter_name, adapter_dir / ADAPTER_WEIGHTS_NAME)
    plan = [_plan_layer(model, peft_name, pairs[peft_name], cfg) for peft_name in sorted(pairs)]
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    layers_report = _attach(model, plan, bool(cfg.get("use_rslora", False)), dropout)
    freeze_all_but_adapters(model)
    report = {
        "format": "peft-qalora",
        "source": os.fspath(adapter_dir),
        "peft_version": cfg.get("peft_version"),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "group_size": cfg.get("qalora_group_size", 16),
        "conversion": PEFT_POOLING_NOTE,
        "layers": layers_report,
        "notes": ["dropout: PEFT drops input channels before pooling, qalora_ext drops the pooled vector "
                  "(training only; inference is identical)"] if dropout > 0 else [],
    }
    log.info("imported %d PEFT QA-LoRA layer(s) from %s: %s", len(layers_report), adapter_dir, PEFT_POOLING_NOTE)
    return report


def convert_peft_qalora(adapter_dir: PathLike, quantized_model: PathLike, out_dir: PathLike, *,
                        save_model: bool = False, device: Union[str, torch.device] = "cpu") -> dict:
    """Folders in, folder out: load ``quantized_model`` (a qalora_ext checkpoint), attach the PEFT
    adapter, and save our adapter (``save_adapter``) to ``out_dir`` -- or, with ``save_model``, the
    whole quantized model with its adapters (``save_quantized``). Returns the import report."""
    from ..checkpoint import load_quantized, save_adapter, save_quantized

    out_real = os.path.realpath(out_dir)
    for what, path in (("the PEFT adapter", adapter_dir), ("the quantized model", quantized_model)):
        if out_real == os.path.realpath(path):
            raise ValueError(f"convert_peft_qalora: the output folder is {what} ({path}); write to a new folder")
    model = load_quantized(quantized_model, device=device)
    report = import_peft_qalora(model, adapter_dir)
    out = save_quantized(model, out_dir) if save_model else save_adapter(model, out_dir)
    report["output"] = os.fspath(out)
    return report

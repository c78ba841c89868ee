"""Write a quantized (merged) model as one GGUF file that llama.cpp runs.

Why Q4_1: GGUF Q4_1 *is* our format at ``bits=4, group_size=32`` (see
:mod:`.gguf_q4_1`, the one module that knows the 20-byte block layout): a block is
``W = d * q + m`` over 32 consecutive input channels with a float16 ``d`` and
a float16 offset ``m``, exactly ``scale * q + zero``. So a model quantized
with the defaults (b=4, G=32, float16 scales) is written with its codes and
scales bit for bit; only the zeros (float32 by default, SPEC) are rounded to
float16, and that rounding is measured and reported.

Other (bits, group_size) have no GGUF type of their own, but Q4_1 holds them
exactly as well, only larger: a 2- or 3-bit code fits a nibble, and a group
of 64 or 128 is 2 or 4 consecutive Q4_1 blocks that repeat the group's
``d`` and ``m``. The file then costs 5.0 bits per weight instead of the
model's ``b + 48/G``, so it is refused unless the caller says
``allow_larger=True``. A change of VALUES beyond the zeros' float16 rounding
(a bfloat16/float32 scale that is not a float16 number) is refused unless
``lossy=True``, and is then measured and reported.

The float tensors (embeddings, norms, unquantized layers) are written as F32
by default: the loaded model holds them in float32, so F32 is exact and the
exported model computes what ours computes; ``float_type="f16"`` halves their
size (the embedding is most of a small model's file) at the cost of a
rounding, which is reported.

A layer that still holds its adapter is merged on the way, in float64, as
``QALoRALinear.merge`` does: ``m = zero + dzero + s (B @ A) / G`` and, with a
trained ``dscale``, ``d = scale + dscale``, each rounded once to float16; the
fraction of the trained change lost to that rounding (weight space) is
reported. A merged scale that float16 cannot hold although the model's own
scale dtype would is refused unless ``lossy=True``, as for unmerged scales.

What llama.cpp expects of a ``llama`` model, and how it is met here:

* tensor names ``token_embd``, ``blk.{i}.attn_q`` ... ``output`` (table
  ``_BLOCK_TENSORS``); a tied output head is simply not written (llama.cpp
  then uses ``token_embd``);
* the rows of ``q_proj`` and ``k_proj`` permuted for llama.cpp's rotary
  embedding (HF's "rotate half" pairs dimension ``j`` with ``j + d/2``,
  llama.cpp pairs ``2j`` with ``2j + 1``; see :func:`rope_permutation`).
  Permuting rows never crosses a group (groups run along the input
  channels), so codes, scales, zeros and bias rows move together and the
  blocks stay exact;
* a byte-level BPE tokenizer (``tokenizer.ggml.model = "gpt2"``) with its
  tokens, token types, merges, special ids and chat template, and the name
  of the pre-tokenizer (the regex split before BPE) that llama.cpp knows.

The file is written into a hidden temporary sibling (``.NAME.tmp-PID-HEX``)
and renamed over the target only when complete, so nothing half-written can
ever be loaded; the temporary file of an export that was killed (its PID
gone) is removed by the next export to the same path.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn

from ..checkpoint.files import fsync_dir, library_version, remove_stale_leftovers
from ..format import round_to_storage
from ..nn import MERGE_WARN_FRACTION, QALoRALinear, QuantLinear
from .gguf_q4_1 import Q4_1_BITS_PER_WEIGHT, Q4_1_BLOCK_BYTES, Q4_1_GROUP_SIZE, encode_q4_1

__all__ = [
    "export_gguf",
    "GGUFExportReport",
    "SUPPORTED_ARCHITECTURES",
    "Q4_1_BITS_PER_WEIGHT",
    "rope_permutation",
    "detect_tokenizer_pre",
    "zero_rounding_loss",
]

PathLike = Union[str, "os.PathLike[str]"]

SUPPORTED_ARCHITECTURES = ("llama",)
"""``config.model_type`` values this exporter writes (GGUF architecture of the same name)."""

_FP16_MAX = 65504.0

# HF module path inside a decoder layer -> GGUF tensor name inside "blk.{i}".
_BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_BLOCK_NORMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}

# Pre-tokenizer names llama.cpp knows that the structural detection below can
# produce or a caller can ask for (a caller may pass any name llama.cpp knows).
_PRE_GPT2 = "gpt-2"      # GPT-2's regex split (tokenizers' ByteLevel with use_regex)
_PRE_SMOLLM = "smollm"   # each digit on its own, then GPT-2's regex (SmolLM's tokenizer.json)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


@dataclass
class GGUFExportReport:
    """What :func:`export_gguf` wrote and what it changed.

    ``max_weight_change``: max over every packed weight of
    ``|W_gguf - W_exact|``, ``W_exact`` the float64 weight of the model before
    export (with its adapters folded in exactly, if it held any) and
    ``W_gguf = float32(d) * q + float32(m)`` as llama.cpp dequantizes it.
    ``weight_rel_error``: ``||W_gguf - W_exact|| / ||W_exact||`` over all
    packed weights. ``adapter_lost_fraction``: ``||zero16 - zero - delta|| /
    ||delta||`` over all adapters (SPEC "Merge"), None when the model held no
    adapter (a merged model no longer knows its delta).
    """

    path: str
    file_bytes: int
    architecture: str
    n_tensors: int
    n_q4_1: int
    n_float: int
    float_type: str
    packed_params: int
    float_params: int
    source_bits: int
    source_group_size: int
    source_bits_per_weight: float
    gguf_bits_per_weight: float
    file_bits_per_param: float
    widened: bool
    lossy_scales: int
    max_weight_change: float
    weight_rel_error: float
    zero_rounding_max_change: float
    adapters_merged: int
    adapter_lost_fraction: Optional[float]
    adapter_lost_fraction_worst_layer: Optional[float]
    adapter_worst_layer: Optional[str]
    float_max_change: float
    tokenizer_pre: str
    vocab_size: int
    adapter_layers_over_1pct: int = 0
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a person (the CLI prints this)."""
        lines = [
            f"wrote {self.path} ({self.file_bytes / 1e6:.1f} MB, GGUF {self.architecture}): "
            f"{self.n_q4_1} Q4_1 + {self.n_float} {self.float_type.upper()} tensors",
            f"packed weights: INT{self.source_bits} G{self.source_group_size} "
            f"({self.source_bits_per_weight:.3f} bits/weight in qalora_ext) -> Q4_1 "
            f"({self.gguf_bits_per_weight:.3f} bits/weight); whole file {self.file_bits_per_param:.3f} bits/param",
            f"max weight change {self.max_weight_change:.3g} (relative {self.weight_rel_error:.3g}); "
            f"zeros rounded to float16 (max change {self.zero_rounding_max_change:.3g})",
        ]
        if self.adapters_merged:
            lines.append(f"merged {self.adapters_merged} adapter(s): {100 * (self.adapter_lost_fraction or 0):.3f}% of "
                         f"the adapter lost to float16 zeros (worst layer {self.adapter_worst_layer}: "
                         f"{100 * (self.adapter_lost_fraction_worst_layer or 0):.3f}%)")
        if self.lossy_scales:
            lines.append(f"lossy: {self.lossy_scales} layer(s) had scales that are not float16 numbers")
        lines += list(self.notes)
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Small public helpers
# ---------------------------------------------------------------------------


def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp wants for a llama ``q_proj`` / ``k_proj`` (``n_head`` = its heads).

    Inside each head of ``d = rows / n_head`` rows, HF's rotary embedding
    rotates row ``j`` with row ``j + d/2``; llama.cpp's (GPT-J style) rotates
    row ``2j`` with ``2j + 1``. So the GGUF row ``2j + c`` of a head is HF row
    ``j + c * d/2``: ``W_gguf = W_hf[perm]``. The same index as
    llama.cpp's converter (reshape to ``(n_head, 2, d/2)``, swap the last two
    axes), applied to row numbers.
    """
    if rows % n_head or (rows // n_head) % 2:
        raise ValueError(f"rope_permutation: {rows} rows do not split into {n_head} heads of even size")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def zero_rounding_loss(zero: torch.Tensor, delta: Optional[torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """``(zero16, ||zero16 - zero - delta||^2, ||delta||^2)`` for zeros ``zero + delta`` stored as float16.

    ``zero16`` is the single correctly rounded float16 of the float64 sum
    (SPEC's half-ulp rule, via :func:`qalora_ext.format.round_to_storage`).
    The squared norms let a caller add layers up before the square root.
    """
    exact = zero.double() if delta is None else zero.double() + delta.double()
    big = exact.abs().max().item() if exact.numel() else 0.0
    zero16 = round_to_storage(exact, torch.float16)  # saturates at the largest float16: check the magnitude
    if not math.isfinite(big) or big > _FP16_MAX:
        raise ValueError(f"a zero of magnitude {exact.abs().max().item():.6g} does not fit float16 (max {_FP16_MAX})")
    if delta is None:
        return zero16, 0.0, 0.0
    err = zero16.double() - zero.double() - delta.double()
    return zero16, float(err.square().sum()), float(delta.double().square().sum())


def detect_tokenizer_pre(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE ``tokenizer.json`` (as a dict).

    Decided from the structure of ``pre_tokenizer``, which says exactly how
    text is split before BPE:

    * ``ByteLevel(use_regex=True)`` alone: GPT-2's regex -> ``"gpt-2"``;
    * ``Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]``
      (SmolLM's tokenizer): every digit alone, then GPT-2's regex ->
      ``"smollm"``.

    Anything else raises a ValueError naming what was found (pass
    ``tokenizer_pre=`` to :func:`export_gguf` when you know the right name).
    """
    pre = tokenizer_json.get("pre_tokenizer")

    def is_byte_level(p) -> bool:
        return isinstance(p, dict) and p.get("type") == "ByteLevel" and p.get("use_regex", True)

    def check_prefix(p) -> None:
        if p.get("add_prefix_space"):
            raise ValueError("tokenizer: ByteLevel with add_prefix_space=True is not supported by the GGUF exporter "
                             "(llama.cpp's BPE tokenizer adds no space)")

    if is_byte_level(pre):
        check_prefix(pre)
        return _PRE_GPT2
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        items = pre.get("pretokenizers") or []
        if (len(items) == 2 and items[0].get("type") == "Digits" and items[0].get("individual_digits")
                and is_byte_level(items[1])):
            check_prefix(items[1])
            return _PRE_SMOLLM
    raise ValueError(f"tokenizer: no llama.cpp pre-tokenizer is known for pre_tokenizer "
                     f"{json.dumps(pre)[:300]}; pass tokenizer_pre='NAME' (a name llama.cpp knows, e.g. "
                     f"'gpt-2', 'smollm', 'llama-bpe') if you know which one splits text the same way")


# ---------------------------------------------------------------------------
# Model inspection
# ---------------------------------------------------------------------------


@dataclass
class _Tensor:
    """One tensor of the file: its GGUF name, numpy shape (slow dim first), type, bytes and producer."""

    name: str
    shape: tuple
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int
    produce: Callable[[], np.ndarray]
    source: str  # the model's name for it (for messages)


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a dependency
        raise ImportError("exporting GGUF needs the `gguf` package: pip install gguf") from exc
    return gguf


def _config_get(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        params = {}
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type != "default":
        raise ValueError(f"config: rope scaling {rope_type!r} is not supported by the GGUF exporter (only plain "
                         f"rotary embeddings, rope_type 'default')")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _packed_parts(layer: nn.Module) -> tuple[QuantLinear, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(base QuantLinear, float64 zero delta or None, float64 scale delta or None)`` of a packed layer
    (``zero_delta()``: the adapter and a trained ``dzero``; ``scale_delta()``: a trained ``dscale``)."""
    if isinstance(layer, QALoRALinear):
        ds = layer.scale_delta()
        return layer.base, layer.zero_delta().cpu(), None if ds is None else ds.cpu()
    return layer, None, None


def _merged_scale16(base: QuantLinear, dscale: Optional[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Q4_1's float16 ``d``: the scales, or with a trained ``dscale`` the float64 ``scale + dscale`` rounded
    once to float16 (SPEC "Trainable quantization parameters"); and whether that is what a merge would
    store (always, for float16 scales: the merge rounds to float16 too)."""
    if dscale is None:
        return _scale16(base.scale)
    target = base.scale.detach().cpu().double() + dscale.double()
    big = target.abs().max().item() if target.numel() else 0.0
    if not math.isfinite(big) or big > _FP16_MAX:
        raise ValueError(f"a merged scale (scale + dscale) of magnitude {big:.6g} does not fit float16")
    s16 = round_to_storage(target, torch.float16)
    merged = round_to_storage(target, base.scale.dtype)
    return s16, bool(torch.equal(s16.double(), merged.double()))


def _scale16(scale: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Scales as float16 and whether that is exact (it is for float16 scales)."""
    s = scale.detach().cpu()
    if s.dtype == torch.float16:
        return s, True
    big = s.double().abs().max().item() if s.numel() else 0.0
    s16 = round_to_storage(s.double(), torch.float16)  # saturates at the largest float16: check the magnitude
    if not math.isfinite(big) or big > _FP16_MAX:
        raise ValueError(f"a scale of magnitude {s.double().abs().max().item():.6g} does not fit float16")
    return s16, bool(torch.equal(s16.double(), s.double()))


def _bits_of(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def _source_bits_per_weight(bits: int, group_size: int, scale_dtype: torch.dtype, zero_dtype: torch.dtype) -> float:
    return bits + (_bits_of(scale_dtype) + _bits_of(zero_dtype)) / group_size


class _Stats:
    """What the written data changed, summed while the tensors are produced (read by :func:`_report`)."""

    def __init__(self) -> None:
        self.max_change = 0.0
        self.err_sq = 0.0
        self.ref_sq = 0.0
        self.zero_max_change = 0.0
        self.lost_sq = 0.0
        self.delta_sq = 0.0
        self.layer_lost: dict[str, float] = {}
        self.float_max_change = 0.0
        self.lossy_layers = 0


# ---------------------------------------------------------------------------
# Planning: every check, and the list of the file's tensors
# ---------------------------------------------------------------------------


def _hparams(config) -> dict:
    """The llama hyperparameters the GGUF keys need, checked."""
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"model: architecture {arch!r} is not supported by the GGUF exporter "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    act = _config_get(config, "hidden_act", default="silu")
    if act != "silu":
        raise ValueError(f"config: hidden_act {act!r} is not supported (llama.cpp's llama uses silu)")
    n_head = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    return {
        "arch": arch, "n_layer": int(config.num_hidden_layers), "n_head": n_head,
        "n_head_kv": int(_config_get(config, "num_key_value_heads", default=n_head)), "hidden": hidden,
        "head_dim": int(_config_get(config, "head_dim", default=hidden // n_head)),
        "vocab_size": int(config.vocab_size),
        "ffn": int(config.intermediate_size),
        "ctx": int(_config_get(config, "max_position_embeddings", default=2048)),
        "rope_theta": _rope_theta(config),
        "rms_eps": float(_config_get(config, "rms_norm_eps", default=1e-6)),
        "tied": bool(getattr(config, "tie_word_embeddings", False)),
    }


def _float_data(t: torch.Tensor, dt, perm: Optional[torch.Tensor], stats: _Stats) -> np.ndarray:
    """A float tensor's data as ``dt`` (rows permuted by ``perm``); a rounding is measured into ``stats``."""
    x = t.detach().cpu()
    if perm is not None:
        x = x[perm]
    out = x.float().numpy().astype(dt)
    if dt != np.float32:
        change = float(np.max(np.abs(out.astype(np.float64) - x.double().numpy()), initial=0.0))
        stats.float_max_change = max(stats.float_max_change, change)
    return out


def _packed_block_bytes(base: QuantLinear, delta: Optional[torch.Tensor], dscale: Optional[torch.Tensor],
                        perm: Optional[torch.Tensor], src: str, stats: _Stats) -> np.ndarray:
    """Q4_1 bytes of one packed layer (rows permuted by ``perm``), measuring what changed on the way."""
    N, K, G = base.out_features, base.in_features, base.group_size
    codes = base.codes().cpu()
    scale = base.scale.detach().cpu()
    zero = base.zero.detach().cpu()
    scale16, _ = _merged_scale16(base, dscale)
    zero16, lost_sq, delta_sq = zero_rounding_loss(zero, delta)
    q64 = codes.double().reshape(N, K // G, G)
    exact_scale = scale.double() + (dscale if dscale is not None else 0.0)
    if dscale is not None:
        # A trained scale moves every weight by dscale * q: the lost fraction is measured in weight
        # space (SPEC), divided by G to stay in the zeros' units that the other layers add up in.
        s_err = (scale16.double() - exact_scale).unsqueeze(-1) * q64
        z_err = (zero16.double() - zero.double() - delta).unsqueeze(-1)
        change = dscale.unsqueeze(-1) * q64 + delta.unsqueeze(-1)
        lost_sq = float((s_err + z_err).square().sum()) / G
        delta_sq = float(change.square().sum()) / G
    if delta is not None:
        stats.lost_sq += lost_sq
        stats.delta_sq += delta_sq
        stats.layer_lost[src] = math.sqrt(lost_sq / delta_sq) if delta_sq > 0 else 0.0

    # What llama.cpp will compute (float32 from float16 d, m) against the exact float64 weight.
    exact_zero = zero.double() + (delta if delta is not None else 0.0)
    w_exact = q64 * exact_scale.unsqueeze(-1) + exact_zero.unsqueeze(-1)
    w_file = (codes.float().reshape(N, K // G, G) * scale16.float().unsqueeze(-1)
              + zero16.float().unsqueeze(-1)).double()
    err = w_file - w_exact
    stats.max_change = max(stats.max_change, float(err.abs().max()))
    stats.err_sq += float(err.square().sum())
    stats.ref_sq += float(w_exact.square().sum())
    stats.zero_max_change = max(stats.zero_max_change, float((zero16.double() - exact_zero).abs().max()))

    # A group of G is G / 32 Q4_1 blocks that repeat its d and m.
    rep = G // Q4_1_GROUP_SIZE
    d = scale16.repeat_interleave(rep, dim=1)
    m = zero16.repeat_interleave(rep, dim=1)
    if perm is not None:
        codes, d, m = codes[perm], d[perm], m[perm]
    return encode_q4_1(codes.contiguous(), d.contiguous(), m.contiguous())


class _Plan:
    """The file's tensors in order (data produced lazily, while writing) and what the walk accounted for."""

    def __init__(self, *, float_type: str, allow_larger: bool, lossy: bool, stats: _Stats) -> None:
        gguf = _gguf()
        self.float_np = {"f32": np.float32, "f16": np.float16}[float_type]
        self.float_q = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}[float_type]
        self.allow_larger = allow_larger
        self.lossy = lossy
        self.stats = stats
        self.tensors: list[_Tensor] = []
        self.covered: set[str] = set()  # module names whose state_dict keys are accounted for
        self.packed_kinds: set[tuple] = set()  # (bits, group_size, scale dtype, zero dtype)

    def add_float(self, gname: str, t: torch.Tensor, src: str, always_f32: bool = False,
                  perm: Optional[torch.Tensor] = None) -> None:
        gguf = _gguf()
        dt, q = (np.float32, gguf.GGMLQuantizationType.F32) if always_f32 else (self.float_np, self.float_q)
        shape = tuple(t.shape)
        produce = functools.partial(_float_data, t, dt, perm, self.stats)
        self.tensors.append(_Tensor(gname, shape, q, int(np.prod(shape)) * np.dtype(dt).itemsize, produce, src))

    def add_linear(self, gname: str, module: nn.Module, src: str, perm_heads: Optional[int]) -> None:
        """A packed layer as Q4_1 (a float ``nn.Linear`` as a float tensor), its bias as F32."""
        perm = rope_permutation(module.out_features, perm_heads) if perm_heads else None
        if isinstance(module, (QuantLinear, QALoRALinear)):
            base, delta, dscale = _packed_parts(module)
            self._check_packed(base, delta, dscale, src)
            N, K = base.out_features, base.in_features
            produce = functools.partial(_packed_block_bytes, base, delta, dscale, perm, src, self.stats)
            self.tensors.append(_Tensor(gname, (N, K), _gguf().GGMLQuantizationType.Q4_1,
                                        N * (K // Q4_1_GROUP_SIZE) * Q4_1_BLOCK_BYTES, produce, src))
            bias = base.bias
        elif type(module) is nn.Linear:
            self.add_float(gname, module.weight, src, perm=perm)
            bias = module.bias
        else:
            raise ValueError(f"layer {src}: {type(module).__name__} is not supported by the GGUF exporter "
                             f"(expected QuantLinear, QALoRALinear or nn.Linear)")
        if bias is not None:
            self.add_float(gname.replace(".weight", ".bias"), bias, src + ".bias", always_f32=True, perm=perm)

    def _check_packed(self, base: QuantLinear, delta: Optional[torch.Tensor], dscale: Optional[torch.Tensor],
                      src: str) -> None:
        """Refuse what Q4_1 cannot hold as asked (every refusal before a byte is written)."""
        if base.group_size % Q4_1_GROUP_SIZE:
            raise ValueError(f"layer {src}: group_size {base.group_size} is not a multiple of 32")
        self.packed_kinds.add((base.bits, base.group_size, base.scale.dtype, base.zero.dtype))
        if (base.bits, base.group_size) != (4, 32) and not self.allow_larger:
            src_bpw = _source_bits_per_weight(base.bits, base.group_size, base.scale.dtype, base.zero.dtype)
            raise ValueError(
                f"layer {src}: INT{base.bits} with group_size {base.group_size} has no GGUF type of its own. "
                f"Q4_1 holds it exactly (codes fit a nibble, each group of {base.group_size} becomes "
                f"{base.group_size // 32} Q4_1 blocks with the same scale and zero), but at "
                f"{Q4_1_BITS_PER_WEIGHT:.1f} bits/weight instead of this model's {src_bpw:.3f}: a file "
                f"{Q4_1_BITS_PER_WEIGHT / src_bpw:.1f}x larger than the model. Pass allow_larger=True "
                f"(CLI: --allow-larger) to write it so; nothing is lost either way but the size")
        scale16, exact = _merged_scale16(base, dscale)
        if not exact and not self.lossy:
            stored = base.scale.detach().cpu().double()
            if dscale is not None:  # what a merge would store
                stored = round_to_storage(stored + dscale.double(), base.scale.dtype).double()
            diff = (scale16.double() - stored).abs()
            rel = (diff / stored.abs().clamp_min(1e-300)).max().item()
            what = "merged scales (scale + dscale)" if dscale is not None else "scales"
            raise ValueError(
                f"layer {src}: {int((diff > 0).sum())} of {diff.numel()} {what} ({base.scale.dtype}) are not "
                f"float16 numbers; Q4_1 stores float16 scales, so writing them would change those weights "
                f"(scales by up to {rel:.3g} relative). Pass lossy=True (CLI: --lossy) to round them; the "
                f"weight error is then reported")
        # The zeros must fit float16 whatever the caller allows.
        zero_rounding_loss(base.zero.detach().cpu(), delta)
        if not exact:
            self.stats.lossy_layers += 1

    def add_embedding(self, inner: nn.Module, vocab_size: int) -> nn.Module:
        emb = inner.embed_tokens
        if type(emb) is not nn.Embedding:
            raise ValueError(f"layer model.embed_tokens: {type(emb).__name__} is not supported (expected "
                             f"nn.Embedding)")
        if emb.weight.shape[0] != vocab_size:
            raise ValueError(f"model.embed_tokens has {emb.weight.shape[0]} rows but config.vocab_size is "
                             f"{vocab_size}")
        self.add_float("token_embd.weight", emb.weight, "model.embed_tokens")
        self.covered.add("model.embed_tokens")
        return emb

    def add_decoder_layer(self, i: int, layer: nn.Module, hp: dict) -> None:
        prefix = f"model.layers.{i}"
        for hf, g in _BLOCK_NORMS.items():
            norm = getattr(layer, hf, None)
            w = getattr(norm, "weight", None)
            if w is None or tuple(w.shape) != (hp["hidden"],) or getattr(norm, "bias", None) is not None:
                raise ValueError(f"layer {prefix}.{hf}: expected an RMSNorm with a ({hp['hidden']},) weight")
            self.add_float(f"blk.{i}.{g}.weight", w, f"{prefix}.{hf}", always_f32=True)
            self.covered.add(f"{prefix}.{hf}")
        heads = {"self_attn.q_proj": hp["n_head"], "self_attn.k_proj": hp["n_head_kv"]}
        for hf, g in _BLOCK_TENSORS.items():
            try:
                module = layer.get_submodule(hf)
            except AttributeError:
                raise ValueError(f"layer {prefix}.{hf}: missing (not a llama decoder layer)") from None
            self.add_linear(f"blk.{i}.{g}.weight", module, f"{prefix}.{hf}", heads.get(hf))
            self.covered.add(f"{prefix}.{hf}")

    def add_output(self, model: nn.Module, inner: nn.Module, emb: nn.Module, hp: dict) -> None:
        """The final norm, and the head unless it is tied to the embedding (llama.cpp then reuses it)."""
        norm_w = getattr(inner.norm, "weight", None)
        if norm_w is None or tuple(norm_w.shape) != (hp["hidden"],):
            raise ValueError(f"layer model.norm: expected an RMSNorm with a ({hp['hidden']},) weight")
        self.add_float("output_norm.weight", norm_w, "model.norm", always_f32=True)
        self.covered.add("model.norm")

        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head")
        head_tied = hp["tied"] and isinstance(head, nn.Linear) and head.weight is emb.weight
        if hp["tied"] and not head_tied:
            raise ValueError("model: config.tie_word_embeddings is set but lm_head does not share the embedding's "
                             "weight (a quantized or retrained head?); untie it in the config to export it")
        if not head_tied:
            self.add_linear("output.weight", head, "lm_head", None)
        self.covered.add("lm_head")

    def check_complete(self, model: nn.Module) -> None:
        """Anything with weights that the tables did not place is refused by name; so is a float model."""
        covered = self.covered
        unknown = sorted({k.rsplit(".", 1)[0] for k in model.state_dict()
                          if not any(k == c or k.startswith(c + ".") for c in covered)})
        if unknown:
            raise ValueError(f"layer {unknown[0]}: not part of a llama model as the GGUF exporter knows it "
                             f"({len(unknown)} unexpected module(s): {', '.join(unknown[:5])})")
        if not self.packed_kinds:
            raise ValueError("model: no packed (QuantLinear / QALoRALinear) layer; the GGUF exporter writes "
                             "quantized models: quantize it first")


def _plan(model: nn.Module, tokenizer_info: dict, *, allow_larger: bool, lossy: bool, float_type: str,
          stats: _Stats) -> tuple[list[_Tensor], dict]:
    """Check everything and list the file's tensors (data made lazily, one at a time, while writing).

    Every refusal happens here, before a byte is written.
    """
    hp = _hparams(model.config)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or len(layers) != hp["n_layer"]:
        raise ValueError(f"model: expected a LlamaForCausalLM layout (model.model.layers with {hp['n_layer']} "
                         f"layers)")
    plan = _Plan(float_type=float_type, allow_larger=allow_larger, lossy=lossy, stats=stats)
    emb = plan.add_embedding(inner, hp["vocab_size"])
    for i, layer in enumerate(layers):
        plan.add_decoder_layer(i, layer, hp)
    plan.add_output(model, inner, emb, hp)
    plan.check_complete(model)

    shapes = {(b, g) for b, g, _, _ in plan.packed_kinds}
    if len(shapes) > 1:
        hp["mixed"] = sorted(shapes)
    hp["packed_kinds"] = plan.packed_kinds
    if tokenizer_info["vocab_size"] > hp["vocab_size"]:
        raise ValueError(f"tokenizer has {tokenizer_info['vocab_size']} tokens but the model's vocabulary is "
                         f"{hp['vocab_size']}")
    return plan.tensors, hp


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def _tokenizer_json(tokenizer) -> dict:
    """A fast tokenizer's ``tokenizer.json`` (as a dict), refused unless it is byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ValueError(f"tokenizer: expected a fast (tokenizers-backed) byte-level BPE tokenizer; got "
                         f"{type(tokenizer).__name__}")
    tj = json.loads(backend.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer: model type {model.get('type')!r} is not supported (only byte-level BPE)")
    if model.get("byte_fallback"):
        raise ValueError("tokenizer: BPE with byte_fallback (a SentencePiece-style vocabulary) is not supported")
    if tj.get("normalizer") is not None:
        raise ValueError(f"tokenizer: a normalizer ({tj['normalizer'].get('type')}) is not supported by the "
                         f"GGUF exporter (llama.cpp's byte-level BPE has none)")
    dec = tj.get("decoder") or {}
    if dec.get("type") != "ByteLevel":
        raise ValueError(f"tokenizer: decoder {dec.get('type')!r} is not byte-level; only byte-level BPE is supported")
    return tj


def _token_list(tj: dict, config_vocab_size: int) -> tuple[list[str], list, int]:
    """``(tokens, token types, tokenizer's own size)``, padded with UNUSED tokens to the model's vocabulary."""
    gguf = _gguf()
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens") or []}
    for i, a in added.items():
        vocab[a["content"]] = i
    n = max(vocab.values()) + 1
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(max(config_vocab_size, n)):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types, n


def _special_id(tokenizer, config, attr: str) -> Optional[int]:
    v = getattr(tokenizer, attr, None)
    if v is None:
        v = getattr(config, attr, None)
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return None if v is None else int(v)


def _adds_bos_eos(tokenizer, bos: Optional[int], eos: Optional[int]) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS, seen from what it does."""
    probe = "Hello world 123"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    add_bos = bos is not None and full[:1] == [bos] and full[1:len(plain) + 1] == plain
    add_eos = eos is not None and full[-1:] == [eos] and len(full) == len(plain) + int(add_bos) + 1
    if full != ([bos] if add_bos else []) + plain + ([eos] if add_eos else []):
        raise ValueError(f"tokenizer: its post-processor adds tokens other than BOS/EOS ({full} vs {plain}); "
                         f"llama.cpp could not reproduce that")
    return add_bos, add_eos


def _tokenizer_info(tokenizer, config, tokenizer_pre: Optional[str]) -> dict:
    """Everything the GGUF tokenizer keys need, read from a fast (tokenizers-backed) tokenizer."""
    tj = _tokenizer_json(tokenizer)
    pre = tokenizer_pre or detect_tokenizer_pre(tj)
    tokens, types, n = _token_list(tj, int(config.vocab_size))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges") or []]
    bos, eos, pad, unk = (_special_id(tokenizer, config, f"{k}_token_id") for k in ("bos", "eos", "pad", "unk"))
    add_bos, add_eos = _adds_bos_eos(tokenizer, bos, eos)
    return {
        "pre": pre, "tokens": tokens, "types": types, "merges": merges, "vocab_size": n,
        "bos": bos, "eos": eos, "pad": pad, "unk": unk, "add_bos": add_bos, "add_eos": add_eos,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _write_metadata(writer, hp: dict, tok: dict, name: str, file_type: int) -> None:
    gguf = _gguf()
    writer.add_type("model")
    writer.add_name(name)
    writer.add_quantized_by(f"qalora_ext {library_version() or 'unknown'}")
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(hp["n_layer"])
    writer.add_context_length(hp["ctx"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["rms_eps"])
    writer.add_vocab_size(hp["vocab_size"])
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] * hp["n_head"] != hp["hidden"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types([int(t) for t in tok["types"]])
    writer.add_token_merges(tok["merges"])
    for key, adder in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if tok[key] is not None:
            adder(tok[key])
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(tok["add_eos"])
    writer.add_add_space_prefix(False)
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])


def _progress(items: list, enabled: bool) -> Iterator:
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc="export GGUF", unit="tensor", disable=not enabled or None, leave=False))


def _add_tensor_infos(writer, tensors: list[_Tensor]) -> None:
    gguf = _gguf()
    for t in tensors:
        if t.qtype == gguf.GGMLQuantizationType.Q4_1:
            N, K = t.shape
            writer.add_tensor_info(t.name, (N, K // Q4_1_GROUP_SIZE * Q4_1_BLOCK_BYTES), np.dtype(np.uint8),
                                   t.nbytes, raw_dtype=t.qtype)
        else:
            dt = np.float16 if t.qtype == gguf.GGMLQuantizationType.F16 else np.float32
            writer.add_tensor_info(t.name, t.shape, np.dtype(dt), t.nbytes)


def _write_file(out_path: Path, tensors: list[_Tensor], hp: dict, tok: dict, name: str, progress: bool) -> None:
    """Write the file into a hidden temporary sibling, fsync it, and rename it over ``out_path``."""
    gguf = _gguf()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # The PID in the name tells a later export whether the writer is gone (kill -9 runs no cleanup).
    remove_stale_leftovers(out_path)
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    writer = gguf.GGUFWriter(tmp, hp["arch"])
    try:
        _write_metadata(writer, hp, tok, name, int(gguf.LlamaFileType.MOSTLY_Q4_1))
        _add_tensor_infos(writer, tensors)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in _progress(tensors, progress):
            data = t.produce()
            if data.nbytes != t.nbytes:  # pragma: no cover - a bug, never a user error
                raise RuntimeError(f"tensor {t.name}: produced {data.nbytes} bytes, planned {t.nbytes}")
            writer.write_tensor_data(data)
        assert writer.fout is not None
        for f in writer.fout:
            f.flush()
            os.fsync(f.fileno())
        writer.close()
        os.replace(tmp, out_path)
        fsync_dir(out_path.parent)
    except BaseException:
        writer.close()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def export_gguf(
    model: nn.Module,
    out_path: PathLike,
    tokenizer=None,
    *,
    allow_larger: bool = False,
    lossy: bool = False,
    float_type: str = "f32",
    tokenizer_pre: Optional[str] = None,
    name: Optional[str] = None,
    progress: bool = True,
) -> GGUFExportReport:
    """Write a quantized llama-family model as a GGUF file (packed layers as Q4_1); returns a report.

    ``model``: a loaded model (its packed layers ``QuantLinear``, or
    ``QALoRALinear`` whose adapters are then folded into the zeros here, in
    float64, without changing the model) with its ``tokenizer`` (required:
    the file carries the vocabulary). A saved folder is loaded by the caller
    (:func:`qalora_ext.load_quantized`, :func:`qalora_ext.load_adapter`; the
    CLI's ``qalora export`` does so).

    ``allow_larger``: write (bits, group_size) other than (4, 32), exactly,
    as Q4_1 at 5.0 bits/weight. ``lossy``: round scales that are not float16
    numbers (bfloat16 / float32 scales) instead of refusing; the weight error
    is reported. Zeros always become float16 (Q4_1's ``m``): the change is
    reported, and so is the fraction of a merged adapter lost to it, with a
    warning above 1% (SPEC). ``float_type``: ``"f32"`` (exact, the default) or
    ``"f16"`` for the embeddings and unquantized layers (norms stay F32).
    ``tokenizer_pre``: llama.cpp's pre-tokenizer name, detected from the
    tokenizer when None (:func:`detect_tokenizer_pre`).

    The file appears at ``out_path`` only once complete (written to a hidden
    temporary file next to it, then renamed). Raises ValueError, naming the
    layer or setting, for anything it cannot write as asked.
    """
    if float_type not in ("f32", "f16"):
        raise ValueError(f"float_type must be 'f32' or 'f16'; got {float_type!r}")
    out_path = Path(os.fspath(out_path)).expanduser()
    if out_path.is_dir():
        raise IsADirectoryError(f"out_path {out_path} is a directory; give the .gguf file's path")
    with torch.no_grad():
        report = _export(model, out_path, tokenizer, allow_larger=allow_larger, lossy=lossy, float_type=float_type,
                         tokenizer_pre=tokenizer_pre, name=name, progress=progress)
    if report.adapter_lost_fraction_worst_layer is not None and \
            report.adapter_lost_fraction_worst_layer > MERGE_WARN_FRACTION:
        bad = report.adapter_layers_over_1pct
        warnings.warn(f"export_gguf: {bad} layer(s) lost more than {100 * MERGE_WARN_FRACTION:g}% of their "
                      f"adapter to the float16 zeros of Q4_1 (worst: {report.adapter_worst_layer}, "
                      f"{100 * report.adapter_lost_fraction_worst_layer:.2f}%; whole model "
                      f"{100 * (report.adapter_lost_fraction or 0):.2f}%)", stacklevel=2)
    return report


def _export(model: nn.Module, out_path: Path, tokenizer, *, allow_larger: bool, lossy: bool, float_type: str,
            tokenizer_pre: Optional[str], name: Optional[str], progress: bool) -> GGUFExportReport:
    if tokenizer is None:
        raise ValueError("tokenizer: required with a loaded model (the GGUF file carries the tokenizer)")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model: expected a transformers causal LM (with .config); got {type(model).__name__}")
    name = name or str(getattr(config, "_name_or_path", "") or "").rstrip("/").split("/")[-1] or "model"
    stats = _Stats()
    tok = _tokenizer_info(tokenizer, config, tokenizer_pre)
    tensors, hp = _plan(model, tok, allow_larger=allow_larger, lossy=lossy, float_type=float_type, stats=stats)
    _write_file(out_path, tensors, hp, tok, name, progress)
    return _report(out_path, tensors, hp, tok["pre"], stats, float_type)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _report_notes(hp: dict, stats: _Stats, float_type: str, bits: int, group: int) -> list[str]:
    notes = []
    if "mixed" in hp:
        notes.append(f"mixed packed layers {hp['mixed']}: source bits/weight given for {bits}-bit G{group}")
    if not stats.layer_lost:
        notes.append("the model held no adapter (already merged?): the fraction of a merged adapter lost to "
                     "float16 zeros cannot be known without it; export the unmerged model (its adapter loaded) to "
                     "measure it")
    if float_type == "f16":
        notes.append(f"float tensors written as F16 (max change {stats.float_max_change:.3g})")
    return notes


def _report(out_path: Path, tensors: list[_Tensor], hp: dict, tokenizer_pre: str, stats: _Stats,
            float_type: str) -> GGUFExportReport:
    gguf = _gguf()
    q4 = [t for t in tensors if t.qtype == gguf.GGMLQuantizationType.Q4_1]
    fl = [t for t in tensors if t.qtype != gguf.GGMLQuantizationType.Q4_1]
    packed_params = sum(t.shape[0] * t.shape[1] for t in q4)
    float_params = sum(int(np.prod(t.shape)) for t in fl)
    kinds = sorted(hp["packed_kinds"], key=str)
    bits, group = kinds[0][0], kinds[0][1]
    file_bytes = out_path.stat().st_size
    lost = math.sqrt(stats.lost_sq / stats.delta_sq) if stats.delta_sq > 0 else (0.0 if stats.layer_lost else None)
    worst = max(stats.layer_lost, key=stats.layer_lost.get) if stats.layer_lost else None
    return GGUFExportReport(
        path=str(out_path), file_bytes=file_bytes, architecture=hp["arch"], n_tensors=len(tensors),
        n_q4_1=len(q4), n_float=len(fl), float_type=float_type, packed_params=packed_params,
        float_params=float_params, source_bits=bits, source_group_size=group,
        source_bits_per_weight=_source_bits_per_weight(*kinds[0]),
        gguf_bits_per_weight=Q4_1_BITS_PER_WEIGHT,
        file_bits_per_param=8 * file_bytes / max(1, packed_params + float_params),
        widened=any((b, g) != (4, 32) for b, g, _, _ in kinds), lossy_scales=stats.lossy_layers,
        max_weight_change=stats.max_change,
        weight_rel_error=math.sqrt(stats.err_sq / stats.ref_sq) if stats.ref_sq > 0 else 0.0,
        zero_rounding_max_change=stats.zero_max_change, adapters_merged=len(stats.layer_lost),
        adapter_lost_fraction=lost,
        adapter_lost_fraction_worst_layer=stats.layer_lost[worst] if worst else None, adapter_worst_layer=worst,
        float_max_change=stats.float_max_change, tokenizer_pre=tokenizer_pre, vocab_size=hp["vocab_size"],
        adapter_layers_over_1pct=sum(v > MERGE_WARN_FRACTION for v in stats.layer_lost.values()),
        notes=_report_notes(hp, stats, float_type, bits, group),
    )

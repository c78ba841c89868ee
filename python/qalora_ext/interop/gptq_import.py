"""Import AutoGPTQ / GPTQModel checkpoints into the qalora_ext format.

A GPTQ layer stores ``W[n, k] = s[g, n] * (q[k, n] - z[g, n])`` with integer
zeros ``z`` and ``g = g_idx[k]``. Our format (SPEC) stores
``W~ = scale * q + zero`` with a float zero, so a layer converts exactly with
``scale = s`` and ``zero = -s * z`` computed in float32: ``s`` is float16 (or
bfloat16), ``z`` has at most 4 bits, so both products are exact in float32 and
``s * q + (-s * z)`` rounds the exact value ``s * (q - z)`` once -- the
dequantized weight is bit for bit GPTQ's ``s * (q - z)`` in float32.

The GPTQ packed layouts (int32 words; read from AutoGPTQ's ``QuantLinear.pack``
and GPTQModel's ``pack_rows`` / ``pack_cols``, re-implemented here):

* ``qweight`` (K * b / 32, N): each column ``n`` is a little-endian bitstream
  of the codes ``q[0, n], q[1, n], ...`` packed along K: code ``k`` sits at
  bits ``[b*k, b*k + b)`` of the column, i.e. in word ``b*k // 32`` at offset
  ``b*k % 32``. For b = 2, 4 a word holds 32/b whole codes; for b = 3 every
  32 codes fill 3 words and codes 10 and 21 straddle two words (code 10: 2
  low bits at bits 30-31 of word 0, its high bit at bit 0 of word 1; code 21:
  its low bit at bit 31 of word 1, 2 high bits at bits 0-1 of word 2).
  Example (b = 4): codes 1, 2, ..., 8 down one column pack into 0x87654321.
* ``qzeros`` (L, N * b / 32): the same bitstream, packed along N (row ``g``
  holds ``z[g, 0], z[g, 1], ...``).
* ``scales`` (L, N) float16; ``g_idx`` (K,) int32 group of each input channel;
  ``bias`` (N,) optional.

Zero conventions (``checkpoint_format`` / ``format`` in the quantize config):

* ``"gptq"`` (v1, AutoGPTQ and the default when absent) stores ``z - 1``.
  ``z = 0`` (an asymmetric group with no negative weight) is then stored as
  ``-1``, i.e. the field holds ``2^b - 1``. GPTQModel and AutoGPTQ's torch path
  for 2/4 bits read it back as ``(stored + 1) mod 2^b = 0`` (the writer's
  intent, our default ``v1_wrap_zeros=True``); AutoGPTQ's old CUDA kernels
  and its 3-bit torch path compute ``stored + 1 = 2^b`` without the wrap
  (``v1_wrap_zeros=False`` reproduces those). Either way the importer warns
  when it meets such a field.
* ``"gptq_v2"`` (GPTQModel) stores ``z`` itself.

Act-order (``desc_act``) checkpoints keep the input channels in their
original order and give each one its group through ``g_idx``. SPEC groups are
contiguous runs of G channels, so a layer converts exactly only when ``g_idx``
is constant on every run ``[j*G, (j+1)*G)`` (always true without act-order and
with ``static_groups``; then group ``j`` takes the scales and zeros of GPTQ
group ``g_idx[j*G]``). Any other ``g_idx`` is refused: no exact un-permutation
exists without permuting the previous layer's outputs.

Entry points: :func:`convert_gptq_layer` (one layer's tensors) and
:func:`import_gptq` (a checkpoint folder -> a transformers model with
``QuantLinear`` layers, ready for :func:`qalora_ext.save_quantized`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .. import ops
from ..checkpoint.files import dtype_name, read_json
from ..checkpoint.quantized import CONFIG_NAME, WEIGHTS_INDEX_NAME
from ..format import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, check_bits, check_group_size, packed_row_words
from ..nn import QuantLinear

__all__ = [
    "GPTQ_CONVENTIONS",
    "unpack_gptq_qweight",
    "unpack_gptq_qzeros",
    "decode_gptq_zeros",
    "convert_gptq_layer",
    "read_gptq_config",
    "import_gptq",
    "convert_gptq",
    "normalize_convention",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

GPTQ_CONVENTIONS = ("gptq", "gptq_v2")
"""``"gptq"``: v1, zeros stored minus one (AutoGPTQ); ``"gptq_v2"``: zeros stored as is."""

_CONVENTION_ALIASES = {
    "gptq": "gptq", "v1": "gptq", "gptq_v1": "gptq",
    "gptq_v2": "gptq_v2", "v2": "gptq_v2",
}
_QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")
_GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_IGNORABLE_KEYS = re.compile(r".*\.rotary_emb\.inv_freq$")


def normalize_convention(convention: Any) -> str:
    """``"gptq"`` (v1, zero minus one) or ``"gptq_v2"``; accepts ``"v1"`` / ``"v2"`` too."""
    key = str(convention).strip().lower() if isinstance(convention, str) else None
    if key not in _CONVENTION_ALIASES:
        raise ValueError(f"convention must be 'gptq' (v1: zeros stored minus one) or 'gptq_v2' (zeros stored as "
                         f"is); got {convention!r}")
    return _CONVENTION_ALIASES[key]


# ---------------------------------------------------------------------------
# Bit layouts
# ---------------------------------------------------------------------------


def _check_words(t: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{what} must be int32 (GPTQ packs into 32-bit words); got {t.dtype}. Checkpoints packed "
                        f"into other word sizes (GPTQModel pack_dtype int8/int16/int64) are not supported")
    if t.dim() != 2:
        raise ValueError(f"{what} must be 2-D; got shape {tuple(t.shape)}")
    return t


def _unpack_bitstream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Codes 0..count-1 of the little-endian bitstreams running down dim 0 of int32 ``words`` (R, C).

    Code ``i`` of column ``c`` occupies bits ``[bits*i, bits*i + bits)`` of the
    stream ``words[:, c]``: word ``bits*i // 32``, offset ``bits*i % 32``; a code
    that does not fit in its word takes its high bits from the low bits of the
    next word (b = 3: codes 10 and 21 of every 32). Every ``bits`` words hold
    exactly 32 codes, so the stream is cut into such chunks and each of the 32
    positions is one shift over whole rows. int32 arithmetic: ``>>`` is
    arithmetic, so every shifted value is masked to the bits it owns.
    Returns uint8 codes (count, C).
    """
    chunks = -(-count // 32)
    rows, cols = words.shape
    if rows < chunks * bits:  # a tail chunk cut short: pad with zero words
        words = torch.cat([words, words.new_zeros(chunks * bits - rows, cols)], dim=0)
    w = words[: chunks * bits].reshape(chunks, bits, cols)
    out = torch.empty(chunks, 32, cols, dtype=torch.uint8, device=words.device)
    mask = (1 << bits) - 1
    for j in range(32):
        word, off = divmod(bits * j, 32)
        if off + bits <= 32:
            v = (w[:, word] >> off) & mask
        else:  # straddles: low (32 - off) bits from this word, the rest from the next
            low = 32 - off
            v = ((w[:, word] >> off) & ((1 << low) - 1)) | ((w[:, word + 1] << low) & mask)
        out[:, j] = v
    return out.reshape(chunks * 32, cols)[:count]


def unpack_gptq_qweight(qweight: torch.Tensor, bits: int, in_features: Optional[int] = None) -> torch.Tensor:
    """GPTQ ``qweight`` (K*b/32, N) int32 -> codes ``q`` (N, K) uint8 (our orientation)."""
    _check_bits(bits, "unpack_gptq_qweight")
    words = _check_words(qweight, "qweight")
    rows = words.shape[0]
    k = in_features if in_features is not None else rows * 32 // bits
    if k <= 0 or k % 32 or rows != k * bits // 32:
        raise ValueError(f"qweight has {rows} rows; {bits}-bit codes of in_features={k} need {k * bits // 32} "
                         f"(in_features must be a multiple of 32)")
    return _unpack_bitstream(words, bits, k).t().contiguous()


def unpack_gptq_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """GPTQ ``qzeros`` (L, ceil(N*b/32)) int32 -> the stored zero fields (L, N) int64 (not yet decoded)."""
    _check_bits(bits, "unpack_gptq_qzeros")
    words = _check_words(qzeros, "qzeros")
    need = math.ceil(out_features * bits / 32)
    most = math.ceil(out_features / 32) * bits  # padded to whole 32-code chunks
    if not need <= words.shape[1] <= most:
        raise ValueError(f"qzeros has {words.shape[1]} columns; {bits}-bit zeros of out_features={out_features} "
                         f"need {need}" + (f" to {most}" if most != need else ""))
    return _unpack_bitstream(words.t().contiguous(), bits, out_features).t().to(torch.int64)


def decode_gptq_zeros(stored: torch.Tensor, bits: int, convention: str, v1_wrap_zeros: bool = True) -> torch.Tensor:
    """The integer zeros ``z`` from the stored fields, per convention (see the module docstring)."""
    convention = normalize_convention(convention)
    if convention == "gptq_v2":
        return stored.clone()
    z = stored + 1
    return z & ((1 << bits) - 1) if v1_wrap_zeros else z


def _check_bits(bits: Any, where: str) -> None:
    """:func:`qalora_ext.format.check_bits`, its message naming ``where`` (the file or layer) and GPTQ."""
    try:
        check_bits(bits)
    except ValueError:
        raise ValueError(f"{where}: unsupported bits={bits!r}; qalora_ext imports 2-, 3- and 4-bit GPTQ layers "
                         f"(supported: {', '.join(map(str, SUPPORTED_BITS))})") from None


def _check_group_size(group_size: Any, where: str) -> None:
    """:func:`qalora_ext.format.check_group_size`, its message naming ``where`` and GPTQ's -1 (per channel)."""
    try:
        check_group_size(group_size)
    except ValueError:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise ValueError(f"{where}: group_size must be an int; got {group_size!r}") from None
        if group_size == -1:
            raise ValueError(f"{where}: group_size=-1 (one group per output channel) is not supported; qalora_ext "
                             f"needs group_size {', '.join(map(str, SUPPORTED_GROUP_SIZES))} (the QA-LoRA pooling "
                             f"groups are the quantization groups). Re-quantize with one of these group sizes"
                             ) from None
        raise ValueError(f"{where}: unsupported group_size={group_size}; qalora_ext needs group_size "
                         f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}") from None


# ---------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------


def _group_map(g_idx: Optional[torch.Tensor], in_features: int, group_size: int, groups: int,
               name: str) -> torch.Tensor:
    """For each of our contiguous groups, the GPTQ group whose scales/zeros it takes."""
    ours = in_features // group_size
    if g_idx is None:
        return torch.arange(ours, dtype=torch.int64)
    if not isinstance(g_idx, torch.Tensor) or g_idx.dtype.is_floating_point or g_idx.dtype == torch.bool:
        raise TypeError(f"{name}: g_idx must be an integer tensor; got "
                        f"{g_idx.dtype if isinstance(g_idx, torch.Tensor) else type(g_idx).__name__}")
    g = g_idx.reshape(-1).to(torch.int64).cpu()
    if g.numel() != in_features:
        raise ValueError(f"{name}: g_idx has {g.numel()} entries; expected one per input channel ({in_features})")
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
        raise ValueError(f"{name}: g_idx values must lie in [0, {groups}) (the number of scale rows); got "
                         f"[{int(g.min())}, {int(g.max())}]")
    blocks = g.view(ours, group_size)
    first = blocks[:, :1]
    bad = (blocks != first).any(dim=1)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        k = j * group_size + int((blocks[j] != blocks[j, 0]).nonzero()[0, 0])
        moved = int((g != torch.arange(in_features) // group_size).sum())
        raise ValueError(
            f"{name}: act-order (desc_act) g_idx whose groups are not contiguous: input channel {k} is in GPTQ "
            f"group {int(g[k])} but channel {j * group_size} of the same run of {group_size} channels "
            f"[{j * group_size}, {(j + 1) * group_size}) is in group {int(g[j * group_size])} "
            f"({moved} of {in_features} channels differ from k // group_size). qalora_ext groups are contiguous "
            f"runs of group_size input channels (SPEC), and this layer cannot be converted exactly; re-quantize "
            f"with desc_act=False, or with desc_act=True and static_groups=True")
    return first[:, 0].clone()


def _check_layer_tensors(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                         group_size: int, in_features: Optional[int], out_features: Optional[int],
                         name: str) -> tuple[int, int, int]:
    """Types and shapes of one GPTQ layer's tensors, checked; returns ``(N, K, groups)``."""
    for what, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {what} must be a torch.Tensor; got {type(t).__name__}")
    if scales.dtype not in _SCALE_DTYPES:
        raise TypeError(f"{name}: scales must be float16, bfloat16 or float32; got {scales.dtype}")
    if scales.dim() != 2:
        raise ValueError(f"{name}: scales must be 2-D (groups, out_features); got shape {tuple(scales.shape)}")
    if qweight.dim() != 2:
        raise ValueError(f"{name}: qweight must be 2-D (in_features*bits/32, out_features); got shape "
                         f"{tuple(qweight.shape)}")
    n = qweight.shape[1] if out_features is None else int(out_features)
    k = qweight.shape[0] * 32 // bits if in_features is None else int(in_features)
    if qweight.shape[1] != n:
        raise ValueError(f"{name}: qweight has {qweight.shape[1]} columns; expected out_features={n}")
    if k % group_size:
        raise ValueError(f"{name}: in_features={k} is not a multiple of group_size={group_size}")
    if qweight.shape[0] * 32 != k * bits:
        raise ValueError(f"{name}: qweight has shape {tuple(qweight.shape)}; {bits}-bit codes of in_features={k}, "
                         f"out_features={n} need ({k * bits // 32}, {n}). Wrong bits in the config?")
    groups = scales.shape[0]
    if scales.shape[1] != n:
        raise ValueError(f"{name}: scales has shape {tuple(scales.shape)}; expected (groups, {n})")
    if groups != k // group_size:  # GPTQ keeps ceil(K/G) scale rows, act-order or not
        raise ValueError(f"{name}: scales has {groups} groups; in_features={k} with group_size={group_size} "
                         f"needs {k // group_size}. Wrong group_size in the config?")
    if qzeros.dim() != 2 or qzeros.shape[0] != groups:
        raise ValueError(f"{name}: qzeros has shape {tuple(qzeros.shape)}; expected ({groups}, "
                         f"{math.ceil(n * bits / 32)}) to match scales")
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"{name}: scales contain non-finite values")
    return n, k, groups


def _convert(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    convention: str = "gptq",
    *,
    in_features: Optional[int] = None,
    out_features: Optional[int] = None,
    v1_wrap_zeros: bool = True,
    zero_dtype: torch.dtype = torch.float32,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """:func:`convert_gptq_layer` plus the count of v1 zero fields at 2^b - 1 (warned about by callers)."""
    _check_bits(bits, name)
    _check_group_size(group_size, name)
    convention = normalize_convention(convention)
    if zero_dtype != torch.float32:
        # -s*z is exact only in float32; a 16-bit zero would round it.
        raise ValueError(f"{name}: zero_dtype must be torch.float32 for an exact GPTQ import; got {zero_dtype}")
    n, k, groups = _check_layer_tensors(qweight, qzeros, scales, bits, group_size, in_features, out_features, name)

    gmap = _group_map(g_idx, k, group_size, groups, name)
    try:
        codes = unpack_gptq_qweight(qweight.cpu(), bits, k)  # (N, K) uint8
        stored = unpack_gptq_qzeros(qzeros.cpu(), bits, n)  # (L, N)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{name}: {e}") from None
    overflow = int((stored[gmap.unique()] == (1 << bits) - 1).sum()) if convention == "gptq" else 0
    z = decode_gptq_zeros(stored, bits, convention, v1_wrap_zeros)  # (L, N)
    s = scales.detach().cpu()
    scale = s[gmap].t().contiguous()  # (N, K/G), GPTQ's dtype
    zint = z[gmap].t().contiguous().to(torch.float32)
    # Exact in float32 for 16-bit scales; "+ 0.0" turns the -0.0 of z = 0 into +0.0.
    zero = -(scale.to(torch.float32) * zint) + 0.0
    packed = ops.pack(codes.contiguous(), bits)
    if tuple(packed.shape) != (n, packed_row_words(k, bits)):  # pragma: no cover - pack's own contract
        raise RuntimeError(f"{name}: packed shape {tuple(packed.shape)} is not ({n}, {packed_row_words(k, bits)})")
    return packed, scale, zero, overflow


def _v1_overflow_message(bits: int, v1_wrap_zeros: bool) -> str:
    if v1_wrap_zeros:
        how = "taken as zero 0 (the writer stored 0 - 1 = -1; GPTQModel's reading)"
    else:
        how = f"taken as zero {1 << bits} (stored + 1 without wrap, as AutoGPTQ's CUDA kernels compute)"
    return (f"zero field(s) hold {(1 << bits) - 1} under the v1 (zero minus one) convention; {how}. "
            f"Pass v1_wrap_zeros={not v1_wrap_zeros} for the other reading")


def convert_gptq_layer(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    convention: str = "gptq",
    *,
    in_features: Optional[int] = None,
    out_features: Optional[int] = None,
    v1_wrap_zeros: bool = True,
    zero_dtype: torch.dtype = torch.float32,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Convert one GPTQ layer to ``(packed, scale, zero)`` of our format, exactly.

    ``qweight`` (K*b/32, N) int32, ``qzeros`` (L, N*b/32) int32, ``scales``
    (L, N) float16/bfloat16/float32, ``g_idx`` (K,) or None, ``convention``
    ``"gptq"`` (v1, zeros minus one) or ``"gptq_v2"``. Returns ``packed`` int32
    (N, S) in layout 1, ``scale`` (N, K/G) in the dtype of ``scales``,
    ``zero = -scale * z`` (N, K/G) float32. The dequantized weight equals
    ``s * (q - z)`` in float32 bit for bit when scales are 16-bit (float32
    scales: within one rounding). ``name`` prefixes error messages.
    """
    packed, scale, zero, overflow = _convert(
        qweight, qzeros, scales, g_idx, bits, group_size, convention, in_features=in_features,
        out_features=out_features, v1_wrap_zeros=v1_wrap_zeros, zero_dtype=zero_dtype, name=name)
    if overflow:
        warnings.warn(f"{name}: {overflow} {_v1_overflow_message(bits, v1_wrap_zeros)}", stacklevel=2)
    return packed, scale, zero


# ---------------------------------------------------------------------------
# A checkpoint folder
# ---------------------------------------------------------------------------


def _quant_configs(src: Path) -> list[tuple[str, dict]]:
    """``[(where, quantize config)]``: the quantize config file first, then config.json's; at least one."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such GPTQ checkpoint directory")
    found: list[tuple[str, dict]] = []
    for fname in _QUANT_CONFIG_FILES:
        if (src / fname).is_file():
            found.append((fname, read_json(src / fname, "the quantize config")))
            break
    if (src / CONFIG_NAME).is_file():
        qc = read_json(src / CONFIG_NAME, "the model config").get("quantization_config")
        if isinstance(qc, dict):
            found.append(("config.json quantization_config", qc))
    if not found:
        raise ValueError(f"{src}: no quantize_config.json and no quantization_config in config.json; "
                         f"not a GPTQ checkpoint")
    return found


def read_gptq_config(src: PathLike) -> dict:
    """The normalized GPTQ quantize config of a checkpoint folder.

    Reads ``quantize_config.json`` (AutoGPTQ / GPTQModel) or else
    ``config.json``'s ``quantization_config``; when both exist their bits and
    group size must agree. Returns ``{"bits", "group_size", "sym", "desc_act",
    "static_groups", "convention", "dynamic", "source"}``.
    """
    src = Path(src)
    found = _quant_configs(src)
    source, qc = found[0]
    method = str(qc.get("quant_method", qc.get("method", "gptq")) or "gptq").lower()
    if method not in ("gptq", "gptqmodel"):
        hint = " (already a qalora_ext checkpoint: load it with load_quantized)" if method == "qalora_ext" else ""
        raise ValueError(f"{src}: {source} has quant_method {method!r}; only GPTQ checkpoints can be imported{hint}")
    if qc.get("is_marlin_format"):
        raise ValueError(f"{src}: {source} marks a Marlin-format checkpoint (is_marlin_format); only the GPTQ "
                         f"layouts 'gptq' and 'gptq_v2' are supported")
    fmt = qc.get("checkpoint_format", qc.get("format")) or "gptq"
    try:
        convention = normalize_convention(fmt)
    except ValueError:
        raise ValueError(f"{src}: {source} has checkpoint_format {fmt!r}; only 'gptq' (v1) and 'gptq_v2' "
                         f"layouts are supported (convert Marlin / BitBLAS / planar checkpoints back to gptq "
                         f"with GPTQModel first)") from None
    pack_dtype = qc.get("pack_dtype")
    if pack_dtype not in (None, "int32", "torch.int32"):
        raise ValueError(f"{src}: {source} has pack_dtype {pack_dtype!r}; only int32 words are supported")
    bits = qc.get("bits")
    group_size = qc.get("group_size")
    _check_bits(bits, f"{src} ({source})")
    _check_group_size(group_size, f"{src} ({source})")
    for other_source, other in found[1:]:
        for key, value in (("bits", bits), ("group_size", group_size)):
            if key in other and other[key] != value:
                raise ValueError(f"{src}: {source} says {key}={value} but {other_source} says {key}={other[key]}")
    dynamic = qc.get("dynamic") or None
    if dynamic is not None and not isinstance(dynamic, dict):
        raise ValueError(f"{src}: {source} 'dynamic' must be an object of per-module overrides")
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    return {
        "bits": bits,
        "group_size": group_size,
        "sym": bool(qc.get("sym", True)),
        "desc_act": bool(qc.get("desc_act", False)),
        "static_groups": bool(qc.get("static_groups", meta.get("static_groups", False))),
        "convention": convention,
        "dynamic": dynamic,
        "source": source,
    }


def _dynamic_overrides(dynamic: Optional[dict], name: str) -> Optional[dict]:
    """GPTQModel's per-module overrides: first matching pattern wins; ``-:`` excludes."""
    if not dynamic:
        return {}
    for pattern, overrides in dynamic.items():
        negative = pattern.startswith("-:")
        regex = pattern[2:] if pattern.startswith(("+:", "-:")) else pattern
        if re.match(regex, name):
            return None if negative else dict(overrides or {})
    return {}


class _Tensors:
    """Tensor names -> safetensors file of a checkpoint folder (single file, index, or several files)."""

    def __init__(self, src: Path) -> None:
        from safetensors import safe_open

        self.src = src
        index = src / WEIGHTS_INDEX_NAME
        self.file_of: dict[str, Path] = {}
        if index.is_file():
            weight_map = read_json(index, "the shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no weight_map")
            for key, fname in weight_map.items():
                path = src / fname
                if not path.is_file():
                    raise ValueError(f"{src}: shard {fname} listed in {index.name} is missing (tensor {key!r})")
                self.file_of[key] = path
        else:
            files = sorted(src.glob("*.safetensors"))
            if not files:
                bins = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
                raise ValueError(f"{src}: no .safetensors weights" + (
                    f" (found {', '.join(bins)}: only safetensors checkpoints are imported; convert them first)"
                    if bins else ""))
            for path in files:
                with safe_open(os.fspath(path), framework="pt") as f:
                    for key in f.keys():
                        if key in self.file_of:
                            raise ValueError(f"{src}: tensor {key!r} is in both {self.file_of[key].name} and "
                                             f"{path.name}")
                        self.file_of[key] = path

    def keys(self):
        return self.file_of.keys()

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.file_of[key]
        with safe_open(os.fspath(path), framework="pt") as f:
            return f.get_tensor(key)


def _build_model(src: Path) -> nn.Module:
    from ..loading.transformers_model import build_transformers_model

    cfg_path = src / CONFIG_NAME
    if not cfg_path.is_file():
        raise ValueError(f"{src}: no config.json (the transformers model config is needed to build the model)")
    return build_transformers_model(read_json(cfg_path, "the model config"), src)


def _import_layer(model: nn.Module, name: str, qcfg: dict, tensors: _Tensors, src: Path,
                  v1_wrap_zeros: bool) -> tuple[QuantLinear, dict, int]:
    """One GPTQ layer as a ``QuantLinear``, its report entry, and its count of v1 zero fields at 2^b - 1."""
    over = _dynamic_overrides(qcfg["dynamic"], name)
    if over is None:
        raise ValueError(f"{name}: the checkpoint has a qweight but its quantize config excludes this "
                         f"module (dynamic '-:' rule)")
    bits = over.get("bits", qcfg["bits"])
    group_size = over.get("group_size", qcfg["group_size"])
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{name}: the checkpoint quantizes this layer but the model built from "
                         f"config.json has no such module (another architecture?)") from None
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{name}: is a {type(module).__name__} in the model, not an nn.Linear; only "
                         f"linear layers can be imported")
    k, n = module.in_features, module.out_features
    missing = [s for s in ("qweight", "qzeros", "scales") if f"{name}.{s}" not in tensors.file_of]
    if missing:
        raise ValueError(f"{name}: missing tensor(s) {', '.join(name + '.' + s for s in missing)} in {src}")
    g_key = f"{name}.g_idx"
    g_idx = tensors.get(g_key) if g_key in tensors.file_of else None
    if g_idx is None and qcfg["desc_act"]:
        raise ValueError(f"{name}: desc_act=True but the checkpoint has no {g_key}; the channel-to-group "
                         f"map is unknown")
    try:
        packed, scale, zero, overflow = _convert(
            tensors.get(f"{name}.qweight"), tensors.get(f"{name}.qzeros"), tensors.get(f"{name}.scales"),
            g_idx, bits, group_size, qcfg["convention"], in_features=k, out_features=n,
            v1_wrap_zeros=v1_wrap_zeros, name=name)
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise type(e)(msg if msg.startswith(name) else f"{name}: {msg}") from None
    b_key = f"{name}.bias"
    bias = tensors.get(b_key) if b_key in tensors.file_of else None
    if bias is None and module.bias is not None:
        raise ValueError(f"{name}: the model's layer has a bias but the checkpoint has no {b_key}")
    layer = QuantLinear(k, n, bits, group_size, bias=bias is not None, scale_dtype=scale.dtype,
                        zero_dtype=torch.float32, device="meta")
    layer.load_packed(packed, scale, zero, bias)
    entry = {"bits": bits, "group_size": group_size, "in_features": k, "out_features": n,
             "scale_dtype": dtype_name(scale.dtype), "g_idx": "none" if g_idx is None else "contiguous"}
    return layer, entry, overflow


def _plain_tensors(model: nn.Module, tensors: _Tensors, quant_keys: set[str], src: Path,
                   dtype: Optional[torch.dtype]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every tensor that is not part of a GPTQ layer, as stored (or cast to ``dtype``); and the ignored ones."""
    expected = set(model.state_dict(keep_vars=True))
    plain = {}
    unexpected = []
    tied_head = _tied_head_key(model)
    for key in tensors.keys():
        if key in quant_keys:
            continue
        if key == tied_head:
            # The config ties the head to the embedding and the checkpoint stores a copy (AutoGPTQ saves the
            # whole state dict): keep the tie when the copy equals the embedding, else untie it.
            emb_key = _input_embedding_key(model)
            if emb_key in tensors.keys() and torch.equal(tensors.get(key), tensors.get(emb_key)):
                continue
            model.config.tie_word_embeddings = False
            log.warning("%s: lm_head.weight differs from the embedding although the config ties them; "
                        "importing them untied", src)
        if key not in expected:
            unexpected.append(key)
            continue
        t = tensors.get(key)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        plain[key] = t
    ignorable = [k for k in unexpected if _IGNORABLE_KEYS.fullmatch(k)]
    unexpected = [k for k in unexpected if not _IGNORABLE_KEYS.fullmatch(k)]
    if unexpected:
        raise ValueError(f"{src}: tensors that the model has no place for ({len(unexpected)}): "
                         f"{', '.join(sorted(unexpected)[:20])}{' ...' if len(unexpected) > 20 else ''} "
                         f"(another architecture, or a layout this importer does not know)")
    return plain, ignorable


def _finish(model: nn.Module, src: Path, dtype: Optional[torch.dtype]) -> None:
    """Tie the head if the config says so, refuse tensors left unloaded, freeze, record the dtype."""
    _tie_if_needed(model)
    left = [n for n, t in (*model.named_parameters(remove_duplicate=False),
                           *model.named_buffers(remove_duplicate=False)) if t.is_meta]
    if left:
        raise ValueError(f"{src}: the checkpoint has no tensor for ({len(left)}): "
                         f"{', '.join(sorted(left)[:20])}{' ...' if len(left) > 20 else ''}")
    for p in model.parameters():
        p.requires_grad_(False)
    if dtype is not None and getattr(model, "config", None) is not None:
        try:  # what save_quantized records as the model's dtype
            model.config.dtype = dtype
        except (AttributeError, TypeError, ValueError):  # pragma: no cover - older configs
            pass


def import_gptq(
    src: PathLike,
    *,
    dtype: Optional[torch.dtype] = None,
    v1_wrap_zeros: bool = True,
    progress: bool = True,
    model: Optional[nn.Module] = None,
) -> nn.Module:
    """Read a GPTQ checkpoint folder; return the model with ``QuantLinear`` layers (float32 zeros).

    ``src``: an AutoGPTQ / GPTQModel folder (``config.json``, the quantize
    config, ``*.safetensors`` in one file or shards with an index). Every layer
    with a ``qweight`` becomes a ``QuantLinear`` whose dequantized weight is
    bit for bit GPTQ's ``s * (q - z)`` in float32; scales keep GPTQ's dtype.
    Other tensors (embeddings, norms, an unquantized lm_head) are loaded as
    stored, or cast to ``dtype`` when given. ``model``: an instance of the
    architecture to fill (default: built from ``config.json``).
    ``v1_wrap_zeros``: how a v1 zero field holding ``2^b - 1`` reads (see the
    module docstring; warned about when met). ``progress``: a tqdm bar over
    layers. The result is ready for :func:`qalora_ext.save_quantized`;
    ``model.qalora_import_report`` says what was converted. Bad input raises
    ``ValueError`` naming the layer and the problem.
    """
    from tqdm.auto import tqdm

    from ..model import set_module

    src = Path(os.path.realpath(os.fspath(src)))
    qcfg = read_gptq_config(src)
    tensors = _Tensors(src)
    if model is None:
        model = _build_model(src)

    prefixes = sorted(k[: -len(".qweight")] for k in tensors.keys() if k.endswith(".qweight"))
    if not prefixes:
        raise ValueError(f"{src}: no '*.qweight' tensor in the checkpoint; nothing is GPTQ-quantized")
    layers: dict[str, QuantLinear] = {}
    report_layers: dict[str, dict] = {}
    overflows: dict[str, int] = {}
    for name in tqdm(prefixes, desc=f"import GPTQ {qcfg['bits']}-bit G{qcfg['group_size']}",
                     disable=not progress or None, leave=False):
        layers[name], report_layers[name], overflow = _import_layer(model, name, qcfg, tensors, src, v1_wrap_zeros)
        if overflow:
            overflows[name] = overflow
    if overflows:
        worst = max(overflows, key=overflows.get)
        warnings.warn(f"import_gptq: {sum(overflows.values())} {_v1_overflow_message(qcfg['bits'], v1_wrap_zeros)} "
                      f"({len(overflows)} layer(s), most in {worst})", stacklevel=2)
    for name, layer in layers.items():
        set_module(model, name, layer)

    quant_keys = {f"{p}.{s}" for p in prefixes for s in _GPTQ_SUFFIXES}
    plain, ignorable = _plain_tensors(model, tensors, quant_keys, src, dtype)
    model.load_state_dict(plain, strict=False, assign=True)
    _finish(model, src, dtype)
    model.qalora_import_report = {
        "format": "gptq",
        "source": os.fspath(src),
        "config_source": qcfg["source"],
        "convention": qcfg["convention"],
        "v1_wrap_zeros": v1_wrap_zeros if qcfg["convention"] == "gptq" else None,
        "sym": qcfg["sym"],
        "desc_act": qcfg["desc_act"],
        "layers": report_layers,
        "v1_zero_fields_at_max": overflows,
        "ignored_tensors": ignorable,
    }
    log.info("imported %d GPTQ layer(s) from %s (%s convention)", len(layers), src, qcfg["convention"])
    return model.eval()


def _tied_head_key(model: nn.Module) -> Optional[str]:
    """The state-dict key of the output head's weight when the config ties it to the embedding, else None."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, mod in model.named_modules():
        if out is not None and mod is out:
            return f"{name}.weight"
    return None


def _input_embedding_key(model: nn.Module) -> Optional[str]:
    get_in = getattr(model, "get_input_embeddings", None)
    inp = get_in() if callable(get_in) else None
    for name, mod in model.named_modules():
        if inp is not None and mod is inp:
            return f"{name}.weight"
    return None


def _tie_if_needed(model: nn.Module) -> None:
    """An lm_head left unloaded because the checkpoint ties it to the embedding shares its weight."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    if not (callable(get_out) and callable(get_in)):
        return
    out, inp = get_out(), get_in()
    if isinstance(out, nn.Linear) and inp is not None and out.weight.is_meta and not inp.weight.is_meta:
        out.weight = inp.weight


_CARRIED_FILES = re.compile(
    r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|.*\.model|"
    r"chat_template.*|generation_config\.json|preprocessor_config\.json)")


def convert_gptq(
    src: PathLike,
    out_dir: PathLike,
    *,
    dtype: Optional[torch.dtype] = None,
    v1_wrap_zeros: bool = True,
    max_shard_size: Union[int, str] = "2GB",
    progress: bool = True,
) -> dict:
    """Folder in, folder out: :func:`import_gptq` then :func:`qalora_ext.save_quantized` to ``out_dir``.

    Tokenizer and generation-config files next to the GPTQ weights are copied
    along. Returns the import report (``"output"``: the checkpoint's path).
    """
    import shutil

    from ..checkpoint import save_quantized

    src = Path(src)
    if Path(os.path.realpath(out_dir)) == Path(os.path.realpath(src)):
        raise ValueError(f"convert_gptq: the output folder is the GPTQ checkpoint {src} itself; write to a new folder")
    model = import_gptq(src, dtype=dtype, v1_wrap_zeros=v1_wrap_zeros, progress=progress)
    # Tokenizer files first: the weights and config.json are then written
    # atomically (config last), so a folder that loads as a model has them.
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for entry in sorted(src.iterdir()):
        if entry.is_file() and _CARRIED_FILES.fullmatch(entry.name) and entry.name != CONFIG_NAME:
            shutil.copy2(entry, out / entry.name)
            copied.append(entry.name)
    out = save_quantized(model, out, max_shard_size=max_shard_size)
    report = dict(model.qalora_import_report)
    report["output"] = os.fspath(out)
    report["copied_files"] = copied
    return report

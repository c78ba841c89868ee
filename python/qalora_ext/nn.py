"""``nn.Module`` front end: a packed quantized linear layer and its QA-LoRA adapter.

``QuantLinear``   frozen packed INT2/3/4 weight (codes, scales, zeros are
                  buffers), ``y = x W~^T + bias``.
``QALoRALinear``  a ``QuantLinear`` plus a trainable pooled adapter
                  ``s * (pool(x) A^T) B^T`` (SPEC), and ``merge()`` which folds
                  the adapter into the zeros.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from . import ops
from .format import (
    LAYOUT_CANONICAL,
    check_bits,
    check_group_size,
    check_in_features,
    check_layout,
    check_store_dtypes,
    packed_row_words,
    round_to_storage,
)

__all__ = ["QuantLinear", "QALoRALinear", "MERGE_WARN_FRACTION"]

MERGE_WARN_FRACTION = 0.01
"""A merge warns when more than this fraction of the adapter is lost to rounding (SPEC)."""



class QuantLinear(nn.Module):
    """A linear layer whose weight is packed to ``bits`` with float scales and zeros.

    ``W~[n, k] = scale[n, k // G] * q[n, k] + zero[n, k // G]``. Codes, scales,
    zeros and bias are buffers, so ``parameters()`` of a quantized model are
    only its adapters. ``.to(dtype)`` / ``.half()`` move the layer but never
    re-round its scales and zeros: their storage dtypes are part of the format.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 32,
        bias: bool = True,
        scale_dtype: torch.dtype = torch.float16,
        zero_dtype: torch.dtype = torch.float32,
        layout: int = LAYOUT_CANONICAL,
        device=None,
    ) -> None:
        super().__init__()
        check_bits(bits)
        check_group_size(group_size)
        check_layout(layout)
        check_in_features(in_features, group_size)
        if out_features < 1:
            raise ValueError(f"out_features must be >= 1; got {out_features}")
        check_store_dtypes(scale_dtype, zero_dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.layout = layout
        groups = in_features // group_size
        self.register_buffer(
            "packed", torch.zeros(out_features, packed_row_words(in_features, bits), dtype=torch.int32, device=device)
        )
        self.register_buffer("scale", torch.zeros(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=zero_dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.register_buffer("bias", None)

    # -- construction --------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int = 32,
        scale_dtype: torch.dtype = torch.float16,
        zero_dtype: torch.dtype = torch.float32,
    ) -> "QuantLinear":
        """Quantize an ``nn.Linear`` with SPEC's round-to-nearest (min-max) per group."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear; got {type(linear).__name__}")
        check_bits(bits)
        check_group_size(group_size)
        check_in_features(linear.in_features, group_size, "from_linear")
        weight = linear.weight.detach()
        device = weight.device
        packed, scale, zero = ops.quantize_rtn(weight.to("cpu"), bits, group_size, scale_dtype, zero_dtype)
        layer = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None,
                    scale_dtype, zero_dtype, device="meta")
        layer.load_packed(packed, scale, zero, linear.bias.detach() if linear.bias is not None else None)
        return layer.to(device)

    def load_packed(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, layout: int = LAYOUT_CANONICAL) -> None:
        """Replace the layer's buffers with already packed tensors (checked)."""
        check_layout(layout)
        want_p = (self.out_features, packed_row_words(self.in_features, self.bits))
        want_s = (self.out_features, self.in_features // self.group_size)
        if packed.dtype != torch.int32 or tuple(packed.shape) != want_p:
            raise ValueError(f"packed must be int32 of shape {want_p}; got {packed.dtype} {tuple(packed.shape)}")
        for name, t in (("scale", scale), ("zero", zero)):
            if tuple(t.shape) != want_s:
                raise ValueError(f"{name} must have shape {want_s}; got {tuple(t.shape)}")
        check_store_dtypes(scale.dtype, zero.dtype, names=("scale", "zero"))
        self.layout = layout
        self.packed = packed.contiguous()
        self.scale = scale.contiguous()
        self.zero = zero.contiguous()
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},); got {tuple(bias.shape)}")
            self.bias = bias.detach().float().contiguous()
        elif self.bias is not None:
            self.bias = torch.zeros(self.out_features, dtype=torch.float32, device=packed.device)

    # -- use -------------------------------------------------------------------

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes under the name quantized-layer tooling looks for (PEFT finds a layer's device there)."""
        return self.packed

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def zero_dtype(self) -> torch.dtype:
        return self.zero.dtype

    def codes(self) -> torch.Tensor:
        """The integer codes q (N, K), uint8."""
        return ops.unpack(self.packed, self.bits, self.in_features, self.layout)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``W~`` (out_features, in_features)."""
        return ops.dequantize(self.packed, self.scale, self.zero, self.bits, self.group_size, self.layout)

    #: Opt-in: quantize activations to int8 per group in CPU forward passes
    #: that need no gradient (``ops.qlinear_int8``: faster decode on CPUs with
    #: VNNI, a bounded change of the numerics). Training and CUDA use float.
    int8_activations: bool = False

    def forward(self, x: torch.Tensor, adapter: Optional[ops.PooledAdapter] = None) -> torch.Tensor:
        """``y = x W~^T + bias``, plus ``adapter``'s pooled term when given (``QALoRALinear`` passes its own)."""
        return ops.packed_linear(x, self.packed, self.scale, self.zero, self.bias, adapter, bits=self.bits,
                                 group_size=self.group_size, layout=self.layout,
                                 int8_activations=self.int8_activations)

    # -- state dicts: the format travels with the data ----------------------

    def _format_record(self) -> list:
        return [self.bits, self.group_size, self.layout, self.in_features]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # The state dict's per-module metadata records what the packed words
        # mean, so loading into a layer of another bit width is refused even
        # when the word counts happen to agree (INT3 and INT4 at K = 32).
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None and prefix[:-1] in metadata:
            metadata[prefix[:-1]]["qalora_format"] = self._format_record()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        recorded = local_metadata.get("qalora_format")
        if recorded is not None and list(recorded) != self._format_record():
            b, g, layout, k = recorded
            error_msgs.append(f"{prefix}packed: saved from a layer with bits={b}, group_size={g}, layout={layout}, "
                              f"in_features={k}; this layer has bits={self.bits}, group_size={self.group_size}, "
                              f"layout={self.layout}, in_features={self.in_features}")
            return
        packed = state_dict.get(prefix + "packed")
        if packed is not None and packed.dtype != torch.int32:
            error_msgs.append(f"{prefix}packed must be int32 (packed words); got {packed.dtype}: a cast state dict "
                              f"(.half(), .float()) reinterprets the codes as numbers")
            return
        for name in ("scale", "zero"):
            t = state_dict.get(prefix + name)
            if t is not None and t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                error_msgs.append(f"{prefix}{name} must be float16, bfloat16 or float32; got {t.dtype}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        # Scales and zeros keep their storage dtypes through .half()/.to(dtype):
        # a dtype cast would re-round them (and erase a merged adapter). Only
        # the device move of `fn` is applied to them.
        originals = {"scale": self.scale, "zero": self.zero}
        super()._apply(fn, recurse)
        for name, orig in originals.items():
            new = self._buffers[name]
            if new.dtype != orig.dtype:
                self._buffers[name] = orig.to(device=new.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, scale_dtype={self.scale.dtype}, "
                f"zero_dtype={self.zero.dtype}, layout={self.layout}"
                + (", int8_activations=True" if self.int8_activations else ""))


class QALoRALinear(nn.Module):
    """A ``QuantLinear`` with a QA-LoRA adapter on group-pooled inputs (SPEC).

    ``y = base(x) + s * (dropout(pool(x)) A^T) B^T`` with ``pool`` the mean over
    the quantization groups, ``A`` (rank, in_features / group_size), ``B``
    (out_features, rank), ``s = alpha / rank`` (``alpha / sqrt(rank)`` with
    rsLoRA). ``lora_A`` and ``lora_B`` (float32) are the only parameters.
    """

    def __init__(self, quant_linear: QuantLinear, rank: int = 16, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        if not isinstance(quant_linear, QuantLinear):
            raise TypeError(f"QALoRALinear wraps a QuantLinear; got {type(quant_linear).__name__}")
        self.check_hyperparameters(rank, alpha, dropout)
        self.base = quant_linear
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        device = quant_linear.packed.device
        groups = quant_linear.in_features // quant_linear.group_size
        self.lora_A = nn.Parameter(torch.empty(rank, groups, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(quant_linear.out_features, rank, dtype=torch.float32, device=device))
        self.reset_adapter()

    @staticmethod
    def check_hyperparameters(rank, alpha, dropout) -> None:
        """rank an integer >= 1, alpha finite, dropout in [0, 1): ValueError naming the one that is not."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1; got {rank!r}")
        try:
            dropout_f, alpha_f = float(dropout), float(alpha)
        except (TypeError, ValueError):
            raise ValueError(f"alpha and dropout must be numbers; got alpha={alpha!r}, dropout={dropout!r}") from None
        if not (0.0 <= dropout_f < 1.0):
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        if not math.isfinite(alpha_f):
            raise ValueError(f"alpha must be finite; got {alpha!r}")

    @staticmethod
    def scaling_for(rank: int, alpha: float, use_rslora: bool) -> float:
        """``s = alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA (SPEC)."""
        return float(alpha) / (math.sqrt(rank) if use_rslora else rank)

    @property
    def scaling(self) -> float:
        return self.scaling_for(self.rank, self.alpha, self.use_rslora)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 32, rank: int = 16, alpha: float = 16,
                    dropout: float = 0.0, use_rslora: bool = False, scale_dtype: torch.dtype = torch.float16,
                    zero_dtype: torch.dtype = torch.float32) -> "QALoRALinear":
        """Quantize ``linear`` (RTN) and attach a fresh adapter."""
        base = QuantLinear.from_linear(linear, bits, group_size, scale_dtype, zero_dtype)
        return cls(base, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora)

    def reset_adapter(self) -> None:
        """SPEC init: A Kaiming-uniform (as PEFT), B = 0 (the adapter adds nothing)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # Convenience views of the base layer.
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)
    bits = property(lambda self: self.base.bits)
    group_size = property(lambda self: self.base.group_size)

    def dequantize(self) -> torch.Tensor:
        return self.base.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.training and self.dropout > 0.0:
            groups = self.base.in_features // self.base.group_size
            keep = 1.0 - self.dropout
            mask = torch.empty((*x.shape[:-1], groups), device=x.device, dtype=torch.float32).bernoulli_(keep)
            mask.div_(keep)
        return self.base(x, adapter=ops.PooledAdapter(self.lora_A, self.lora_B, self.scaling, mask))

    @torch.no_grad()
    def zero_delta(self) -> torch.Tensor:
        """What the adapter adds to each zero, ``s * (B @ A) / G`` (N, K/G), in float64 (SPEC "Merge").

        Because the pooling is a mean, the adapter adds this to every weight of
        group g in row n; merging and every export fold exactly this into the
        zeros, rounding once to the zeros' storage dtype.
        """
        A = self.lora_A.detach().double()
        B = self.lora_B.detach().double()
        delta = self.scaling * (B @ A) / self.base.group_size
        if not bool(torch.isfinite(delta).all()):
            bad = [n for n, t in (("lora_A", A), ("lora_B", B)) if not bool(torch.isfinite(t).all())]
            raise ValueError(f"the adapter holds NaN or infinite values ({', '.join(bad) or 's * B @ A overflows'}); "
                             f"it cannot be merged or exported (a diverged training run?)")
        return delta

    @torch.no_grad()
    def merge(self) -> QuantLinear:
        """Fold the adapter into the zeros: ``zero' = zero + s * (B @ A) / G`` (SPEC).

        Returns a new ``QuantLinear`` of the same bits whose codes and scales are
        bit-identical to the base's. The fraction of the adapter lost to the
        zeros' storage rounding is set as ``merge_lost_fraction`` on the result
        (and on this module) and warned about above 1%.
        """
        base = self.base
        delta = self.zero_delta()
        zero64 = base.zero.double() + delta
        zero_stored = round_to_storage(zero64, base.zero.dtype)
        if not bool(torch.isfinite(zero_stored).all()):
            raise ValueError(f"merge: a merged zero overflows {base.zero.dtype}; store zeros as float32 "
                             f"(zero_dtype=torch.float32)")
        denom = delta.norm().item()
        lost = 0.0 if denom == 0.0 else ((zero_stored.double() - base.zero.double() - delta).norm().item() / denom)
        merged = QuantLinear(base.in_features, base.out_features, base.bits, base.group_size, base.bias is not None,
                             base.scale.dtype, base.zero.dtype, base.layout, device="meta")
        merged.load_packed(base.packed.clone(), base.scale.clone(), zero_stored,
                           base.bias.clone() if base.bias is not None else None, base.layout)
        merged.train(self.training)
        merged.merge_lost_fraction = lost
        self.merge_lost_fraction = lost
        if lost > MERGE_WARN_FRACTION:
            warnings.warn(
                f"merge: {100 * lost:.2f}% of the adapter was lost rounding the zeros to {base.zero.dtype}; "
                f"store zeros as float32 (zero_dtype=torch.float32) to keep it",
                stacklevel=2,
            )
        return merged

    def _apply(self, fn, recurse=True):
        # The adapter's master copy stays float32 (SPEC) through .half()/.to(dtype):
        # only the device move of `fn` is applied to it.
        originals = {"lora_A": self.lora_A.data, "lora_B": self.lora_B.data}
        super()._apply(fn, recurse)
        for name, orig in originals.items():
            p = self._parameters[name]
            if p.dtype != orig.dtype:
                p.data = orig.to(device=p.device)
        return self

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, "
                f"use_rslora={self.use_rslora}")

"""``nn.Module`` front end: a packed quantized linear layer and its QA-LoRA adapter.

``QuantLinear``   frozen packed INT2/3/4 weight (codes, scales, zeros are
                  buffers), ``y = x W~^T + bias``.
``QALoRALinear``  a ``QuantLinear`` plus a trainable pooled adapter
                  ``s * (pool(x) A^T) B^T`` (SPEC), optionally trainable
                  ``dscale``/``dzero``, and ``merge()`` which folds them into
                  the stored scales and zeros.
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

    def forward(self, x: torch.Tensor, adapter: Optional[ops.PooledAdapter] = None, *,
                scale: Optional[torch.Tensor] = None, zero: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``y = x W~^T + bias``, plus ``adapter``'s pooled term when given (``QALoRALinear`` passes its own).

        ``scale`` / ``zero``: computed in place of the stored ones (``QALoRALinear``
        passes ``scale + dscale`` and ``zero + dzero`` when it trains them).
        """
        scale = self.scale if scale is None else scale
        zero = self.zero if zero is None else zero
        return ops.packed_linear(x, self.packed, scale, zero, self.bias, adapter, bits=self.bits,
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
    """A ``QuantLinear`` with a QA-LoRA adapter on group-pooled inputs (SPEC), and
    optionally its own scales and zeros in training.

    ``y = base(x) + s * (dropout(pool(x)) A^T) B^T`` with ``pool`` the mean over
    the quantization groups, ``A`` (rank, in_features / group_size), ``B``
    (out_features, rank), ``s = alpha / rank`` (``alpha / sqrt(rank)`` with
    rsLoRA). ``lora_A`` and ``lora_B`` (float32) are its parameters; ``rank=0``
    has no adapter (then ``train_scale`` or ``train_zero`` must be on).

    ``train_scale=True`` adds a float32 parameter ``dscale`` (out_features,
    groups) and ``train_zero=True`` a float32 parameter ``dzero`` (same shape),
    both starting at zero: the layer then computes with ``scale + dscale`` and
    ``zero + dzero`` (SPEC "Trainable quantization parameters"; the stored
    ``scale``, ``zero`` and codes stay frozen buffers). Without them the module
    has exactly the parameters it always had. ``merge()`` folds all of it into
    the stored scales and zeros, keeping the codes.
    """

    def __init__(self, quant_linear: QuantLinear, rank: int = 16, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, *, train_scale: bool = False, train_zero: bool = False) -> None:
        super().__init__()
        if not isinstance(quant_linear, QuantLinear):
            raise TypeError(f"QALoRALinear wraps a QuantLinear; got {type(quant_linear).__name__}")
        self.check_hyperparameters(rank, alpha, dropout, train_scale=train_scale, train_zero=train_zero)
        self.base = quant_linear
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        device = quant_linear.packed.device
        groups = quant_linear.in_features // quant_linear.group_size
        if rank > 0:
            self.lora_A = nn.Parameter(torch.empty(rank, groups, dtype=torch.float32, device=device))
            self.lora_B = nn.Parameter(torch.zeros(quant_linear.out_features, rank, dtype=torch.float32,
                                                   device=device))
        else:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
        # Registered only when turned on, so a model without them keeps its parameter names.
        for name, on in (("dscale", train_scale), ("dzero", train_zero)):
            if on:
                self.register_parameter(name, nn.Parameter(
                    torch.zeros(quant_linear.out_features, groups, dtype=torch.float32, device=device)))
            else:
                setattr(self, name, None)
        self.reset_adapter()

    @staticmethod
    def check_hyperparameters(rank, alpha, dropout, *, train_scale: bool = False, train_zero: bool = False) -> None:
        """rank an integer >= 1 (or 0 with train_scale/train_zero), alpha finite, dropout in [0, 1):
        ValueError naming the one that is not."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be an integer >= 1 (or 0: no adapter); got {rank!r}")
        if rank == 0 and not (train_scale or train_zero):
            raise ValueError("rank must be an integer >= 1 unless train_scale or train_zero is on (rank 0 means "
                             "no adapter, and would train nothing); got 0")
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
        """``s = alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA (SPEC); 0 without an adapter (rank 0)."""
        if rank == 0:
            return 0.0
        return float(alpha) / (math.sqrt(rank) if use_rslora else rank)

    @property
    def scaling(self) -> float:
        return self.scaling_for(self.rank, self.alpha, self.use_rslora)

    @property
    def train_scale(self) -> bool:
        return self.dscale is not None

    @property
    def train_zero(self) -> bool:
        return self.dzero is not None

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of what this layer trains: lora_A, lora_B, dscale, dzero (those present)."""
        return {n: p for n, p in (("lora_A", self.lora_A), ("lora_B", self.lora_B), ("dscale", self.dscale),
                                  ("dzero", self.dzero)) if p is not None}

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 32, rank: int = 16, alpha: float = 16,
                    dropout: float = 0.0, use_rslora: bool = False, scale_dtype: torch.dtype = torch.float16,
                    zero_dtype: torch.dtype = torch.float32, *, train_scale: bool = False,
                    train_zero: bool = False) -> "QALoRALinear":
        """Quantize ``linear`` (RTN) and attach a fresh adapter."""
        base = QuantLinear.from_linear(linear, bits, group_size, scale_dtype, zero_dtype)
        return cls(base, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, train_scale=train_scale,
                   train_zero=train_zero)

    def reset_adapter(self) -> None:
        """SPEC init: A Kaiming-uniform (as PEFT), B = 0 (the adapter adds nothing); dscale = dzero = 0."""
        if self.lora_A is not None:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        for p in (self.dscale, self.dzero):
            if p is not None:
                nn.init.zeros_(p)

    # Convenience views of the base layer.
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)
    bits = property(lambda self: self.base.bits)
    group_size = property(lambda self: self.base.group_size)

    def effective_scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero the layer computes with: the stored ones, plus dscale / dzero (float32) when trained."""
        scale, zero = self.base.scale, self.base.zero
        if self.dscale is not None:
            scale = scale.float() + self.dscale
        if self.dzero is not None:
            zero = zero.float() + self.dzero
        return scale, zero

    def dequantize(self) -> torch.Tensor:
        """The base's ``W~`` (with trained scales and zeros, when on; the adapter is not included)."""
        if self.dscale is None and self.dzero is None:
            return self.base.dequantize()
        scale, zero = self.effective_scale_zero()
        return ops.dequantize(self.base.packed, scale.detach(), zero.detach(), self.base.bits, self.base.group_size,
                              self.base.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = None
        if self.lora_A is not None:
            mask = None
            if self.training and self.dropout > 0.0:
                groups = self.base.in_features // self.base.group_size
                keep = 1.0 - self.dropout
                mask = torch.empty((*x.shape[:-1], groups), device=x.device, dtype=torch.float32).bernoulli_(keep)
                mask.div_(keep)
            adapter = ops.PooledAdapter(self.lora_A, self.lora_B, self.scaling, mask)
        if self.dscale is None and self.dzero is None:
            return self.base(x, adapter=adapter)
        scale, zero = self.effective_scale_zero()
        return self.base(x, adapter=adapter, scale=scale, zero=zero)

    @torch.no_grad()
    def zero_delta(self) -> torch.Tensor:
        """What training adds to each zero, ``dzero + s * (B @ A) / G`` (N, K/G), in float64 (SPEC).

        Because the pooling is a mean, the adapter adds ``s * (B @ A)[n, g] / G``
        to every weight of group g in row n; merging and every export fold
        exactly this (with ``dzero`` when trained) into the zeros, rounding once
        to the zeros' storage dtype.
        """
        n_groups = self.base.in_features // self.base.group_size
        delta = torch.zeros(self.base.out_features, n_groups, dtype=torch.float64, device=self.base.zero.device)
        bad = []
        if self.lora_A is not None:
            A = self.lora_A.detach().double()
            B = self.lora_B.detach().double()
            bad += [n for n, t in (("lora_A", A), ("lora_B", B)) if not bool(torch.isfinite(t).all())]
            delta += self.scaling * (B @ A) / self.base.group_size
        if self.dzero is not None:
            if not bool(torch.isfinite(self.dzero).all()):
                bad.append("dzero")
            delta += self.dzero.detach().double()
        if bad or not bool(torch.isfinite(delta).all()):
            raise ValueError(f"the adapter holds NaN or infinite values ({', '.join(bad) or 's * B @ A overflows'}); "
                             f"it cannot be merged or exported (a diverged training run?)")
        return delta

    @torch.no_grad()
    def scale_delta(self) -> Optional[torch.Tensor]:
        """``dscale`` (N, K/G) in float64, or None when scales are not trained; NaN/inf refused."""
        if self.dscale is None:
            return None
        if not bool(torch.isfinite(self.dscale).all()):
            raise ValueError("dscale holds NaN or infinite values; it cannot be merged or exported "
                             "(a diverged training run?)")
        return self.dscale.detach().double()

    @torch.no_grad()
    def merged_scale_zero(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The merged layer's scale and zero, each its float64 target rounded once to its storage dtype
        (SPEC: ``scale' = scale + dscale``, ``zero' = zero + dzero + s (B @ A) / G``), and the fraction
        of the trained change lost to that rounding, in weight space:
        ``||W'_stored - W'_target|| / ||W'_target - W||``."""
        base = self.base
        dz = self.zero_delta()
        ds = self.scale_delta()
        zero64 = base.zero.double() + dz
        zero_stored = round_to_storage(zero64, base.zero.dtype)
        if not bool(torch.isfinite(zero_stored).all()):
            raise ValueError(f"merge: a merged zero overflows {base.zero.dtype}; store zeros as float32 "
                             f"(zero_dtype=torch.float32)")
        if ds is None:
            scale_stored = base.scale.clone()
            ds_err = None
        else:
            scale64 = base.scale.double() + ds
            scale_stored = round_to_storage(scale64, base.scale.dtype)
            if not bool(torch.isfinite(scale_stored).all()):
                raise ValueError(f"merge: a merged scale overflows {base.scale.dtype}; store scales as float32")
            ds_err = scale_stored.double() - scale64
        dz_err = zero_stored.double() - zero64
        # Weight-space norms per group from the codes' sums: sum_k (a q_k + b)^2 = a^2 S2 + 2ab S1 + G b^2.
        G = base.group_size
        if ds is None:
            lost_sq, change_sq = G * dz_err.pow(2).sum(), G * dz.pow(2).sum()
        else:
            q = base.codes().double().unflatten(1, (-1, G))
            s1, s2 = q.sum(-1), q.pow(2).sum(-1)
            lost_sq = (ds_err.pow(2) * s2 + 2 * ds_err * dz_err * s1 + G * dz_err.pow(2)).sum()
            change_sq = (ds.pow(2) * s2 + 2 * ds * dz * s1 + G * dz.pow(2)).sum()
        lost = 0.0 if change_sq.item() <= 0.0 else math.sqrt(max(lost_sq.item(), 0.0) / change_sq.item())
        return scale_stored, zero_stored, lost

    @torch.no_grad()
    def merge(self) -> QuantLinear:
        """Fold what was trained into the stored scales and zeros (SPEC "Merge", "Trainable quantization
        parameters"): ``scale' = scale + dscale``, ``zero' = zero + dzero + s * (B @ A) / G``.

        Returns a new ``QuantLinear`` of the same bits whose codes are
        bit-identical to the base's (and its scales too, unless dscale was
        trained). The fraction of the trained change lost to storage rounding
        (weight space) is set as ``merge_lost_fraction`` on the result (and on
        this module) and warned about above 1%.
        """
        base = self.base
        scale_stored, zero_stored, lost = self.merged_scale_zero()
        merged = QuantLinear(base.in_features, base.out_features, base.bits, base.group_size, base.bias is not None,
                             base.scale.dtype, base.zero.dtype, base.layout, device="meta")
        merged.load_packed(base.packed.clone(), scale_stored, zero_stored,
                           base.bias.clone() if base.bias is not None else None, base.layout)
        merged.train(self.training)
        merged.merge_lost_fraction = lost
        self.merge_lost_fraction = lost
        if lost > MERGE_WARN_FRACTION:
            what = (f"zeros to {base.zero.dtype}" if self.dscale is None
                    else f"scales to {base.scale.dtype} and zeros to {base.zero.dtype}")
            warnings.warn(
                f"merge: {100 * lost:.2f}% of the trained change was lost rounding the {what}; store them as "
                f"float32 (zero_dtype=torch.float32{', scale_dtype=torch.float32' if self.dscale is not None else ''}) "
                f"to keep it",
                stacklevel=3,
            )
        return merged

    def _apply(self, fn, recurse=True):
        # The trainable master copies stay float32 (SPEC) through .half()/.to(dtype):
        # only the device move of `fn` is applied to them.
        originals = {n: p.data for n, p in self.trainable_parameters().items()}
        super()._apply(fn, recurse)
        for name, orig in originals.items():
            p = self._parameters[name]
            if p.dtype != orig.dtype:
                p.data = orig.to(device=p.device)
        return self

    def extra_repr(self) -> str:
        extra = "".join(f", {n}=True" for n, on in (("train_scale", self.train_scale),
                                                     ("train_zero", self.train_zero)) if on)
        return (f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, "
                f"use_rslora={self.use_rslora}{extra}")

"""Typed wrappers of the ``torch.ops.qalora`` ops, their fake kernels and autograd.

The schemas live in ``csrc/torch_bindings.cpp`` (``TORCH_LIBRARY(qalora, m)``); the CPU
kernels (and CUDA kernels where built) register there. This module adds what
torch needs from Python: fake (meta) kernels, so the ops trace under
``torch.compile`` and run on the meta device, and the autograd formula of
``qlinear`` (SPEC "Backward"). The wrappers check arguments and raise errors
that name the problem before anything reaches C++.
"""

from __future__ import annotations

import math

from typing import NamedTuple, Optional

import torch

from . import _C  # noqa: F401  (loads the op registrations)
from .format import LAYOUT_CANONICAL, check_bits, check_group_size, check_store_dtypes, packed_row_words

_ops = torch.ops.qalora

__all__ = [
    "PooledAdapter",
    "kernel_dtype",
    "packed_linear",
    "quantize_rtn",
    "pack",
    "unpack",
    "dequantize",
    "qlinear",
    "qlinear_int8",
    "qlinear_grad_input",
]


def _check_tensors(required: dict, optional: Optional[dict] = None) -> None:
    """Every required argument is a tensor, every optional one a tensor or None (TypeError naming it)."""
    for name, t in required.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    for name, t in (optional or {}).items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None; got {type(t).__name__}")


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")


def _check_scaling(scaling) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a number (the adapter's alpha / rank); got {type(scaling).__name__} "
                        f"{scaling!r}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite; got {scaling!r}")
    return float(scaling)


def _check_linear_args(x_name: str, x, packed, scale, zero, layout, scaling, **optional) -> float:
    _check_tensors({x_name: x, "packed": packed, "scale": scale, "zero": zero}, optional)
    _check_int("layout", layout)
    return _check_scaling(scaling)


def _check_devices(op: str, ref: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    if ref.device.type == "cuda" and not _C.WITH_CUDA:
        raise RuntimeError(
            f"{op}: the input is on {ref.device}, but this build of qalora_ext has no CUDA kernels "
            "(it was built without a CUDA toolkit or against a CPU-only torch); run on the CPU or rebuild "
            "with QALORA_CUDA=ON"
        )
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but the input is on {ref.device}; move them to one device")


# ---------------------------------------------------------------------------
# Typed wrappers
# ---------------------------------------------------------------------------


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype = torch.float16,
    zero_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest (min-max) quantization of ``weight`` (N, K), SPEC.

    Returns ``(packed, scale, zero)``: ``packed`` int32 (N, S) in layout 1,
    ``scale`` (N, K/G) in ``scale_dtype``, ``zero`` (N, K/G) in ``zero_dtype``.
    """
    _check_tensors({"weight": weight})
    check_bits(bits)
    check_group_size(group_size)
    check_store_dtypes(scale_dtype, zero_dtype)
    return _ops.quantize_rtn(weight, bits, group_size, scale_dtype, zero_dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (N, K) in [0, 2^bits) into layout 1 (int32 (N, S))."""
    _check_tensors({"codes": codes})
    check_bits(bits)
    return _ops.pack(codes, bits)


def unpack(packed: torch.Tensor, bits: int, in_features: int, layout: int = LAYOUT_CANONICAL) -> torch.Tensor:
    """Codes (N, in_features) uint8 of a packed tensor."""
    _check_tensors({"packed": packed})
    check_bits(bits)
    _check_int("in_features", in_features)
    _check_int("layout", layout)
    return _ops.unpack(packed, bits, in_features, layout)


def dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    layout: int = LAYOUT_CANONICAL,
) -> torch.Tensor:
    """The float32 weight ``W~ = scale * q + zero`` (N, K)."""
    _check_tensors({"packed": packed, "scale": scale, "zero": zero})
    _check_int("layout", layout)
    check_bits(bits)
    check_group_size(group_size)
    return _ops.dequantize(packed, scale, zero, bits, group_size, layout)


def qlinear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    lora_A: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    pool_mask: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    *,
    bits: int,
    group_size: int,
    layout: int = LAYOUT_CANONICAL,
) -> torch.Tensor:
    """``y = x W~^T + bias + scaling * ((pool_mask * pool(x)) A^T) B^T`` (SPEC).

    ``x`` (..., K); ``pool_mask`` (..., K/G) is the dropout mask on the pooled
    input (already including ``1/(1-p)``), or None. Differentiable in x,
    bias, lora_A and lora_B.
    """
    scaling = _check_linear_args("x", x, packed, scale, zero, layout, scaling, bias=bias, lora_A=lora_A,
                                 lora_B=lora_B, pool_mask=pool_mask)
    check_bits(bits)
    check_group_size(group_size)
    _check_devices("qlinear", x, packed=packed, scale=scale, zero=zero, bias=bias, lora_A=lora_A, lora_B=lora_B,
                   pool_mask=pool_mask)
    return _ops.qlinear(x, packed, scale, zero, bias, lora_A, lora_B, pool_mask, scaling, bits, group_size, layout)


def qlinear_int8(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    lora_A: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    pool_mask: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    *,
    bits: int,
    group_size: int,
    layout: int = LAYOUT_CANONICAL,
) -> torch.Tensor:
    """``qlinear`` with the activations quantized to int8 (opt-in, inference only).

    Below 64 rows of ``x`` each group of G inputs is quantized symmetrically
    (``dx = max|x_g| / 127``, codes rounded to nearest) and ``q . x_g`` is an
    exact integer sum, as llama.cpp does; the zeros' term, bias and adapter
    use the float input. The error against ``qlinear`` is at most
    ``sum_g |scale_g| * dx_g / 2 * sum_k q_k`` per output
    (``reference.qlinear_int8_error_bound``). At 64 rows and more the float
    path runs (the GEMM there is not limited by the activations' format).
    No gradient: use ``qlinear`` for training.
    """
    scaling = _check_linear_args("x", x, packed, scale, zero, layout, scaling, bias=bias, lora_A=lora_A,
                                 lora_B=lora_B, pool_mask=pool_mask)
    check_bits(bits)
    check_group_size(group_size)
    _check_devices("qlinear_int8", x, packed=packed, scale=scale, zero=zero, bias=bias, lora_A=lora_A,
                   lora_B=lora_B, pool_mask=pool_mask)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B)):
        raise RuntimeError("qlinear_int8 has no gradient (int8 activations are for inference); use qlinear to "
                           "train, or run under torch.no_grad() / torch.inference_mode()")
    return _ops.qlinear_int8(x, packed, scale, zero, bias, lora_A, lora_B, pool_mask, scaling, bits, group_size,
                             layout)


def qlinear_grad_input(
    grad_out: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    lora_A: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    pool_mask: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    *,
    bits: int,
    group_size: int,
    layout: int = LAYOUT_CANONICAL,
) -> torch.Tensor:
    """``grad_x = grad_out W~ + scaling/G * unpool(mask * ((grad_out B) A))`` (SPEC)."""
    scaling = _check_linear_args("grad_out", grad_out, packed, scale, zero, layout, scaling, lora_A=lora_A,
                                 lora_B=lora_B, pool_mask=pool_mask)
    check_bits(bits)
    check_group_size(group_size)
    _check_devices("qlinear_grad_input", grad_out, packed=packed, scale=scale, zero=zero, lora_A=lora_A,
                   lora_B=lora_B, pool_mask=pool_mask)
    return _ops.qlinear_grad_input(grad_out, packed, scale, zero, lora_A, lora_B, pool_mask, scaling, bits,
                                   group_size, layout)


# ---------------------------------------------------------------------------
# The packed layer's forward as modules call it: dtype policy, int8 choice
# ---------------------------------------------------------------------------


class PooledAdapter(NamedTuple):
    """A QA-LoRA adapter as the kernels take it: ``scaling * ((pool_mask * pool(x)) A^T) B^T`` (SPEC).

    ``lora_A`` (r, K/G) and ``lora_B`` (N, r) are float32; ``pool_mask``
    (..., K/G) is the dropout mask on the pooled input, already including
    ``1/(1-p)``, or None (no dropout, or evaluation).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    pool_mask: Optional[torch.Tensor] = None


# Activation dtypes the kernels take, per device type (SPEC "Storage dtypes").
_KERNEL_DTYPES = {"cpu": (torch.float32, torch.bfloat16)}
_GPU_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Device types torch's autocast knows; asking about any other raises.
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def kernel_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a packed layer's kernel runs ``x`` in (the one dtype policy).

    Under autocast, the autocast dtype; otherwise x's own dtype. A dtype the
    device's kernels do not take (float16 or float64 on CPU) runs as float32.
    Integer inputs are refused: a linear layer of integers would silently
    truncate (``F.linear`` refuses them too).
    """
    if not (x.is_floating_point()):
        raise TypeError(f"a packed linear layer takes a floating-point input; got x of dtype {x.dtype} "
                        f"(convert it first, e.g. x.float())")
    dtype = x.dtype
    device_type = x.device.type
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    if dtype not in _KERNEL_DTYPES.get(device_type, _GPU_KERNEL_DTYPES):
        dtype = torch.float32
    return dtype


def _wants_grad(x: torch.Tensor, adapter: Optional[PooledAdapter], *tensors: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return (x.requires_grad or any(t.requires_grad for t in tensors)
            or (adapter is not None and (adapter.lora_A.requires_grad or adapter.lora_B.requires_grad)))


def packed_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    adapter: Optional[PooledAdapter] = None,
    *,
    bits: int,
    group_size: int,
    layout: int = LAYOUT_CANONICAL,
    int8_activations: bool = False,
) -> torch.Tensor:
    """``y = x W~^T + bias (+ adapter)``, as ``QuantLinear.forward`` computes it.

    The policy lives here and nowhere else: x runs in :func:`kernel_dtype`;
    the output has x's dtype (under autocast, the autocast dtype: SPEC);
    ``scale`` and ``zero`` may be computed tensors that require grad (the
    stored ones plus trainable ``dscale``/``dzero``: SPEC "Trainable
    quantization parameters"), and then get their gradients;
    ``int8_activations`` takes :func:`qlinear_int8` only for CPU forward
    passes that need no gradient (it has none), else :func:`qlinear`. The
    layer validated bits, group size and shapes when it was built, and the
    kernels check every call, so nothing is re-checked here.
    """
    dtype = kernel_dtype(x)
    xk = x if x.dtype == dtype else x.to(dtype)
    op = _ops.qlinear
    if int8_activations and x.device.type == "cpu" and not _wants_grad(x, adapter, scale, zero):
        op = _ops.qlinear_int8
    if adapter is None:
        y = op(xk, packed, scale, zero, bias, None, None, None, 1.0, bits, group_size, layout)
    else:
        y = op(xk, packed, scale, zero, bias, adapter.lora_A, adapter.lora_B, adapter.pool_mask,
               float(adapter.scaling), bits, group_size, layout)
    if xk is not x and not (x.device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type)):
        y = y.to(x.dtype)
    return y


# ---------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only
# ---------------------------------------------------------------------------


# The fake kernels run the checks the C++ bindings run (csrc/checks.h), with
# the same exception types and messages, so an argument the real kernel refuses
# is refused on the meta device and under torch.compile too.

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _fail_value(ok, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _fail_type(ok, msg: str) -> None:
    if not ok:
        raise TypeError(msg)


def _fake_layout_bits(bits: int, layout: Optional[int] = None, group_size: Optional[int] = None) -> None:
    if layout is not None:
        _fail_value(layout == LAYOUT_CANONICAL,
                    f"packed layout id {layout} is not known to this build (known: 1 = canonical row bitstream v1)")
    _fail_value(2 <= bits <= 4, f"bits must be 2, 3 or 4; got {bits}")
    if group_size is not None:
        _fail_value(group_size in (32, 64, 128), f"group_size must be 32, 64 or 128; got {group_size}")


def _fake_packed(packed: torch.Tensor, bits: int, in_features: int) -> None:
    _fail_type(packed.dtype == torch.int32, f"packed must be int32; got {packed.dtype}")
    _fail_value(packed.dim() == 2, f"packed must be 2-D (out_features, words); got shape {tuple(packed.shape)}")
    want = packed_row_words(in_features, bits)
    _fail_value(packed.shape[1] == want, f"packed has {packed.shape[1]} words per row; in_features={in_features} "
                                         f"at bits={bits} needs {want} (layout 1)")


def _fake_quant_weight(packed, scale, zero, bits, group_size, layout) -> None:
    _fake_layout_bits(bits, layout, group_size)
    _fail_value(scale.dim() == 2, f"scale must be 2-D (out_features, groups); got shape {tuple(scale.shape)}")
    _fail_value(zero.shape == scale.shape, f"zero has shape {tuple(zero.shape)} but scale has "
                                           f"{tuple(scale.shape)}; both must be (out_features, in_features / group_size)")
    _fail_value(scale.shape[1] > 0, f"scale must have at least one group; got shape {tuple(scale.shape)}")
    for name, t in (("scale", scale), ("zero", zero)):
        _fail_type(t.dtype in _FLOATS, f"{name} must be float32, float16 or bfloat16; got {t.dtype}")
    _fake_packed(packed, bits, scale.shape[1] * group_size)
    _fail_value(packed.shape[0] == scale.shape[0], f"packed has {packed.shape[0]} rows but scale has "
                                                   f"{scale.shape[0]} (out_features must agree)")
    _fail_value(packed.device == scale.device == zero.device, f"packed, scale and zero must be on one device; "
                                                              f"got {packed.device}, {scale.device}, {zero.device}")


def _fake_activation(x, features: int, what: str) -> None:
    _fail_value(x.dim() >= 1 and x.shape[-1] == features,
                f"{what} must have last dimension {features}; got shape {tuple(x.shape)}")
    if x.device.type == "cpu":
        _fail_type(x.dtype in (torch.float32, torch.bfloat16),
                   f"{what} must be float32 or bfloat16 on CPU; got {x.dtype}")
    else:
        _fail_type(x.dtype in _FLOATS, f"{what} must be float16, bfloat16 or float32; got {x.dtype}")


def _fake_linear_checks(op, x, features, packed, scale, zero, lora_A, lora_B, pool_mask, bias, bits, group_size,
                        layout) -> None:
    _fake_quant_weight(packed, scale, zero, bits, group_size, layout)
    n, groups = packed.shape[0], scale.shape[1]
    _fake_activation(x, features, "x" if op != "qlinear_grad_input" else "grad_out")
    for t in (packed, scale, zero):
        _fail_value(t.device == x.device, f"{op}: all tensors must be on one device; the input is on {x.device} "
                                          f"but the weight is on {t.device}")
    _fail_value((lora_A is None) == (lora_B is None), "lora_A and lora_B must be given together")
    if lora_A is not None:
        _fail_value(lora_A.dim() == 2 and lora_A.shape[1] == groups and lora_A.shape[0] >= 1,
                    f"lora_A must be (rank, in_features / group_size) = (r, {groups}); got shape {tuple(lora_A.shape)}")
        _fail_value(lora_B.dim() == 2 and lora_B.shape[0] == n and lora_B.shape[1] == lora_A.shape[0],
                    f"lora_B must be (out_features, rank) = ({n}, {lora_A.shape[0]}); got shape {tuple(lora_B.shape)}")
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            _fail_type(t.is_floating_point(), f"{name} must be floating point; got {t.dtype}")
            _fail_value(t.device == x.device, f"lora_A/lora_B are on {t.device} but the input is on {x.device}")
    if bias is not None:
        _fail_value(bias.dim() == 1 and bias.shape[0] == n,
                    f"bias must be (out_features,) = ({n},); got shape {tuple(bias.shape)}")
        _fail_type(bias.is_floating_point(), f"bias must be floating point; got {bias.dtype}")
        _fail_value(bias.device == x.device, f"bias is on {bias.device} but the input is on {x.device}")
    if pool_mask is not None:
        _fail_value(lora_A is not None, "pool_mask is the adapter's dropout mask; it needs lora_A and lora_B")
        want = (*x.shape[:-1], groups)
        _fail_value(tuple(pool_mask.shape) == want, f"pool_mask must have shape {want} (the input's leading dims, "
                                                    f"then groups); got {tuple(pool_mask.shape)}")
        _fail_value(pool_mask.device == x.device,
                    f"pool_mask is on {pool_mask.device} but the input is on {x.device}")


@torch.library.register_fake("qalora::quantize_rtn")
def _quantize_rtn_fake(weight, bits, group_size, scale_dtype, zero_dtype):
    _fake_layout_bits(bits, group_size=group_size)
    _fail_value(weight.dim() == 2, f"weight must be 2-D (out_features, in_features); got shape {tuple(weight.shape)}")
    _fail_type(weight.is_floating_point(), f"weight must be a floating tensor; got {weight.dtype}")
    n, k = weight.shape
    _fail_value(k > 0 and k % group_size == 0,
                f"weight: in_features ({k}) must be a positive multiple of group_size ({group_size})")
    groups = k // group_size
    packed = weight.new_empty((n, packed_row_words(k, bits)), dtype=torch.int32)
    return packed, weight.new_empty((n, groups), dtype=scale_dtype), weight.new_empty((n, groups), dtype=zero_dtype)


@torch.library.register_fake("qalora::pack")
def _pack_fake(codes, bits):
    _fake_layout_bits(bits)
    _fail_value(codes.dim() == 2, f"codes must be 2-D (out_features, in_features); got shape {tuple(codes.shape)}")
    _fail_type(codes.dtype == torch.uint8, f"codes must be uint8; got {codes.dtype}")
    n, k = codes.shape
    _fail_value(k % 32 == 0, f"codes: in_features must be a multiple of 32; got {k}")
    return codes.new_empty((n, packed_row_words(k, bits)), dtype=torch.int32)


@torch.library.register_fake("qalora::unpack")
def _unpack_fake(packed, bits, in_features, layout):
    _fake_layout_bits(bits, layout)
    _fail_value(in_features > 0 and in_features % 32 == 0,
                f"in_features must be a positive multiple of 32; got {in_features}")
    _fake_packed(packed, bits, in_features)
    return packed.new_empty((packed.shape[0], in_features), dtype=torch.uint8)


@torch.library.register_fake("qalora::dequantize")
def _dequantize_fake(packed, scale, zero, bits, group_size, layout):
    _fake_quant_weight(packed, scale, zero, bits, group_size, layout)
    return packed.new_empty((packed.shape[0], scale.shape[1] * group_size), dtype=torch.float32)


@torch.library.register_fake("qalora::qlinear")
def _qlinear_fake(x, packed, scale, zero, bias, lora_A, lora_B, pool_mask, scaling, bits, group_size, layout):
    _fake_linear_checks("qlinear", x, scale.shape[1] * group_size if scale.dim() == 2 else -1, packed, scale, zero,
                        lora_A, lora_B, pool_mask, bias, bits, group_size, layout)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.register_fake("qalora::qlinear_int8")
def _qlinear_int8_fake(x, packed, scale, zero, bias, lora_A, lora_B, pool_mask, scaling, bits, group_size, layout):
    _fake_linear_checks("qlinear_int8", x, scale.shape[1] * group_size if scale.dim() == 2 else -1, packed, scale,
                        zero, lora_A, lora_B, pool_mask, bias, bits, group_size, layout)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.register_fake("qalora::qlinear_grad_input")
def _qlinear_grad_input_fake(grad_out, packed, scale, zero, lora_A, lora_B, pool_mask, scaling, bits, group_size,
                             layout):
    _fake_linear_checks("qlinear_grad_input", grad_out, packed.shape[0] if packed.dim() == 2 else -1, packed, scale,
                        zero, lora_A, lora_B, pool_mask, None, bits, group_size, layout)
    return grad_out.new_empty((*grad_out.shape[:-1], scale.shape[1] * group_size))


# ---------------------------------------------------------------------------
# Autograd of qlinear (SPEC "Backward")
# ---------------------------------------------------------------------------


def _qlinear_setup_context(ctx, inputs, output):
    x, packed, scale, zero, bias, lora_A, lora_B, pool_mask, scaling, bits, group_size, layout = inputs
    if packed.requires_grad:
        raise ValueError("qlinear: packed requires grad, but the codes are frozen (integers get no gradient); "
                         "leave packed.requires_grad False")
    for name, t in (("scale", scale), ("zero", zero)):
        if t.requires_grad and t.is_leaf:
            # The stored scales and zeros are frozen buffers (SPEC). What trains is a
            # separate float32 shift added to them (a non-leaf tensor reaches here).
            raise ValueError(f"qlinear: {name} requires grad, but the stored {name}s are frozen buffers; to train "
                             f"them, add a float32 parameter d{name} and pass {name} + d{name} (QALoRALinear's "
                             f"train_{name}=True does this), or train the adapter (lora_A, lora_B) alone")
    ctx.meta = (scaling, bits, group_size, layout)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.x_shape = x.shape
    ctx.x_dtype = x.dtype
    need_adapter_grads = lora_A is not None and (ctx.needs_input_grad[5] or ctx.needs_input_grad[6])
    # Only the pooled input (K/G of x's size) is kept for the adapter grads.
    pooled = None
    if need_adapter_grads:
        # Accumulated in float32 without a float32 copy of a 16-bit x.
        pooled = x.detach().unflatten(-1, (scale.shape[1], group_size)).mean(-1, dtype=torch.float32)
        if pool_mask is not None:
            pooled = pooled * pool_mask
    # The quantization parameters' gradients (SPEC "Trainable quantization
    # parameters") need x itself, un-dropped: grad scale = sum_{k in g} q (gy^T x),
    # grad zero = gy^T xsum.
    x_saved = x.detach() if (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]) else None
    ctx.save_for_backward(packed, scale, zero, lora_A, lora_B, pool_mask, pooled, x_saved)


def _detach(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach()


def _qlinear_backward(ctx, grad_out):
    if torch.is_grad_enabled():
        # The engine enables grad mode in backward only for create_graph=True:
        # a second derivative, which this formula does not provide (it would be zero, silently).
        raise RuntimeError("qlinear has no second derivative: backward(create_graph=True) / double backward "
                           "through a packed layer is not supported")
    packed, scale, zero, lora_A, lora_B, pool_mask, pooled, x_saved = ctx.saved_tensors
    scaling, bits, group_size, layout = ctx.meta
    grad_x = grad_bias = grad_A = grad_B = grad_scale = grad_zero = None
    if ctx.needs_input_grad[0]:
        # First-order only: the adapter enters grad_x as a constant.
        grad_x = _ops.qlinear_grad_input(grad_out, packed, _detach(scale), _detach(zero), _detach(lora_A),
                                         _detach(lora_B), pool_mask, scaling, bits, group_size, layout).to(ctx.x_dtype)
    gy = grad_out.reshape(math.prod(grad_out.shape[:-1]), grad_out.shape[-1]).float()  # N may be 0
    if x_saved is not None:
        grad_scale, grad_zero = _quant_param_grads(gy, x_saved, packed, scale, zero, bits, group_size, layout,
                                                   ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = gy.sum(0).to(ctx.bias_dtype)
    if pooled is not None:
        p = pooled.reshape(-1, pooled.shape[-1])
        gyB = gy @ lora_B.float()  # (M, r)
        if ctx.needs_input_grad[5]:
            grad_A = (gyB.t() @ p).mul_(scaling).to(lora_A.dtype)
        if ctx.needs_input_grad[6]:
            u = p @ lora_A.float().t()  # (M, r)
            grad_B = (gy.t() @ u).mul_(scaling).to(lora_B.dtype)  # s on the (N, r) result, not on gy
    return grad_x, None, grad_scale, grad_zero, grad_bias, grad_A, grad_B, None, None, None, None, None


def _quant_param_grads(gy, x, packed, scale, zero, bits, group_size, layout, want_scale, want_zero):
    """SPEC "Trainable quantization parameters", float32 accumulation:

    ``grad scale[n, g] = sum_{k in g} q[n, k] (gy^T x)[n, k]`` (one GEMM as large
    as the forward's, M x N x K, then a product with the codes and a sum per
    group) and ``grad zero = gy^T xsum`` (M x N x K/G).
    """
    x2 = x.reshape(-1, x.shape[-1]).float()
    n_groups = scale.shape[1]
    grad_scale = grad_zero = None
    if want_scale:
        gx = gy.t() @ x2  # (N, K): the extra GEMM
        codes = _ops.unpack(packed, bits, x2.shape[1], layout)
        gx.mul_(codes)
        grad_scale = gx.unflatten(1, (n_groups, group_size)).sum(-1).to(scale.dtype)
    if want_zero:
        xsum = x2.unflatten(1, (n_groups, group_size)).sum(-1)  # (M, L), un-dropped x
        grad_zero = (gy.t() @ xsum).to(zero.dtype)
    return grad_scale, grad_zero


torch.library.register_autograd("qalora::qlinear", _qlinear_backward, setup_context=_qlinear_setup_context)

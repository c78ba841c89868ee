"""Pure-PyTorch reference of every op: the tests' oracle.

Written for clarity, not speed, straight from ``shared/SPEC.md``. The math
of the linear layer, its gradients and the merge is done in float64 on the
dequantized weight; RTN quantization follows SPEC's float32 recipe exactly
(it is defined in float32). Nothing here calls the compiled extension.
"""

from __future__ import annotations

from typing import Optional

import torch

from .format import packed_row_words

# ---------------------------------------------------------------------------
# Format: RTN, pack, unpack, dequantize
# ---------------------------------------------------------------------------


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype = torch.float16,
    zero_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC's RTN: returns ``(codes uint8 (N, K), scale (N, L), zero (N, L))``."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    qmax = 2**bits - 1
    lo = w.amin(-1)
    hi = w.amax(-1)
    scale = ((hi - lo) / qmax).to(scale_dtype)
    zero = lo.to(zero_dtype)
    s = scale.float().unsqueeze(-1)
    z = zero.float().unsqueeze(-1)
    q = torch.round((w - z) / s).clamp(0, qmax)  # torch.round: half to even
    q = torch.where(s == 0, torch.zeros_like(q), q)
    return q.reshape(n, k).to(torch.uint8), scale, zero


def _chunk_bit_positions(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(32, dtype=torch.int64) * bits
    return pos // 32, pos % 32  # word within the chunk, shift within the word


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Layout 1 packing (see qalora_ext.format): uint8 (N, K) -> int32 (N, S)."""
    n, k = codes.shape
    chunks = k // 32
    c = codes.to(torch.int64).reshape(n, chunks, 32)
    word, shift = _chunk_bit_positions(bits)
    words = torch.zeros(n, chunks, bits + 1, dtype=torch.int64)  # one spare word for straddles
    low = (c << shift) & 0xFFFFFFFF
    high = c >> (32 - shift)  # the part past the word's top (0 unless straddling)
    words.scatter_add_(2, word.expand(n, chunks, 32), low)
    words.scatter_add_(2, (word + 1).expand(n, chunks, 32), torch.where(shift + bits > 32, high, 0))
    flat = words[..., :bits].reshape(n, chunks * bits)
    out = torch.zeros(n, packed_row_words(k, bits), dtype=torch.int64)
    out[:, : chunks * bits] = flat
    out = torch.where(out >= 2**31, out - 2**32, out)  # uint32 bit pattern in int32
    return out.to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Layout 1 unpacking: int32 (N, S) -> uint8 codes (N, K)."""
    n = packed.shape[0]
    chunks = in_features // 32
    w = packed[:, : chunks * bits].to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w.reshape(n, chunks, bits), torch.zeros(n, chunks, 1, dtype=torch.int64)], dim=2)
    word, shift = _chunk_bit_positions(bits)
    lo = torch.gather(w, 2, word.expand(n, chunks, 32)) >> shift
    hi = torch.gather(w, 2, (word + 1).expand(n, chunks, 32)) << (32 - shift)
    v = (lo | torch.where(shift + bits > 32, hi, 0)) & (2**bits - 1)
    return v.reshape(n, in_features).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``W~[n, k] = scale[n, k // G] * q[n, k] + zero[n, k // G]`` in float64."""
    s = scale.double().repeat_interleave(group_size, dim=1)
    z = zero.double().repeat_interleave(group_size, dim=1)
    return s * codes.double() + z


# ---------------------------------------------------------------------------
# The QA-LoRA linear layer, float64
# ---------------------------------------------------------------------------


def pool(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean of each contiguous group of G input channels: (..., K) -> (..., K/G)."""
    return x.double().unflatten(-1, (x.shape[-1] // group_size, group_size)).mean(-1)


def unpool(v: torch.Tensor, group_size: int) -> torch.Tensor:
    """Repeat each group's value over its G channels: (..., L) -> (..., L*G)."""
    return v.repeat_interleave(group_size, dim=-1)


def qlinear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    lora_A: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    pool_mask: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    group_size: int = 32,
) -> torch.Tensor:
    """``y = x W~^T + bias + s * ((m * pool(x)) A^T) B^T`` in float64.

    ``weight`` is the dequantized (N, K) weight. Differentiable (float64
    autograd gives the reference gradients).
    """
    xd = x.double()
    y = xd @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    if lora_A is not None:
        p = pool(xd, group_size)
        if pool_mask is not None:
            p = p * pool_mask.double()
        y = y + scaling * (p @ lora_A.double().t()) @ lora_B.double().t()
    return y


def qlinear_int8_error_bound(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                             group_size: int) -> torch.Tensor:
    """Largest |qlinear_int8 - qlinear| the int8 activations can cause, (..., N), float64.

    Each input is rounded to the nearest multiple of ``dx_g = max|x_g| / 127``,
    so it moves by at most ``dx_g / 2``; the product with the weight's
    ``scale * q`` part (the zeros' term uses the float input) moves by at most
    ``sum_g |scale_g| * dx_g / 2 * sum_{k in g} q_k``.
    """
    xd = x.double()
    groups = xd.unflatten(-1, (xd.shape[-1] // group_size, group_size))
    half_step = groups.abs().amax(-1) / 127.0 / 2.0  # (..., L)
    code_sums = codes.double().unflatten(-1, (codes.shape[-1] // group_size, group_size)).sum(-1)  # (N, L)
    return half_step @ (scale.double().abs() * code_sums).t()


def qlinear_grad_input(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    lora_A: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    pool_mask: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    group_size: int = 32,
) -> torch.Tensor:
    """SPEC: ``grad_x = gy W~ + s * unpool(m * ((gy B) A)) / G`` in float64."""
    gy = grad_out.double()
    gx = gy @ weight.double()
    if lora_A is not None:
        v = (gy @ lora_B.double()) @ lora_A.double()
        if pool_mask is not None:
            v = v * pool_mask.double()
        gx = gx + scaling * unpool(v, group_size) / group_size
    return gx


def adapter_grads(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    pool_mask: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    group_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC: ``grad_A = s (gy B)^T p'``, ``grad_B = s gy^T u`` (summed over leading dims), float64."""
    p = pool(x, group_size)
    if pool_mask is not None:
        p = p * pool_mask.double()
    p = p.reshape(-1, p.shape[-1])
    gy = grad_out.double().reshape(-1, grad_out.shape[-1])
    u = p @ lora_A.double().t()
    grad_A = scaling * (gy @ lora_B.double()).t() @ p
    grad_B = scaling * gy.t() @ u
    return grad_A, grad_B


# ---------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------


def merged_zero(zero: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                group_size: int) -> torch.Tensor:
    """SPEC: ``zero' = zero + s * (B @ A) / G``, in float64 (before storage rounding)."""
    return zero.double() + scaling * (lora_B.double() @ lora_A.double()) / group_size


def lost_fraction(zero: torch.Tensor, zero_merged_stored: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                  scaling: float, group_size: int) -> float:
    """SPEC: ``||zero'_stored - zero - delta|| / ||delta||`` in float64."""
    delta = scaling * (lora_B.double() @ lora_A.double()) / group_size
    denom = delta.norm().item()
    if denom == 0.0:
        return 0.0
    return ((zero_merged_stored.double() - zero.double() - delta).norm() / denom).item()


# ---------------------------------------------------------------------------
# Trainable quantization parameters (SPEC: dscale, dzero)
# ---------------------------------------------------------------------------


def quant_param_grads(x: torch.Tensor, grad_out: torch.Tensor, codes: torch.Tensor,
                      group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC: ``grad dscale[n, g] = sum_{k in g} q[n, k] (gy^T x)[n, k]``, ``grad dzero = gy^T xsum``, float64.

    Summed over all leading dims; ``x`` is the un-dropped input.
    """
    xd = x.double().reshape(-1, x.shape[-1])
    gy = grad_out.double().reshape(-1, grad_out.shape[-1])
    groups = xd.shape[1] // group_size
    grad_dscale = ((gy.t() @ xd) * codes.double()).unflatten(1, (groups, group_size)).sum(-1)
    xsum = xd.unflatten(1, (groups, group_size)).sum(-1)
    grad_dzero = gy.t() @ xsum
    return grad_dscale, grad_dzero


def merged_scale_zero(scale: torch.Tensor, zero: torch.Tensor, dscale: Optional[torch.Tensor] = None,
                      dzero: Optional[torch.Tensor] = None, lora_A: Optional[torch.Tensor] = None,
                      lora_B: Optional[torch.Tensor] = None, scaling: float = 1.0,
                      group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC: ``scale' = scale + dscale``, ``zero' = zero + dzero + s (B @ A) / G``, in float64 (before rounding)."""
    s = scale.double() + (dscale.double() if dscale is not None else 0.0)
    z = zero.double() + (dzero.double() if dzero is not None else 0.0)
    if lora_A is not None:
        z = z + scaling * (lora_B.double() @ lora_A.double()) / group_size
    return s, z


def weight_lost_fraction(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scale_target: torch.Tensor,
                         zero_target: torch.Tensor, scale_stored: torch.Tensor, zero_stored: torch.Tensor,
                         group_size: int) -> float:
    """SPEC: ``||W'_stored - W'_target|| / ||W'_target - W||`` on the dequantized (N, K) weights, float64."""
    w = dequantize(codes, scale, zero, group_size)
    target = dequantize(codes, scale_target, zero_target, group_size)
    stored = dequantize(codes, scale_stored, zero_stored, group_size)
    denom = (target - w).norm().item()
    return 0.0 if denom == 0.0 else ((stored - target).norm() / denom).item()

"""The packed format: constants, argument checks and size arithmetic.

Layout 1 ("canonical row bitstream", the one layout on disk) is documented
with worked examples next to the code that packs it, in
``csrc/include/qalora/format.h``; in short:

* the packed weight is int32 of shape (N, S), one row per output channel;
* every 32 consecutive codes of a row form a little-endian bitstream of
  32*b bits held in b words (code i at bits [b*i, b*i+b)); for b = 3, codes
  10 and 21 straddle words;
* S = K*b/32 rounded up to a multiple of 4 words (16-byte aligned rows,
  padding zero), so a GPU reads codes with 128-bit loads.

Example (b = 4): codes 1, 2, ..., 8 of a row pack into the word 0x87654321.
Example (b = 3, K = 576): 18 chunks * 3 = 54 code words, S = 56.

Scales and zeros are (N, K/G) float tensors; ``W~ = scale * q + zero``.
"""

from __future__ import annotations

LAYOUT_CANONICAL = 1
"""Layout id of the canonical on-disk layout (see module docstring)."""

KNOWN_LAYOUTS = {LAYOUT_CANONICAL: "row-bitstream-v1"}
SUPPORTED_BITS = (2, 3, 4)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
FORMAT_VERSION = 2
"""Newest version of the checkpoint format :mod:`qalora_ext.checkpoint` reads and writes.

1: codes, scales, zeros, adapters (``lora_A``, ``lora_B``).
2: adds trainable quantization parameters (``dscale``, ``dzero``, recorded as
   ``train_scale`` / ``train_zero`` in each adapter entry) and ``rank`` 0 (no
   ``lora_A`` / ``lora_B``). A checkpoint is written with the lowest version
   that holds what it contains (:data:`FORMAT_VERSION_TRAINABLE_QUANT` only
   when it has any of them), so readers of version 1 still read everything
   else and refuse these by version, naming it, instead of misreading them.
"""

FORMAT_VERSION_TRAINABLE_QUANT = 2
"""The format version a checkpoint with ``dscale`` / ``dzero`` or a rank-0 adapter is written with."""


def check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be 2, 3 or 4; got {bits!r}")


def check_group_size(group_size) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be 32, 64 or 128; got {group_size!r}")


def check_store_dtypes(scale_dtype, zero_dtype, names=("scale_dtype", "zero_dtype")) -> None:
    """Scales and zeros are stored as float16, bfloat16 or float32 (SPEC "Storage dtypes")."""
    import torch

    allowed = (torch.float16, torch.bfloat16, torch.float32)
    for name, dt in zip(names, (scale_dtype, zero_dtype)):
        if dt not in allowed:
            raise TypeError(f"{name} must be torch.float16, torch.bfloat16 or torch.float32; got {dt}")


def check_layout(layout) -> None:
    if isinstance(layout, bool) or not isinstance(layout, int) or layout not in KNOWN_LAYOUTS:
        raise ValueError(f"packed layout id {layout!r} is not known (known: {KNOWN_LAYOUTS})")


def check_in_features(in_features: int, group_size: int, what: str = "layer") -> None:
    if in_features <= 0 or in_features % group_size:
        raise ValueError(
            f"{what}: in_features ({in_features}) must be a positive multiple of group_size ({group_size}); "
            f"choose a group size that divides it or leave this layer unquantized"
        )


def packed_row_words(in_features: int, bits: int) -> int:
    """Words per packed row (layout 1): K*b/32 rounded up to a multiple of 4."""
    code_words = in_features // 32 * bits
    return (code_words + 3) // 4 * 4


def round_to_storage(x, dtype):
    """Round a float64 tensor to ``dtype`` with one correct round-to-nearest-even.

    ``Tensor.to(float16/bfloat16)`` from float64 goes through float32 and so
    rounds twice, which lands on the wrong neighbour (an error just above half
    an ulp) for about 1 value in 10^4. SPEC asks merged zeros to be within half
    an ulp of the float64 value, so 16-bit targets pick the nearest of the
    candidate and its two neighbours in float64 here.
    """
    import torch

    if dtype in (torch.float32, torch.float64):
        return x.to(dtype)  # float64 -> float32 is a single rounding
    c = x.to(dtype)
    cands = torch.stack([torch.nextafter(c, torch.full_like(c, -float("inf"))), c,
                         torch.nextafter(c, torch.full_like(c, float("inf")))])
    dist = (cands.double() - x.double()).abs()
    best = dist.min(0, keepdim=True).values
    # Among the nearest (a tie), prefer the even significand, as IEEE does.
    odd = (cands.view(torch.int16) & 1).bool()
    score = torch.where(dist == best, odd.to(torch.int8), torch.full_like(odd, 2, dtype=torch.int8))
    idx = score.argmin(0, keepdim=True)
    return torch.gather(cands, 0, idx).squeeze(0)

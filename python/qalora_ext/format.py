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
FORMAT_VERSION = 1
"""Version of the checkpoint format written by :mod:`qalora_ext.checkpoint`."""


def check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be 2, 3 or 4; got {bits!r}")


def check_group_size(group_size) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be 32, 64 or 128; got {group_size!r}")


def check_layout(layout) -> None:
    if layout not in KNOWN_LAYOUTS:
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


def packed_bytes(out_features: int, in_features: int, bits: int) -> int:
    return out_features * packed_row_words(in_features, bits) * 4

"""The packed format: RTN quantization, pack/unpack, dequantize, layout 1, errors."""

from __future__ import annotations

import pytest
import torch

from qalora_ext import ops, reference
from qalora_ext.format import packed_row_words

from conftest import random_weight

BITS = (2, 3, 4)
GROUPS = (32, 64, 128)
STORE = (torch.float16, torch.bfloat16, torch.float32)


def _k_for(group_size: int) -> int:
    return 576 if 576 % group_size == 0 else 640  # 576 = SmolLM2 hidden size; 640 = 5 * 128


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("scale_dtype", STORE)
@pytest.mark.parametrize("zero_dtype", (torch.float32, torch.float16))
def test_rtn_matches_spec(bits, group_size, scale_dtype, zero_dtype):
    n, k = 37, _k_for(group_size)
    w = random_weight(n, k)
    packed, scale, zero = ops.quantize_rtn(w, bits, group_size, scale_dtype, zero_dtype)
    codes = ops.unpack(packed, bits, k)
    ref_codes, ref_scale, ref_zero = reference.quantize_rtn(w, bits, group_size, scale_dtype, zero_dtype)
    assert scale.dtype == scale_dtype and zero.dtype == zero_dtype
    assert torch.equal(scale, ref_scale)
    assert torch.equal(zero, ref_zero)
    # Codes: equal, except +-1 at exact ties of the rounding (SPEC).
    s = scale.float().repeat_interleave(group_size, 1)
    z = zero.float().repeat_interleave(group_size, 1)
    t = (w - z) / s
    tie = (t - t.floor()) == 0.5
    diff = (codes.int() - ref_codes.int()).abs()
    assert int(diff[~tie].max()) == 0
    assert int(diff.max()) <= 1
    # Weights: |W~ - w| <= scale/2 plus the rounding of the stored zero.
    deq = reference.dequantize(codes, scale, zero, group_size)
    zero_err = (zero.double() - w.double().unflatten(1, (-1, group_size)).amin(-1)).abs()
    bound = s.double() / 2 + zero_err.repeat_interleave(group_size, 1) + 1e-6 * w.abs().max().item()
    assert bool(((deq - w.double()).abs() <= bound).all())
    assert int(codes.max()) <= 2**bits - 1


def test_rtn_constant_group_gives_zero_codes():
    w = random_weight(4, 64)
    w[1, :32] = 0.37  # one constant group
    packed, scale, zero = ops.quantize_rtn(w, 3, 32)
    codes = ops.unpack(packed, 3, 64)
    assert scale[1, 0].item() == 0.0
    assert zero[1, 0].item() == pytest.approx(0.37)
    assert int(codes[1, :32].abs().sum()) == 0
    assert torch.equal(ops.dequantize(packed, scale, zero, 3, 32)[1, :32], torch.full((32,), zero[1, 0].item()))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", (32, 96, 576, 1536))
def test_pack_unpack_identity_all_codes(bits, k):
    n = 23
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    codes[0] = 0
    codes[1] = 2**bits - 1
    codes[2, ::2] = 2**bits - 1  # alternate extremes: catches bleeding between fields
    packed = ops.pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (n, packed_row_words(k, bits))
    assert torch.equal(ops.unpack(packed, bits, k), codes)
    # The C++ packer and the reference agree bit for bit, both ways.
    assert torch.equal(reference.pack(codes, bits), packed)
    assert torch.equal(reference.unpack(packed, bits, k), codes)
    # Padding words (16-byte row alignment) are zero.
    used = k // 32 * bits
    assert int(packed[:, used:].abs().sum()) == 0


def test_layout_worked_examples():
    # b = 4: codes 1..8 -> 0x87654321 (format.h).
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, :8] = torch.arange(1, 9, dtype=torch.uint8)
    word = ops.pack(codes, 4)[0, 0].item() & 0xFFFFFFFF
    assert word == 0x87654321
    # b = 3: code 10 straddles words 0 and 1 (bits 30..32).
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 7
    p = ops.pack(codes, 3)[0].long() & 0xFFFFFFFF
    assert p[0].item() == 0b11 << 30 and p[1].item() == 1 and p[2].item() == 0
    # b = 3 uses 3 bits per weight: 4096 codes -> 384 words, no padding to 4 bits.
    assert packed_row_words(4096, 3) == 384 and packed_row_words(4096, 4) == 512 and packed_row_words(4096, 2) == 256
    # Rows are 16-byte aligned: K = 576 at b = 3 is 54 code words, stride 56.
    assert packed_row_words(576, 3) == 56


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("scale_dtype", STORE)
def test_dequantize_matches_reference(bits, group_size, scale_dtype):
    k = _k_for(group_size)
    w = random_weight(19, k)
    packed, scale, zero = ops.quantize_rtn(w, bits, group_size, scale_dtype)
    out = ops.dequantize(packed, scale, zero, bits, group_size)
    ref = reference.dequantize(reference.unpack(packed, bits, k), scale, zero, group_size)
    assert out.dtype == torch.float32 and out.shape == (19, k)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-7)


# ---- bad input -------------------------------------------------------------


@pytest.mark.parametrize("bits", (0, 1, 5, 8, 3.0, True))
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        ops.quantize_rtn(random_weight(4, 64), bits, 32)
    if int(bits) not in (2, 3, 4):  # the raw op checks too
        with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
            torch.ops.qalora.quantize_rtn(random_weight(4, 64), int(bits), 32, torch.float16, torch.float32)


@pytest.mark.parametrize("group_size", (0, 16, 48, 256))
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):
        ops.quantize_rtn(random_weight(4, 256), 4, group_size)


def test_k_not_divisible_by_group():
    with pytest.raises(ValueError, match=r"in_features \(576\).*group_size \(128\)"):
        ops.quantize_rtn(random_weight(4, 576), 4, 128)


@pytest.mark.parametrize("bad", (float("nan"), float("inf"), float("-inf")))
def test_non_finite_weights_rejected(bad):
    w = random_weight(4, 64)
    w[2, 17] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.quantize_rtn(w, 4, 32)


def test_scale_overflow_in_float16_is_an_error():
    w = random_weight(2, 32)
    w[0, 0], w[0, 1] = -6e5, 6e5
    with pytest.raises(ValueError, match="overflows"):
        ops.quantize_rtn(w, 2, 32, torch.float16)
    ops.quantize_rtn(w, 2, 32, torch.float32)  # float32 scales hold it


def test_zero_overflow_in_float16_is_an_error():
    w = random_weight(2, 32)
    w[1, 3] = -1e6
    with pytest.raises(ValueError, match="zero .* overflows"):
        ops.quantize_rtn(w, 4, 32, torch.float32, torch.float16)


def test_weight_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="2-D"):
        ops.quantize_rtn(torch.randn(64), 4, 32)
    with pytest.raises(TypeError, match="floating"):
        ops.quantize_rtn(torch.randint(0, 5, (4, 64)), 4, 32)
    with pytest.raises(TypeError, match="scale_dtype"):
        ops.quantize_rtn(random_weight(4, 64), 4, 32, torch.float64)


def test_pack_rejects_out_of_range_codes_and_bad_shapes():
    codes = torch.randint(0, 4, (3, 64), dtype=torch.uint8)
    codes[1, 5] = 4
    with pytest.raises(ValueError, match=r"codes must be in \[0, 3\]"):
        ops.pack(codes, 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.pack(torch.zeros(3, 40, dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="uint8"):
        ops.pack(torch.zeros(3, 64, dtype=torch.int32), 2)


def test_unknown_layout_and_wrong_packed_shape_rejected():
    w = random_weight(8, 64)
    packed, scale, zero = ops.quantize_rtn(w, 4, 32)
    with pytest.raises(ValueError, match="layout id 7"):
        ops.dequantize(packed, scale, zero, 4, 32, layout=7)
    with pytest.raises(ValueError, match="layout id 2"):
        ops.unpack(packed, 4, 64, layout=2)
    with pytest.raises(ValueError, match="words per row"):
        ops.dequantize(packed[:, :4], scale, zero, 4, 32)
    with pytest.raises(ValueError, match="words per row"):
        p4, s4, z4 = ops.quantize_rtn(random_weight(8, 128), 4, 32)
        ops.dequantize(p4, s4, z4, 3, 32)  # a 4-bit tensor read as 3-bit
    with pytest.raises(ValueError, match="zero has shape"):
        ops.dequantize(packed, scale, zero[:, :1], 4, 32)
    with pytest.raises(TypeError, match="packed must be int32"):
        ops.dequantize(packed.long(), scale, zero, 4, 32)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_round_to_storage_is_a_single_correct_rounding(dtype):
    from qalora_ext.format import round_to_storage

    x = torch.randn(200_000, dtype=torch.float64) * 0.05
    r = round_to_storage(x, dtype)
    assert r.dtype == dtype
    up = torch.nextafter(r, torch.full_like(r, float("inf"))).double()
    down = torch.nextafter(r, torch.full_like(r, -float("inf"))).double()
    err = (r.double() - x).abs()
    # r is at least as near as either neighbour: within half an ulp.
    assert bool((err <= (up - x).abs()).all()) and bool((err <= (down - x).abs()).all())

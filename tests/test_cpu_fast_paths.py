"""The decode-sized CPU kernels (M <= GEMV_MAX_M: hand-written AVX-512 where the
CPU has VBMI + VNNI, hand-written AVX2 otherwise) and the opt-in int8-activation
op, against the float64
reference: every bits x group size, row counts on both sides of each dispatch
boundary, in_features that leave a partial last span, every scale/zero dtype."""

from __future__ import annotations

import pytest
import torch

import qalora_ext
from qalora_ext import _C, ops, reference
from qalora_ext.model import set_int8_activations
from qalora_ext.nn import QALoRALinear, QuantLinear

from conftest import quantized, rel_err

BITS = (2, 3, 4)
GROUPS = (32, 64, 128)
GEMV = _C.GEMV_MAX_M  # rows served by the decode kernels
T = _C.SMALL_M_THRESHOLD  # from here on: dequantize + GEMM (int8 op included)
# Around each boundary: decode kernels | packed small-M kernel | GEMM.
ROWS = (1, 2, 3, GEMV, GEMV + 1, T - 1, T)
FAST_ISAS = [i for i in ("avx512vnni", "avx2", "scalar") if i in _C.compiled_cpu_isas().split(",")]


def _k_for(group_size):
    # 1312 = 41 x 32 and 640 = 5 x 128: neither is a whole number of the
    # kernels' spans (128, 256 or 512 codes), so the masked tail runs.
    return 1312 if group_size == 32 else 640


@pytest.fixture(params=FAST_ISAS)
def isa(request):
    try:
        _C.set_cpu_isa(request.param)
    except ValueError:
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    yield request.param
    _C.set_cpu_isa("auto")


def _layer(bits, group_size, n=72, store=(torch.float16, torch.float32)):
    k = _k_for(group_size)
    packed, scale, zero, W = quantized(n, k, bits, group_size, *store)
    A, B = torch.randn(8, k // group_size) * 0.3, torch.randn(n, 8) * 0.3
    return packed, scale, zero, W, A, B, torch.randn(n)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("m", ROWS)
def test_forward_at_every_dispatch_boundary(isa, bits, group_size, m):
    packed, scale, zero, W, A, B, bias = _layer(bits, group_size)
    x = torch.randn(m, W.shape[1])
    y = ops.qlinear(x, packed, scale, zero, bias, A, B, None, 1.5, bits=bits, group_size=group_size)
    assert rel_err(y, reference.qlinear(x, W, bias, A, B, None, 1.5, group_size)) <= 1e-5


@pytest.mark.parametrize("store", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                   (torch.float32, torch.float16)])
@pytest.mark.parametrize("bits", BITS)
def test_decode_kernels_read_every_storage_dtype(isa, bits, store):
    packed, scale, zero, W, A, B, bias = _layer(bits, 64, n=40, store=store)
    for m in range(1, GEMV + 1):
        x = torch.randn(m, W.shape[1])
        y = ops.qlinear(x, packed, scale, zero, bits=bits, group_size=64)
        assert rel_err(y, reference.qlinear(x, W, group_size=64)) <= 1e-5


def test_decode_kernel_takes_strided_input_and_many_rows():
    # A non-contiguous x (a column slice) and more rows than one thread's share.
    packed, scale, zero, W = quantized(1000, 512, 4, 32)
    x = torch.randn(2, 1024)[:, ::2]
    y = ops.qlinear(x, packed, scale, zero, bits=4, group_size=32)
    assert rel_err(y, reference.qlinear(x, W)) <= 1e-5


# ---- int8 activations --------------------------------------------------------


def _int8_tolerance(x, packed, scale, bits, group_size, ref):
    codes = reference.unpack(packed, bits, x.shape[-1])
    bound = reference.qlinear_int8_error_bound(x, codes, scale, group_size)
    # float32 rounding of the rest of the computation, on top of the bound
    return bound + 1e-5 * ref.abs().max()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("m", ROWS)
def test_int8_activations_stay_within_their_stated_bound(isa, bits, group_size, m):
    packed, scale, zero, W, A, B, bias = _layer(bits, group_size)
    x = torch.randn(m, W.shape[1])
    ref = reference.qlinear(x, W, bias, A, B, None, 1.5, group_size)
    y8 = ops.qlinear_int8(x, packed, scale, zero, bias, A, B, None, 1.5, bits=bits, group_size=group_size)
    assert y8.dtype == torch.float32 and y8.shape == ref.shape
    assert ((y8.double() - ref).abs() <= _int8_tolerance(x, packed, scale, bits, group_size, ref)).all()
    y = ops.qlinear(x, packed, scale, zero, bias, A, B, None, 1.5, bits=bits, group_size=group_size)
    if m < T:
        # The int8 path really ran: its rounding shows.
        assert not torch.equal(y8, y)
    else:
        assert torch.equal(y8, y)  # from T rows on, the float GEMM path


@pytest.mark.parametrize("bits", BITS)
def test_int8_kernels_agree_across_isas(bits):
    # The integer sums are exact, so the hand-written and portable kernels
    # differ only in the order of float additions.
    if "avx512vnni" not in FAST_ISAS:
        pytest.skip("no avx512vnni kernels in this build")
    packed, scale, zero, W, A, B, bias = _layer(bits, 32)
    x = torch.randn(3, W.shape[1])
    out = {}
    for isa in ("avx512vnni", "scalar"):
        try:
            _C.set_cpu_isa(isa)
        except ValueError:
            pytest.skip(f"this CPU cannot run the {isa} kernels")
        try:
            out[isa] = ops.qlinear_int8(x, packed, scale, zero, bias, bits=bits, group_size=32)
        finally:
            _C.set_cpu_isa("auto")
    assert rel_err(out["avx512vnni"], out["scalar"]) <= 1e-5


def test_int8_activations_refuse_gradients_and_non_finite_input():
    packed, scale, zero, W = quantized(16, 64, 4, 32)
    x = torch.randn(2, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no gradient"):
        ops.qlinear_int8(x, packed, scale, zero, bits=4, group_size=32)
    with torch.no_grad():
        ops.qlinear_int8(x, packed, scale, zero, bits=4, group_size=32)
    bad = torch.randn(2, 64)
    bad[1, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.qlinear_int8(bad, packed, scale, zero, bits=4, group_size=32)
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        ops.qlinear_int8(bad, packed, scale, zero, bits=5, group_size=32)


def test_modules_use_int8_only_where_no_gradient_is_needed():
    lin = torch.nn.Linear(128, 48)
    layer = QALoRALinear(QuantLinear.from_linear(lin, bits=4, group_size=32), rank=4)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(3, 128)
    with torch.no_grad():
        y_float = layer(x)
    assert set_int8_activations(layer) == 1
    assert "int8_activations=True" in repr(layer.base)
    with torch.no_grad():
        y_int8 = layer(x)
    assert not torch.equal(y_int8, y_float)
    # Training needs gradients of the adapter: the float path runs.
    y_train = layer(x)
    assert torch.equal(y_train.detach(), y_float)
    y_train.sum().backward()
    assert layer.lora_A.grad is not None


@pytest.mark.parametrize("bits", BITS)
def test_decode_kernel_row_blocks_for_large_in_features(isa, bits):
    # in_features whose re-ordered x outgrows L1 (> 8192 floats) switch the M=1
    # kernel to blocks of 4 rows; 7 rows = one block + 3 single rows.
    packed, scale, zero, W = quantized(7, 8224, bits, 32)
    A, B = torch.randn(4, 8224 // 32) * 0.3, torch.randn(7, 4) * 0.3
    x = torch.randn(1, 8224)
    y = ops.qlinear(x, packed, scale, zero, None, A, B, None, 1.0, bits=bits, group_size=32)
    assert rel_err(y, reference.qlinear(x, W, None, A, B, None, 1.0, 32)) <= 1e-5

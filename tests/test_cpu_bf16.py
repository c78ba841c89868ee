"""bfloat16 activations on the CPU (SPEC "16-bit activations"): the large-M
bf16 GEMM path (W~ rounded once to bf16, bf16 x bf16 products accumulated in
float32, bias and adapter added in float32, output rounded once) and the
small-M kernels that read bf16 x in place, forward and grad_input, against the
float64 reference, on every CPU kernel table this machine has, on both sides
of each M threshold.

The tolerance, derived from the roundings the path is allowed (bfloat16 keeps
8 significant bits: rounding to nearest moves a value by at most u = 2^-8 of
it; x, grad_out, scale and zero are the reference's own inputs, exact):

  |out - ref| <= 2^-8 |ref|                      the output, rounded once to bf16
              + (2^-8 + K 2^-24) (|x| @ |W~|^T)  W~ rounded to bf16 once, and the
                                                 float32 sum over K (gamma_K <= K 2^-24)
              + 2^-14 (|bias| + |adapter|_abs)  the float32 epilogue: bias add, and the
                                                 adapter's sums (group sums, over L, r, N:
                                                 gamma <= 2^-14 at these sizes) of
                                                 |terms| (the adapter computed on |x|,
                                                 |A|, |B|, |mask|)

elementwise, times 1.01 for the second-order terms (for grad_input, |gy| @ |W~|
in place of |x| @ |W~|^T). This bound is rigorous but loose where the sum
cancels, so each case also checks the norm-wise error: the rounding errors are
independent, each well under u / sqrt(3) RMS relative (W~'s and the output's),
so ||out - ref|| / ||ref|| stays near 2.4e-3 (measured); 2^-7 = 2u leaves room
for the spread without letting a lost group (several % of ||ref||) through.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import qalora_ext
from qalora_ext import _C, ops, reference

from conftest import quantized, rel_err

BITS = (2, 3, 4)
GROUPS = (32, 64, 128)
T = _C.SMALL_M_THRESHOLD
TG = _C.SMALL_M_THRESHOLD_GRAD
GEMV = _C.GEMV_MAX_M
TB = _C.SMALL_M_THRESHOLD_BF16  # bf16 x: the bf16 GEMM from here on (float32 GEMM only from T)
# forward: decode kernel | small-M packed kernel | bf16 GEMM (float32 path from T when it is off)
ROWS = tuple(sorted({1, GEMV, GEMV + 1, TB - 1, TB, T - 1, T, 3 * T + 5}))
# grad_input: packed kernel | bf16 GEMM
GRAD_ROWS = (1, TG - 1, TG, 2 * T + 3)
ISAS = [i for i in ("scalar", "avx2", "avx512", "avx512vnni") if i in _C.compiled_cpu_isas().split(",")]
NORM_TOL = 2.0**-7


@pytest.fixture(params=ISAS)
def isa(request):
    try:
        _C.set_cpu_isa(request.param)
    except ValueError:
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    yield request.param
    _C.set_cpu_isa("auto")


def _k_for(group_size):
    # 1312 = 41 x 32, 640 = 5 x 128: neither is a whole number of grad_input's
    # 256-column blocks nor of the decode kernels' spans.
    return 1312 if group_size == 32 else 640


def _layer(bits, group_size, n):
    k = _k_for(group_size)
    packed, scale, zero, W = quantized(n, k, bits, group_size)
    A, B = torch.randn(8, k // group_size) * 0.3, torch.randn(n, 8) * 0.3
    return packed, scale, zero, W, A, B, torch.randn(n)


def _bound(ref, abs_prod, k, epilogue_abs):
    """Elementwise bound of the module docstring."""
    return 1.01 * (2.0**-8 * ref.abs() + (2.0**-8 + k * 2.0**-24) * abs_prod + 2.0**-14 * epilogue_abs)


def _check(out, ref, abs_prod, k, epilogue_abs):
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = (out.double() - ref).abs()
    bound = _bound(ref, abs_prod, k, epilogue_abs)
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"elementwise error {worst:.3f} x the bf16 bound"
    assert rel_err(out, ref) <= NORM_TOL


def _forward_case(bits, group_size, m, n=72, with_mask=False):
    packed, scale, zero, W, A, B, bias = _layer(bits, group_size, n)
    k = W.shape[1]
    x = torch.randn(m, k).bfloat16()
    mask = (torch.rand(m, k // group_size) > 0.3).float() / 0.7 if with_mask else None
    y = ops.qlinear(x, packed, scale, zero, bias, A, B, mask, 1.5, bits=bits, group_size=group_size)
    ref = reference.qlinear(x, W, bias, A, B, mask, 1.5, group_size)
    adapter = reference.qlinear(x.double().abs(), torch.zeros_like(W), None, A.abs(), B.abs(),
                                None if mask is None else mask.abs(), 1.5, group_size)
    abs_prod = x.double().abs() @ W.abs().t()
    _check(y, ref, abs_prod, k, bias.double().abs() + adapter.abs())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("m", ROWS)
def test_forward_bf16_within_bf16_rounding(isa, bits, group_size, m):
    _forward_case(bits, group_size, m)


@pytest.mark.parametrize("m", (GEMV + 1, TB, T, 3 * T + 5))
@pytest.mark.parametrize("n", (37, 130))  # row counts that leave a tail of every row block
def test_forward_bf16_with_pool_mask_and_odd_rows(isa, m, n):
    _forward_case(3, 64, m, n=n, with_mask=True)


def _grad_case(bits, group_size, m, n=72, with_mask=False):
    packed, scale, zero, W, A, B, _ = _layer(bits, group_size, n)
    k = W.shape[1]
    gy = torch.randn(m, n).bfloat16()
    mask = (torch.rand(m, k // group_size) > 0.3).float() / 0.7 if with_mask else None
    gx = ops.qlinear_grad_input(gy, packed, scale, zero, A, B, mask, 1.5, bits=bits, group_size=group_size)
    ref = reference.qlinear_grad_input(gy, W, A, B, mask, 1.5, group_size)
    adapter = reference.qlinear_grad_input(gy.double().abs(), torch.zeros_like(W), A.abs(), B.abs(),
                                           None if mask is None else mask.abs(), 1.5, group_size)
    abs_prod = gy.double().abs() @ W.abs()
    _check(gx, ref, abs_prod, n, adapter.abs())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("m", GRAD_ROWS)
def test_grad_input_bf16_within_bf16_rounding(isa, bits, group_size, m):
    _grad_case(bits, group_size, m)


@pytest.mark.parametrize("m", (TG, 2 * T + 3))
@pytest.mark.parametrize("n", (37, 301))  # odd: grad_input pairs rows of W~, the last one with zeros
def test_grad_input_bf16_with_pool_mask_and_odd_rows(isa, m, n):
    _grad_case(2, 32, m, n=n, with_mask=True)


def test_build_info_names_the_bf16_path():
    info = qalora_ext.build_info()
    status = info["cpu_bf16_gemm"]
    assert status == _C.cpu_bf16_gemm()
    assert status == "onednn-brgemm-amx" or status.startswith("off: ")


def test_bf16_gemm_can_be_turned_off_and_the_float32_path_runs():
    # A CPU without a bf16 GEMM runs the float32 path for bf16 x: forced here.
    packed, scale, zero, W, A, B, bias = _layer(4, 32, 72)
    x = torch.randn(2 * T, W.shape[1]).bfloat16()
    gy = torch.randn(2 * T, 72).bfloat16()
    on = _C.cpu_bf16_gemm()
    try:
        _C.set_cpu_bf16_gemm(False)
        assert _C.cpu_bf16_gemm().startswith("off: ")
        y32 = ops.qlinear(x, packed, scale, zero, bias, A, B, None, 1.5, bits=4, group_size=32)
        g32 = ops.qlinear_grad_input(gy, packed, scale, zero, A, B, None, 1.5, bits=4, group_size=32)
    finally:
        _C.set_cpu_bf16_gemm(True)
    assert _C.cpu_bf16_gemm() == on
    # float32 products: only the output's rounding remains
    ref = reference.qlinear(x, W, bias, A, B, None, 1.5, 32)
    assert rel_err(y32, ref) <= 2.0**-8
    assert rel_err(g32, reference.qlinear_grad_input(gy, W, A, B, None, 1.5, 32)) <= 2.0**-8


def test_env_var_turns_the_bf16_gemm_off():
    code = "from qalora_ext import build_info; print(build_info()['cpu_bf16_gemm'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "QALORA_CPU_BF16_GEMM": "0"}).stdout
    assert out.startswith("off: ")


def test_bf16_paths_do_not_depend_on_the_thread_count():
    packed, scale, zero, W, A, B, bias = _layer(4, 64, 300)
    x = torch.randn(3 * T, W.shape[1]).bfloat16()
    gy = torch.randn(3 * T, 300).bfloat16()
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append((ops.qlinear(x, packed, scale, zero, bias, A, B, None, 1.5, bits=4, group_size=64),
                         ops.qlinear_grad_input(gy, packed, scale, zero, A, B, None, 1.5, bits=4, group_size=64)))
    finally:
        torch.set_num_threads(before)
    for y, g in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(g, outs[0][1])


def test_autograd_under_bf16_runs_the_bf16_kernels():
    # QALoRA-style call: bf16 x requiring grad, the backward's grad_out in bf16.
    packed, scale, zero, W, A, B, bias = _layer(4, 32, 72)
    x = torch.randn(2 * T, W.shape[1]).bfloat16().requires_grad_()
    y = ops.qlinear(x, packed, scale, zero, bias, A, B, None, 1.5, bits=4, group_size=32)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert x.grad.dtype == torch.bfloat16
    ref = reference.qlinear_grad_input(gy, W, A, B, None, 1.5, 32)
    assert rel_err(x.grad, ref) <= NORM_TOL

"""The qlinear ops (forward, grad_input, autograd) against the float64 reference,
on every compiled CPU instruction set, at the small-M / GEMM boundary, plus
opcheck, torch.compile, meta tensors, and bad input."""

from __future__ import annotations

import os

import pytest
import torch

import qalora_ext
from qalora_ext import _C, ops, reference

from conftest import quantized, rel_err

BITS = (2, 3, 4)
GROUPS = (32, 64, 128)
T = _C.SMALL_M_THRESHOLD  # rows below: packed kernels; at or above: dequantize + GEMM
TG = _C.SMALL_M_THRESHOLD_GRAD  # the same for grad_input
ISAS = [isa for isa in _C.compiled_cpu_isas().split(",")]


def _k_for(group_size):
    return 576 if 576 % group_size == 0 else 640


def _available(isa):
    try:
        _C.set_cpu_isa(isa)
        return True
    except ValueError:
        return False
    finally:
        _C.set_cpu_isa("auto")


@pytest.fixture(params=ISAS)
def isa(request):
    if not _available(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa("auto")


def _adapter(n, groups, rank=8):
    return torch.randn(rank, groups) * 0.3, torch.randn(n, rank) * 0.3


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("lead", [(1,), (3,), (17,), (2, 5), (T - 1,), (T,), (2, 40)])
def test_qlinear_forward_matches_reference(bits, group_size, lead):
    n, k = 1536 if lead == (1,) else 200, _k_for(group_size)
    packed, scale, zero, W = quantized(n, k, bits, group_size)
    A, B = _adapter(n, k // group_size)
    bias = torch.randn(n)
    mask = (torch.rand(*lead, k // group_size) > 0.3).float() / 0.7
    x = torch.randn(*lead, k)
    y = ops.qlinear(x, packed, scale, zero, bias, A, B, mask, 0.75, bits=bits, group_size=group_size)
    ref = reference.qlinear(x, W, bias, A, B, mask, 0.75, group_size)
    assert y.shape == (*lead, n) and y.dtype == torch.float32
    assert rel_err(y, ref) <= 1e-5
    # Without adapter or bias too.
    y0 = ops.qlinear(x, packed, scale, zero, bits=bits, group_size=group_size)
    assert rel_err(y0, reference.qlinear(x, W)) <= 1e-5


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 7), (TG - 1,), (TG,), (T - 1,), (T,), (33,)])
def test_qlinear_grad_input_matches_reference(bits, group_size, lead):
    n, k = 96, _k_for(group_size)
    packed, scale, zero, W = quantized(n, k, bits, group_size)
    A, B = _adapter(n, k // group_size)
    mask = (torch.rand(*lead, k // group_size) > 0.5).float() * 2
    gy = torch.randn(*lead, n)
    gx = ops.qlinear_grad_input(gy, packed, scale, zero, A, B, mask, 1.5, bits=bits, group_size=group_size)
    ref = reference.qlinear_grad_input(gy, W, A, B, mask, 1.5, group_size)
    assert gx.shape == (*lead, k)
    assert rel_err(gx, ref) <= 1e-5
    gx0 = ops.qlinear_grad_input(gy, packed, scale, zero, bits=bits, group_size=group_size)
    assert rel_err(gx0, reference.qlinear_grad_input(gy, W)) <= 1e-5


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", sorted({1, 5, TG - 1, TG, T - 1, T, 2 * T + 3}))
@pytest.mark.parametrize("store", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                   (torch.float32, torch.float16)])
def test_every_isa_matches_reference(isa, bits, m, store):
    """Each compiled instruction set (scalar fallback included) on both sides of the M thresholds,
    with every scale/zero storage dtype (each has its own load path in the kernels)."""
    assert _C.get_cpu_isa() == isa
    n, k, g = 136, 640, 64
    packed, scale, zero, W = quantized(n, k, bits, g, scale_dtype=store[0], zero_dtype=store[1])
    A, B = _adapter(n, k // g)
    x = torch.randn(m, k)
    y = ops.qlinear(x, packed, scale, zero, None, A, B, None, 2.0, bits=bits, group_size=g)
    assert rel_err(y, reference.qlinear(x, W, None, A, B, None, 2.0, g)) <= 1e-5
    gy = torch.randn(m, n)
    gx = ops.qlinear_grad_input(gy, packed, scale, zero, A, B, None, 2.0, bits=bits, group_size=g)
    assert rel_err(gx, reference.qlinear_grad_input(gy, W, A, B, None, 2.0, g)) <= 1e-5
    deq = ops.dequantize(packed, scale, zero, bits, g)
    assert rel_err(deq, W) <= 1e-6


def test_scalar_path_can_be_forced_and_unknown_isa_is_an_error():
    qalora_ext.set_cpu_isa("scalar")
    try:
        assert _C.get_cpu_isa() == "scalar"
    finally:
        qalora_ext.set_cpu_isa("auto")
    assert _C.get_cpu_isa() == _C.best_cpu_isa()
    with pytest.raises(ValueError, match="not available"):
        qalora_ext.set_cpu_isa("sse9")


@pytest.mark.parametrize("m", (1, T + 1))
def test_bfloat16_activations(m):
    n, k, g = 64, 256, 32
    packed, scale, zero, W = quantized(n, k, 4, g)
    x = torch.randn(m, k).bfloat16()
    y = ops.qlinear(x, packed, scale, zero, bits=4, group_size=g)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, reference.qlinear(x, W)) <= 1e-2  # bfloat16 output rounding


@pytest.mark.parametrize("m", (2, T + 5))
def test_deterministic(m):
    packed, scale, zero, _ = quantized(300, 512, 3, 64)
    A, B = _adapter(300, 8)
    x = torch.randn(m, 512)
    outs = [ops.qlinear(x, packed, scale, zero, None, A, B, None, 1.0, bits=3, group_size=64) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_small_m_kernel_independent_of_thread_count():
    packed, scale, zero, _ = quantized(512, 512, 4, 32)
    x, gy = torch.randn(3, 512), torch.randn(3, 512)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = ops.qlinear(x, packed, scale, zero, bits=4, group_size=32)
        g1 = ops.qlinear_grad_input(gy, packed, scale, zero, bits=4, group_size=32)
        torch.set_num_threads(max(2, old))
        y2 = ops.qlinear(x, packed, scale, zero, bits=4, group_size=32)
        g2 = ops.qlinear_grad_input(gy, packed, scale, zero, bits=4, group_size=32)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)


def test_empty_batch_and_non_contiguous_input():
    packed, scale, zero, W = quantized(48, 128, 2, 32)
    A, B = _adapter(48, 4)
    x0 = torch.randn(0, 128, requires_grad=True)
    y0 = ops.qlinear(x0, packed, scale, zero, None, A, B, None, 1.0, bits=2, group_size=32)
    assert y0.shape == (0, 48)
    y0.sum().backward()
    assert x0.grad.shape == (0, 128)
    assert ops.qlinear_grad_input(torch.randn(4, 0, 48), packed, scale, zero, bits=2, group_size=32).shape == (4, 0, 128)
    xt = torch.randn(128, 7).t()  # non-contiguous
    assert not xt.is_contiguous()
    y = ops.qlinear(xt, packed, scale, zero, None, A, B, None, 1.0, bits=2, group_size=32)
    assert rel_err(y, reference.qlinear(xt, W, None, A, B, None, 1.0, 32)) <= 1e-5
    # Non-contiguous weights are handled too.
    s_nc = scale.t().contiguous().t()
    assert not s_nc.is_contiguous()
    assert torch.equal(ops.qlinear(xt, packed, s_nc, zero, bits=2, group_size=32),
                       ops.qlinear(xt, packed, scale, zero, bits=2, group_size=32))


# ---- autograd -------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("lead", [(1,), (2, 3), (TG + 2,), (T + 2,)])
@pytest.mark.parametrize("with_mask", (False, True))
def test_autograd_matches_reference(bits, lead, with_mask):
    n, k, g = 80, 256, 32
    packed, scale, zero, W = quantized(n, k, bits, g)
    A0, B0 = _adapter(n, k // g)
    bias0 = torch.randn(n)
    mask = ((torch.rand(*lead, k // g) > 0.25).float() / 0.75) if with_mask else None
    x0 = torch.randn(*lead, k)
    gy = torch.randn(*lead, n)

    x, A, B, bias = (t.clone().requires_grad_() for t in (x0, A0, B0, bias0))
    ops.qlinear(x, packed, scale, zero, bias, A, B, mask, 0.5, bits=bits, group_size=g).backward(gy)

    xr, Ar, Br, br = (t.double().requires_grad_() for t in (x0, A0, B0, bias0))
    reference.qlinear(xr, W, br, Ar, Br, mask, 0.5, g).backward(gy.double())
    for got, want in ((x.grad, xr.grad), (A.grad, Ar.grad), (B.grad, Br.grad), (bias.grad, br.grad)):
        assert got.dtype == torch.float32
        assert rel_err(got, want) <= 1e-5
    # The reference's closed forms agree with its autograd.
    gA, gB = reference.adapter_grads(x0, gy, A0, B0, mask, 0.5, g)
    assert rel_err(gA, Ar.grad) <= 1e-12 and rel_err(gB, Br.grad) <= 1e-12


@pytest.mark.filterwarnings("ignore:Input #.*double precision")
def test_gradcheck_through_the_op():
    """torch.autograd.gradcheck on the adapter and input (float32 op, so loose eps)."""
    packed, scale, zero, _ = quantized(16, 64, 4, 32)
    A0, B0 = _adapter(16, 2, rank=3)
    x = torch.randn(2, 64, dtype=torch.float32, requires_grad=True)
    A = A0.clone().requires_grad_()
    B = B0.clone().requires_grad_()

    def f(x, A, B):
        return ops.qlinear(x, packed, scale, zero, None, A, B, None, 1.0, bits=4, group_size=32)

    assert torch.autograd.gradcheck(f, (x, A, B), eps=1e-2, atol=5e-3, rtol=5e-3)


# ---- torch integration ------------------------------------------------------


def _codes(n, k, bits):
    """Random codes, every value of the range likely (never an all-zero tensor)."""
    return torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)


def _mask(lead, groups):
    return (torch.rand(*lead, groups) > 0.3).float() / 0.7


def _qlinear_sample(lead, n, k, bits, group_size, *, bias, adapter, mask, dtype=torch.float32, grad=False,
                    store=(torch.float16, torch.float32)):
    """qlinear's / qlinear_int8's arguments: fresh random x, weight, bias and
    adapter (lora_B nonzero, so the adapter's term is exercised)."""
    packed, scale, zero, _ = quantized(n, k, bits, group_size, *store)
    groups = k // group_size
    A, B = _adapter(n, groups, rank=3) if adapter else (None, None)
    x = torch.randn(*lead, k, dtype=dtype)
    if grad:
        x.requires_grad_()
        if adapter:
            A, B = A.requires_grad_(), B.requires_grad_()
    return (x, packed, scale, zero, torch.randn(n) if bias else None, A, B,
            _mask(lead, groups) if mask else None, 0.75, bits, group_size, 1)


def _grad_input_sample(lead, n, k, bits, group_size, *, adapter, mask):
    packed, scale, zero, _ = quantized(n, k, bits, group_size)
    groups = k // group_size
    A, B = _adapter(n, groups, rank=3) if adapter else (None, None)
    return (torch.randn(*lead, n), packed, scale, zero, A, B, _mask(lead, groups) if mask else None, 1.5, bits,
            group_size, 1)


def _dequantize_sample(n, k, bits, group_size, store):
    packed, scale, zero, _ = quantized(n, k, bits, group_size, *store)
    return (packed, scale, zero, bits, group_size, 1)


def _unpack_sample(n, k, bits):
    return (ops.pack(_codes(n, k, bits), bits), bits, k, 1)


# Several samples per CPU op: odd shapes, leading dims, every bit width, each
# M path of qlinear (GEMV, small-M rows, dequantize + GEMM), with and without
# bias / adapter / pool_mask. Built when the test runs: fresh random data.
OPCHECK_SAMPLES = {
    "quantize_rtn": [
        lambda: (torch.randn(37, 96), 3, 32, torch.float16, torch.float32),
        lambda: (torch.randn(5, 128) * 4, 2, 64, torch.bfloat16, torch.bfloat16),
        lambda: (torch.randn(3, 256, dtype=torch.bfloat16), 4, 128, torch.float32, torch.float16),
    ],
    "pack": [
        lambda: (_codes(37, 96, 3), 3),
        lambda: (_codes(1, 32, 2), 2),
        lambda: (_codes(6, 160, 4), 4),
    ],
    "unpack": [
        lambda: _unpack_sample(37, 96, 3),
        lambda: _unpack_sample(1, 32, 2),
        lambda: _unpack_sample(6, 160, 4),
    ],
    "dequantize": [
        lambda: _dequantize_sample(37, 96, 3, 32, (torch.float16, torch.float32)),
        lambda: _dequantize_sample(5, 128, 2, 64, (torch.bfloat16, torch.bfloat16)),
        lambda: _dequantize_sample(3, 256, 4, 128, (torch.float32, torch.float16)),
    ],
    "qlinear": [
        lambda: _qlinear_sample((3,), 37, 96, 3, 32, bias=True, adapter=True, mask=True, grad=True),
        lambda: _qlinear_sample((2, 5), 24, 128, 2, 64, bias=False, adapter=True, mask=False, grad=True),
        lambda: _qlinear_sample((1,), 19, 256, 4, 128, bias=True, adapter=False, mask=False),
        lambda: _qlinear_sample((T + 3,), 21, 64, 4, 32, bias=True, adapter=True, mask=True, grad=True),
        lambda: _qlinear_sample((2, 3), 16, 64, 3, 32, bias=True, adapter=True, mask=True, dtype=torch.bfloat16,
                                store=(torch.bfloat16, torch.float32)),
    ],
    # qlinear_int8 has no autograd formula: inputs that do not require grad.
    "qlinear_int8": [
        lambda: _qlinear_sample((3,), 37, 96, 3, 32, bias=True, adapter=True, mask=True),
        lambda: _qlinear_sample((2, 5), 24, 128, 2, 64, bias=False, adapter=False, mask=False),
        lambda: _qlinear_sample((1,), 19, 256, 4, 128, bias=False, adapter=True, mask=False),
        lambda: _qlinear_sample((T + 1,), 21, 64, 4, 32, bias=True, adapter=True, mask=False),
    ],
    "qlinear_grad_input": [
        lambda: _grad_input_sample((3,), 37, 96, 3, 32, adapter=True, mask=True),
        lambda: _grad_input_sample((2, 7), 24, 128, 2, 64, adapter=False, mask=False),
        lambda: _grad_input_sample((1,), 19, 256, 4, 128, adapter=True, mask=False),
        lambda: _grad_input_sample((TG + 2,), 21, 64, 4, 32, adapter=True, mask=True),
    ],
}
# opcheck's default checks, named: test_autograd_registration runs only where
# an input requires grad (opcheck skips it otherwise: qlinear_int8, the format
# ops, qlinear_grad_input); the others apply to every sample.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("name, i", [(name, i) for name, samples in OPCHECK_SAMPLES.items()
                                     for i in range(len(samples))], ids=lambda v: str(v))
def test_opcheck(name, i):
    args = OPCHECK_SAMPLES[name][i]()
    torch.library.opcheck(getattr(torch.ops.qalora, name).default, args, test_utils=OPCHECK_UTILS)


def test_opcheck_covers_every_op():
    registered = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("qalora::")}
    assert registered == set(OPCHECK_SAMPLES), registered ^ set(OPCHECK_SAMPLES)


def test_meta_tensors_give_shapes():
    packed, scale, zero, _ = quantized(64, 128, 4, 32)
    x = torch.empty(5, 7, 128, device="meta")
    y = torch.ops.qalora.qlinear(x, packed.to("meta"), scale.to("meta"), zero.to("meta"), None, None, None, None,
                                 1.0, 4, 32, 1)
    assert y.shape == (5, 7, 64) and y.device.type == "meta"


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    lin1, lin2 = torch.nn.Linear(128, 96), torch.nn.Linear(96, 64)
    model = torch.nn.Sequential(
        qalora_ext.QALoRALinear.from_linear(lin1, bits=4, group_size=32, rank=4),
        torch.nn.GELU(),
        qalora_ext.QALoRALinear.from_linear(lin2, bits=3, group_size=32, rank=4),
    )
    with torch.no_grad():
        for m in model:
            if isinstance(m, qalora_ext.QALoRALinear):
                m.lora_B.normal_()
    model.eval()
    x = torch.randn(6, 128)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    # And a backward through the compiled graph.
    model.train()
    xg = x.clone().requires_grad_()
    torch.compile(model, backend="aot_eager")(xg).sum().backward()
    assert xg.grad is not None and model[0].lora_B.grad is not None


# ---- bad input ---------------------------------------------------------------


def test_raw_ops_reject_mixed_devices_and_bad_arguments():
    """The raw torch.ops (no Python wrapper) check too: the fake kernel runs whenever any argument is on meta."""
    packed, scale, zero, _ = quantized(64, 128, 4, 32)
    A, B = _adapter(64, 4)
    x = torch.randn(2, 128)
    op = torch.ops.qalora
    with pytest.raises(ValueError, match="the input is on cpu but the weight is on meta"):
        op.qlinear(x, packed.to("meta"), scale.to("meta"), zero.to("meta"), None, None, None, None, 1.0, 4, 32, 1)
    with pytest.raises(ValueError, match="packed, scale and zero must be on one device; got cpu, meta, cpu"):
        op.qlinear_grad_input(torch.randn(2, 64), packed, scale.to("meta"), zero, None, None, None, 1.0, 4, 32, 1)
    with pytest.raises(ValueError, match="needs lora_A and lora_B"):
        op.qlinear(x, packed, scale, zero, None, None, None, torch.ones(2, 4), 1.0, 4, 32, 1)
    with pytest.raises(ValueError, match="last dimension 128"):
        op.qlinear(torch.randn(2, 96), packed, scale, zero, None, A, B, None, 1.0, 4, 32, 1)
    with pytest.raises(TypeError, match="float32 or bfloat16 on CPU"):
        op.qlinear(x.half(), packed, scale, zero, None, None, None, None, 1.0, 4, 32, 1)
    with pytest.raises(ValueError, match="layout id 3"):
        op.qlinear(x, packed, scale, zero, None, None, None, None, 1.0, 4, 32, 3)


def test_cpu_isa_environment_variable_and_cli():
    import subprocess
    import sys

    env = dict(os.environ, QALORA_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-m", "qalora_ext", "info"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "cpu_isa_active: scalar" in out and "packed_layout: 1" in out


def test_qlinear_bad_input_messages():
    packed, scale, zero, _ = quantized(64, 128, 4, 32)
    A, B = _adapter(64, 4)
    x = torch.randn(2, 128)
    kw = dict(bits=4, group_size=32)
    with pytest.raises(ValueError, match="last dimension 128"):
        ops.qlinear(torch.randn(2, 96), packed, scale, zero, **kw)
    with pytest.raises(TypeError, match="float32 or bfloat16 on CPU"):
        ops.qlinear(x.half(), packed, scale, zero, **kw)
    with pytest.raises(TypeError, match="float32 or bfloat16 on CPU"):
        ops.qlinear(x.double(), packed, scale, zero, **kw)
    with pytest.raises(ValueError, match="lora_A must be"):
        ops.qlinear(x, packed, scale, zero, None, A[:, :3], B, **kw)
    with pytest.raises(ValueError, match="lora_B must be"):
        ops.qlinear(x, packed, scale, zero, None, A, B[:, :2], **kw)
    with pytest.raises(ValueError, match="given together"):
        ops.qlinear(x, packed, scale, zero, None, A, None, **kw)
    with pytest.raises(ValueError, match="bias must be"):
        ops.qlinear(x, packed, scale, zero, torch.randn(63), **kw)
    with pytest.raises(ValueError, match="pool_mask must have shape"):
        ops.qlinear(x, packed, scale, zero, None, A, B, torch.ones(2, 3), **kw)
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        ops.qlinear(x, packed, scale, zero, bits=5, group_size=32)
    with pytest.raises(ValueError, match="words per row"):
        ops.qlinear(x, packed, scale, zero, bits=2, group_size=32)
    with pytest.raises(ValueError, match="layout id 9"):
        ops.qlinear(x, packed, scale, zero, bits=4, group_size=32, layout=9)
    with pytest.raises(ValueError, match="on meta but the input is on cpu"):
        ops.qlinear(x, packed, scale.to("meta"), zero, **kw)
    with pytest.raises(ValueError, match="last dimension 64"):
        ops.qlinear_grad_input(torch.randn(2, 60), packed, scale, zero, **kw)


@pytest.mark.parametrize("mode", ("inference", "grad"))
def test_large_m_path_runs_in_the_callers_mode(mode):
    # Several 1 MB dequantization blocks (N x K = 1536 x 512), so the GEMM runs
    # on OpenMP worker threads: they must see the caller's inference mode (y is
    # an inference tensor there) and not record autograd for x.
    n, k, g, m = 1536, 512, 32, T + 16
    packed, scale, zero, W = quantized(n, k, 4, g)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        x = torch.randn(m, k, requires_grad=(mode == "grad"))
        if mode == "inference":
            with torch.inference_mode():
                y = ops.qlinear(x, packed, scale, zero, bits=4, group_size=g)
        else:
            y = ops.qlinear(x, packed, scale, zero, bits=4, group_size=g)
            y.sum().backward()
            assert rel_err(x.grad, W.sum(0).expand(m, k)) <= 1e-5
    finally:
        torch.set_num_threads(threads)
    assert rel_err(y.detach(), reference.qlinear(x.detach().double(), W, None, None, None, None, 1.0, g)) <= 1e-5


def test_zero_output_features_is_an_empty_sum():
    """N = 0 (a layer with no outputs): y is (..., 0) and grad_x is zeros, through the op, the raw op and autograd
    (it once divided by N)."""
    packed = torch.zeros(0, 4, dtype=torch.int32)
    scale, zero = torch.zeros(0, 1, dtype=torch.float16), torch.zeros(0, 1)
    x = torch.randn(2, 3, 32, requires_grad=True)
    A, B = torch.randn(2, 1, requires_grad=True), torch.randn(0, 2, requires_grad=True)
    y = ops.qlinear(x, packed, scale, zero, None, A, B, bits=4, group_size=32)
    assert y.shape == (2, 3, 0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(A.grad, torch.zeros_like(A))
    gx = torch.ops.qalora.qlinear_grad_input(torch.randn(5, 0), packed, scale, zero, None, None, None, 1.0, 4, 32, 1)
    assert gx.shape == (5, 32) and not gx.any()

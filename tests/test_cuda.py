"""The CUDA kernels against the float64 reference: every path by M (fused GEMV,
split-K GEMV, dequantize + cuBLAS), bits x group size x activation dtype,
awkward shapes, outputs poisoned before each run, determinism, the format ops
bit-identical to the CPU's, autograd, and bad input. Skipped without a GPU;
`bench/gpu_check.sh test` runs them on a GPU machine."""

from __future__ import annotations

import pytest
import torch

import qalora_ext
from qalora_ext import _C, ops, reference
from qalora_ext.nn import QALoRALinear, QuantLinear

from conftest import quantized

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _C.WITH_CUDA),
                                reason="needs a CUDA device and a CUDA build of qalora_ext")

BITS = (2, 3, 4)
GROUPS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
GEMV = getattr(_C, "CUDA_GEMV_MAX_M", 8)
ROWS = (1, 3, GEMV, GEMV + 1, 64, 300)  # GEMV, its edge, cuBLAS


@pytest.fixture(autouse=True)
def exact_float32_matmul():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def poison_cache():
    """Fill the caching allocator's free blocks with NaN, so an output element a kernel forgets to
    write shows up as NaN instead of a stale plausible value."""
    t = torch.full((16 << 20,), float("nan"), device="cuda")  # 64 MB
    del t


def norm_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "non-finite output (an unwritten element?)"
    return ((y.double().cpu() - ref).norm() / ref.norm()).item()


def _layer(n, k, bits, g, store=(torch.float16, torch.float32)):
    packed, scale, zero, W = quantized(n, k, bits, g, *store)
    return packed.cuda(), scale.cuda(), zero.cuda(), W


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("m", ROWS)
def test_qlinear_every_path(dtype, bits, group_size, m):
    n, k = 200, 640 if group_size == 128 else 576
    packed, scale, zero, W = _layer(n, k, bits, group_size)
    x = torch.randn(m, k, device="cuda").to(dtype)
    adapter = m % 2 == 1  # odd M: adapter, bias and dropout mask; even M: plain
    A = torch.randn(8, k // group_size, device="cuda") * 0.3 if adapter else None
    B = torch.randn(n, 8, device="cuda") * 0.3 if adapter else None
    bias = torch.randn(n, device="cuda") if adapter else None
    mask = (torch.rand(m, k // group_size, device="cuda") > 0.3).float() / 0.7 if adapter else None
    poison_cache()
    y = ops.qlinear(x, packed, scale, zero, bias, A, B, mask, 1.5, bits=bits, group_size=group_size)
    assert y.dtype == dtype and y.shape == (m, n) and y.is_cuda
    ref = reference.qlinear(x.cpu(), W, *(t.cpu() if t is not None else None for t in (bias, A, B, mask)), 1.5,
                            group_size)
    assert norm_err(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 96), (7, 416), (129, 32), (5, 8192)])
def test_awkward_shapes_and_split_k(bits, shape):
    # N = 1 and N = 5 leave most of the GPU idle: the GEMV splits K over blocks.
    n, k = shape
    packed, scale, zero, W = _layer(n, k, bits, 32)
    for lead in [(1,), (2, 3)]:
        x = torch.randn(*lead, k, device="cuda", dtype=torch.float16)
        poison_cache()
        y = ops.qlinear(x, packed, scale, zero, bits=bits, group_size=32)
        assert y.shape == (*lead, n)
        assert norm_err(y.reshape(-1, n), reference.qlinear(x.reshape(-1, k).cpu(), W)) <= TOL[torch.float16]


@pytest.mark.parametrize("m", [1, GEMV, 64])
def test_deterministic(m):
    packed, scale, zero, W = _layer(3, 8192, 4, 32)  # few rows: split-K GEMV at small M
    big = _layer(1024, 4096, 3, 64)
    x = torch.randn(m, 8192, device="cuda", dtype=torch.bfloat16)
    xb = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    for p, s, z, xx, b, g in ((packed, scale, zero, x, 4, 32), (*big[:3], xb, 3, 64)):
        y1 = ops.qlinear(xx, p, s, z, bits=b, group_size=g)
        y2 = ops.qlinear(xx, p, s, z, bits=b, group_size=g)
        assert torch.equal(y1, y2)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("store", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                   (torch.float32, torch.float16)])
def test_format_ops_equal_the_cpu_bit_for_bit(bits, store):
    w = torch.randn(96, 256) * 0.05
    cpu = ops.quantize_rtn(w, bits, 64, *store)
    gpu = ops.quantize_rtn(w.cuda(), bits, 64, *store)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
    codes = ops.unpack(cpu[0], bits, 256)
    assert torch.equal(ops.unpack(gpu[0], bits, 256).cpu(), codes)
    assert torch.equal(ops.pack(codes.cuda(), bits).cpu(), cpu[0])
    assert torch.equal(ops.dequantize(*gpu, bits, 64).cpu(), ops.dequantize(*cpu, bits, 64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 33])
def test_grad_input(dtype, m):
    n, k, g = 160, 384, 32
    packed, scale, zero, W = _layer(n, k, 3, g)
    A, B = torch.randn(4, k // g) * 0.3, torch.randn(n, 4) * 0.3
    gy = torch.randn(m, n).to(dtype)
    gx = ops.qlinear_grad_input(gy.cuda(), packed, scale, zero, A.cuda(), B.cuda(), None, 2.0, bits=3,
                                group_size=g)
    assert gx.dtype == dtype
    assert norm_err(gx, reference.qlinear_grad_input(gy, W, A, B, None, 2.0, g)) <= TOL[dtype]


def test_autograd_through_the_adapter_layer():
    lin = torch.nn.Linear(256, 96)
    layer = QALoRALinear(QuantLinear.from_linear(lin, bits=4, group_size=32), rank=8).cuda()
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(5, 256, device="cuda", requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    W = reference.dequantize(reference.unpack(layer.base.packed.cpu(), 4, 256), layer.base.scale.cpu(),
                             layer.base.zero.cpu(), 32)
    xr = x.detach().cpu().double().requires_grad_()
    A = layer.lora_A.detach().cpu().double().requires_grad_()
    B = layer.lora_B.detach().cpu().double().requires_grad_()
    ref = reference.qlinear(xr, W, layer.base.bias.cpu(), A, B, None, layer.scaling, 32)
    ref.backward(gy.cpu().double())
    for got, want in ((x.grad, xr.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad)):
        assert norm_err(got, want) <= 1e-5


def test_bad_input_names_the_problem():
    packed, scale, zero, _ = _layer(16, 64, 4, 32)
    x = torch.randn(2, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="device|on cpu"):
        ops.qlinear(x, packed.cpu(), scale, zero, bits=4, group_size=32)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        ops.qlinear(x.double(), packed, scale, zero, bits=4, group_size=32)
    with pytest.raises(ValueError, match="last dimension 64"):
        ops.qlinear(torch.randn(2, 65, device="cuda"), packed, scale, zero, bits=4, group_size=32)
    with pytest.raises(ValueError, match="CPU path"):
        ops.qlinear_int8(x, packed, scale, zero, bits=4, group_size=32)


def test_nvtx_switch():
    _C.set_nvtx(False)
    assert not _C.nvtx_enabled()
    _C.set_nvtx(True)
    assert _C.nvtx_enabled()


def test_sanitizer_small():
    """One small case through each path (GEMV, split-K GEMV, cuBLAS, format ops), for
    `compute-sanitizer --tool memcheck` (bench/gpu_check.sh runs it so)."""
    for n, k, m in ((40, 96, 1), (2, 2048, 2), (40, 96, 12)):
        packed, scale, zero, W = _layer(n, k, 3, 32)
        A, B = torch.randn(4, k // 32, device="cuda"), torch.randn(n, 4, device="cuda")
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        y = ops.qlinear(x, packed, scale, zero, torch.randn(n, device="cuda"), A, B, None, 1.0, bits=3,
                        group_size=32)
        gx = ops.qlinear_grad_input(y, packed, scale, zero, A, B, None, 1.0, bits=3, group_size=32)
        torch.cuda.synchronize()
        assert torch.isfinite(y).all() and torch.isfinite(gx).all()
    codes = ops.unpack(packed, 3, k)
    assert torch.equal(ops.pack(codes, 3), packed)
    assert qalora_ext.build_info()["cuda_kernels"]

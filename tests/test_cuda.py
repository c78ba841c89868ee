"""The CUDA kernels against the float64 reference.

Every path by M (fused GEMV up to ``_C.CUDA_GEMV_MAX_M`` rows, split-K GEMV
when the grid is small, the tensor-core kernel up to ``mma_max_m`` rows for
float16/bfloat16 x, plain and split-K, dequantize + cuBLAS above; grad_input
by tensor cores from the packed codes or dequantize + cuBLAS), bits x group size x
activation dtype, awkward shapes, storage dtypes, non-contiguous and
misaligned input, outputs poisoned (NaN) before each run, determinism, CUDA
graph capture, the format ops bit-identical to the CPU's, grad_input and
autograd, bad input, the NVTX switch, and one small case for
``compute-sanitizer`` (``test_sanitizer_small``). ``bash bench/gpu_check.sh test`` runs them on a GPU
machine.

Without a GPU, the kernels' correctness cases run against the CUDA emulation (issue 14: the same kernel
sources and binding compiled as host C++, ``torch.ops.qalora_emu.*`` on CPU tensors) when
``QALORA_CUDA_EMULATION=1`` (``bash scripts/ci_cuda_emulation.sh`` builds it and runs this file); the
cases that need a real device (graph capture, autograd and modules on ``cuda``, NVTX, a second GPU) are
marked ``needs_gpu``. The emulated binding fills every buffer it allocates with NaN bytes, so
``poison()`` has nothing to do there. ``-m slow`` runs the full grid of M (both sides of every path
limit and of the 64-row tile).

Error measure: ``||y - ref|| / ||ref||`` in float64 (SPEC), with ``||ref||``
floored at half its expected size for random data (``||x|| ||W|| / sqrt(K)``),
so a reference that is near zero by chance (N = 1, M = 1) cannot make a
correct result fail.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import qalora_ext
from qalora_ext import _C, cuda_emulation, ops, reference
from qalora_ext.nn import QALoRALinear, QuantLinear

from conftest import quantized

HAVE_CUDA = torch.cuda.is_available() and bool(getattr(_C, "WITH_CUDA", False))
EMULATED = not HAVE_CUDA and os.environ.get("QALORA_CUDA_EMULATION", "") not in ("", "0")
if EMULATED:
    cuda_emulation.load()
pytestmark = pytest.mark.skipif(
    not (HAVE_CUDA or EMULATED),
    reason="needs a CUDA device and a CUDA build of qalora_ext, or the CUDA emulation "
           "(QALORA_CUDA_EMULATION=1; bash scripts/ci_cuda_emulation.sh)")
needs_gpu = pytest.mark.skipif(not HAVE_CUDA, reason="needs a real CUDA device (not emulated)")
DEV = "cuda" if HAVE_CUDA else "cpu"


class Kernels:
    """The CUDA ops under test: qalora's on a GPU (through the Python wrappers users call), or the emulated
    ones (torch.ops.qalora_emu, CPU tensors), with one signature."""

    def __init__(self, emulated: bool):
        self.emulated = emulated

    @property
    def raw(self):
        return torch.ops.qalora_emu if self.emulated else torch.ops.qalora

    def qlinear(self, x, packed, scale, zero, bias=None, A=None, B=None, mask=None, scaling=1.0, *, bits,
                group_size):
        if not self.emulated:
            return ops.qlinear(x, packed, scale, zero, bias, A, B, mask, scaling, bits=bits, group_size=group_size)
        return self.raw.qlinear(x, packed, scale, zero, bias, A, B, mask, float(scaling), bits, group_size, 1)

    def qlinear_grad_input(self, gy, packed, scale, zero, A=None, B=None, mask=None, scaling=1.0, *, bits,
                           group_size):
        if not self.emulated:
            return ops.qlinear_grad_input(gy, packed, scale, zero, A, B, mask, scaling, bits=bits,
                                          group_size=group_size)
        return self.raw.qlinear_grad_input(gy, packed, scale, zero, A, B, mask, float(scaling), bits, group_size, 1)

    def quantize_rtn(self, w, bits, g, scale_dtype=torch.float16, zero_dtype=torch.float32):
        if not self.emulated:
            return ops.quantize_rtn(w, bits, g, scale_dtype, zero_dtype)
        return self.raw.quantize_rtn(w, bits, g, scale_dtype, zero_dtype)

    def pack(self, codes, bits):
        return ops.pack(codes, bits) if not self.emulated else self.raw.pack(codes, bits)

    def unpack(self, packed, bits, k):
        return ops.unpack(packed, bits, k) if not self.emulated else self.raw.unpack(packed, bits, k, 1)

    def dequantize(self, packed, scale, zero, bits, g):
        if not self.emulated:
            return ops.dequantize(packed, scale, zero, bits, g)
        return self.raw.dequantize(packed, scale, zero, bits, g, 1)

    def limits(self):
        if not self.emulated:
            return _C.cuda_path_limits()
        g, m, gr = self.raw.cuda_path_limits()
        return {"gemv_max_m": g, "mma_max_m": m, "grad_mma_max_m": gr}

    def set_limits(self, gemv_max_m, mma_max_m, grad_mma_max_m=None):
        if not self.emulated:
            return _C.set_cuda_path_limits(gemv_max_m, mma_max_m, grad_mma_max_m)
        if grad_mma_max_m is None:
            grad_mma_max_m = self.limits()["grad_mma_max_m"]
        self.raw.set_cuda_path_limits(gemv_max_m, mma_max_m, grad_mma_max_m)


KERNELS = Kernels(EMULATED)


def sync():
    if HAVE_CUDA:
        torch.cuda.synchronize()

BITS = (2, 3, 4)
GROUPS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
GEMV = int(getattr(_C, "CUDA_GEMV_MAX_M", 8))
ROWS = tuple(sorted({1, 3, GEMV, GEMV + 1, 64, 300}))  # GEMV, its edge, tensor cores, dequantize + cuBLAS
# -m slow: both sides of every default path limit (GEMV 8, tensor cores 128, grad tensor cores 256) and of
# the kernels' 16-row and 64-row tiles.
ROWS_FULL = (1, 2, 7, 8, 9, 16, 17, 63, 64, 65, 128, 129, 256, 257)
# What each M of ROWS carries besides x W~^T: every combination shows up on both sides of the boundary.
EXTRAS = {m: ("full", "bias", "adapter", "full", "none", "adapter")[i % 6] for i, m in enumerate(ROWS)}
# (N, K, G): N = 1 / 7 / 129, K an odd number of 32-chunks or groups, and few rows with a long K, where
# the GEMV has too few blocks for the GPU and splits K (the deterministic two-pass reduction).
AWKWARD = [(1, 96, 32), (7, 416, 32), (129, 32, 32), (33, 448, 64), (17, 384, 128), (3, 16384, 32),
           (1, 32768, 32)]
STORES = [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)]


@pytest.fixture(scope="module", autouse=True)
def exact_cublas():
    """cuBLAS without TF32 (float32) and without reduced-precision split-K reductions (float16/bfloat16),
    so the large-M path is measured against its own rounding only. Each flag is set only if this torch
    has it (the TF32 switch moved to a new API in recent torch)."""
    m = torch.backends.cuda.matmul
    saved = {}
    for name in ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction"):
        try:
            saved[name] = getattr(m, name)
            setattr(m, name, False)
        except Exception:  # noqa: BLE001  (a flag this torch lacks or refuses: keep its default)
            saved.pop(name, None)
    yield
    for name, value in saved.items():
        try:
            setattr(m, name, value)
        except Exception:  # noqa: BLE001
            pass


def poison():
    """Fill the caching allocator's free memory with 0xFF bytes (NaN as float32, float16 and bfloat16), so
    an output element, a workspace entry or padding word a kernel forgets to write shows up as NaN or as a
    mismatch instead of a stale plausible value. Covers both pools: small (<= 1 MB blocks) and large.
    (Emulated: the binding itself fills every buffer it allocates with 0xFF bytes.)"""
    if not HAVE_CUDA:
        return
    sync()
    torch.cuda.empty_cache()
    big = torch.empty(64 << 20, dtype=torch.uint8, device=DEV).fill_(255)
    small = [torch.empty(1 << 20, dtype=torch.uint8, device=DEV).fill_(255) for _ in range(16)]
    mid = [torch.empty(n << 10, dtype=torch.uint8, device=DEV).fill_(255) for n in (3, 40, 200, 700)]
    sync()
    del big, small, mid


def rel_err(out: torch.Tensor, ref: torch.Tensor, a: torch.Tensor, W: torch.Tensor, contract: int) -> float:
    """||out - ref|| / max(||ref||, 0.5 ||a|| ||W|| / sqrt(contract)), in float64 on the CPU."""
    out = out.detach()
    assert torch.isfinite(out).all(), "non-finite output (an element the kernel did not write?)"
    out = out.double().cpu().reshape(ref.shape)
    floor = 0.5 * a.detach().double().cpu().norm().item() * W.double().norm().item() / math.sqrt(contract)
    den = max(ref.norm().item(), floor)
    assert den > 0, "degenerate test data"
    return (out - ref).norm().item() / den


def tol(dtype: torch.dtype, k: int, numel: int = 1 << 20) -> float:
    """float32: rounding in a K-long sum grows with sqrt(K). 16-bit: the result's own rounding dominates, and
    the norm of a handful of rounding errors (N * M < 16 outputs) scatters widely around its mean."""
    if dtype == torch.float32:
        return TOL[dtype] * max(1.0, math.sqrt(k / 4096))
    return TOL[dtype] * max(1.0, math.sqrt(16 / max(numel, 1)))


def layer(n, k, bits, g, store=(torch.float16, torch.float32)):
    packed, scale, zero, W = quantized(n, k, bits, g, *store)
    return packed.to(DEV), scale.to(DEV), zero.to(DEV), W


def extras(kind, lead, n, groups, rank=8):
    """(bias, A, B, mask) on the device for `kind` in none / bias / adapter / full."""
    bias = torch.randn(n, device=DEV) if kind in ("bias", "full") else None
    A = B = mask = None
    if kind in ("adapter", "full"):
        A = torch.randn(rank, groups, device=DEV) * 0.3
        B = torch.randn(n, rank, device=DEV) * 0.3
    if kind == "full":
        mask = (torch.rand(*lead, groups, device=DEV) > 0.3).float() / 0.7
    return bias, A, B, mask


def cpu(t):
    return None if t is None else t.cpu()


def check_qlinear(x, packed, scale, zero, W, bits, g, bias=None, A=None, B=None, mask=None, scaling=1.5):
    n, k = W.shape
    poison()
    y = KERNELS.qlinear(x, packed, scale, zero, bias, A, B, mask, scaling, bits=bits, group_size=g)
    sync()
    assert y.device.type == DEV and y.dtype == x.dtype and y.shape == (*x.shape[:-1], n)
    ref = reference.qlinear(x.cpu(), W, cpu(bias), cpu(A), cpu(B), cpu(mask), scaling, g)
    err, t = rel_err(y, ref, x, W, k), tol(x.dtype, k, y.numel())
    assert err <= t, f"relative error {err:.3g} (tolerance {t:.3g})"
    return y


# ---- build -------------------------------------------------------------------------------------


@needs_gpu
def test_build_exposes_the_cuda_attributes():
    assert _C.WITH_CUDA is True
    assert isinstance(_C.CUDA_GEMV_MAX_M, int) and _C.CUDA_GEMV_MAX_M >= 1
    assert qalora_ext.build_info()["cuda_kernels"] is True
    names = ("quantize_rtn", "pack", "unpack", "dequantize", "qlinear", "qlinear_int8", "qlinear_grad_input")
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"qalora::{n}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"


# ---- qlinear: every path ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("m", ROWS + tuple(pytest.param(m, marks=pytest.mark.slow) for m in ROWS_FULL
                                           if m not in ROWS))
def test_qlinear_every_path(dtype, bits, group_size, m):
    n, k = 200, 640 if group_size == 128 else 576
    packed, scale, zero, W = layer(n, k, bits, group_size)
    x = torch.randn(m, k, device=DEV).to(dtype)
    kind = EXTRAS.get(m, ("full", "bias", "adapter", "none")[m % 4])
    bias, A, B, mask = extras(kind, (m,), n, k // group_size)
    check_qlinear(x, packed, scale, zero, W, bits, group_size, bias, A, B, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", AWKWARD, ids=lambda s: "x".join(map(str, s)))
def test_awkward_shapes_and_split_k(dtype, bits, shape):
    n, k, g = shape
    packed, scale, zero, W = layer(n, k, bits, g)
    # M = 1 and 6 (GEMV, leading dims) and 33 (cuBLAS); plain, with adapter + mask, with bias.
    for lead, kind in (((1,), "none"), ((2, 3), "full"), ((3, 11), "bias"), ((1, 1, 2), "adapter")):
        x = torch.randn(*lead, k, device=DEV).to(dtype)
        bias, A, B, mask = extras(kind, lead, n, k // g, rank=4)
        check_qlinear(x, packed, scale, zero, W, bits, g, bias, A, B, mask)


@pytest.fixture
def path_limits():
    """Set the CUDA path limits for one test (restored after it): path_limits(gemv_max_m, mma_max_m)."""
    saved = KERNELS.limits()
    yield KERNELS.set_limits
    KERNELS.set_limits(saved["gemv_max_m"], saved["mma_max_m"], saved["grad_mma_max_m"])


# M for the tensor-core kernel: a partly live m16 tile (1, 9, 17), whole tiles (16, 64), one row into a second
# 64-row block (65) and three blocks (130).
MMA_ROWS = (1, 9, 16, 17, 64, 65, 130)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_tensor_core_path_at_every_m(dtype, bits, group_size, path_limits):
    """The mma.sync kernel forced at every M of MMA_ROWS: N = 200 (the last 64-channel block partly live), K
    ending inside a 4-chunk stage (576 = 4.5 stages, 640 = 5); then a long K with few channels, where it splits
    K over groups (two-pass reduction)."""
    path_limits(0, 1 << 20)
    n, k = 200, 640 if group_size == 128 else 576
    packed, scale, zero, W = layer(n, k, bits, group_size)
    for i, m in enumerate(MMA_ROWS):
        x = torch.randn(m, k, device=DEV).to(dtype)
        bias, A, B, mask = extras(("full", "none", "adapter", "bias")[i % 4], (m,), n, k // group_size)
        check_qlinear(x, packed, scale, zero, W, bits, group_size, bias, A, B, mask)
    packed, scale, zero, W = layer(70, 8192, bits, group_size)  # 2 blocks of channels: split-K
    for m, kind in ((16, "full"), (100, "none")):
        x = torch.randn(m, 8192, device=DEV).to(dtype)
        bias, A, B, mask = extras(kind, (m,), 70, 8192 // group_size)
        check_qlinear(x, packed, scale, zero, W, bits, group_size, bias, A, B, mask)


def test_path_limits_choose_the_kernel_and_are_checked(path_limits):
    """Defaults: GEMV to _C.CUDA_GEMV_MAX_M, tensor cores to 128, cuBLAS above. Every path gives the same
    answer within its rounding, and float32 x never takes the tensor-core path (it has no float32 MMA)."""
    assert KERNELS.limits() == {"gemv_max_m": GEMV, "mma_max_m": 128, "grad_mma_max_m": 256}
    n, k, g = 96, 512, 64
    packed, scale, zero, W = layer(n, k, 4, g)
    x = torch.randn(12, k, device=DEV, dtype=torch.float16)
    outs = []
    for lim in ((0, 0), (0, 64), (GEMV, GEMV)):
        path_limits(*lim)
        outs.append(check_qlinear(x[:GEMV] if lim[0] else x, packed, scale, zero, W, 4, g))
    # The cuBLAS path rounds W~ to float16 first (SPEC allows it), the tensor-core kernel does not: outputs of
    # size ~1 differ by about sqrt(K) * |x| * |W~| * 2^-12 (~4e-3 here).
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-3, atol=1e-2)
    path_limits(0, 64)
    check_qlinear(x.float(), packed, scale, zero, W, 4, g)  # float32: dequantize + cuBLAS
    with pytest.raises(ValueError, match="gemv_max_m"):
        KERNELS.set_limits(GEMV + 1, 128)
    with pytest.raises(ValueError, match="mma_max_m"):
        KERNELS.set_limits(1, -1)
    with pytest.raises(ValueError, match="grad_mma_max_m"):
        KERNELS.set_limits(1, 1, -1)
    path_limits(1, 2)  # grad_mma_max_m not given: unchanged
    assert KERNELS.limits()["grad_mma_max_m"] == 256


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("store", STORES, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_scale_and_zero_storage_dtypes(bits, store, dtype):
    n, k, g = 96, 512, 64
    packed, scale, zero, W = layer(n, k, bits, g, store)
    for m in (1, GEMV, 64, 200):  # GEMV, tensor cores, dequantize + cuBLAS
        x = torch.randn(m, k, device=DEV).to(dtype)
        bias, A, B, mask = extras("full", (m,), n, k // g)
        check_qlinear(x, packed, scale, zero, W, bits, g, bias, A, B, mask)


def test_empty_non_contiguous_and_misaligned_input():
    n, k, g = 48, 256, 32
    packed, scale, zero, W = layer(n, k, 3, g)
    A, B = torch.randn(4, k // g, device=DEV), torch.randn(n, 4, device=DEV)
    # Empty batch.
    y0 = KERNELS.qlinear(torch.randn(0, k, device=DEV, dtype=torch.float16), packed, scale, zero, None, A, B,
                     bits=3, group_size=g)
    assert y0.shape == (0, n) and y0.device.type == DEV
    assert KERNELS.qlinear_grad_input(torch.randn(4, 0, n, device=DEV), packed, scale, zero, bits=3,
                                  group_size=g).shape == (4, 0, k)
    for m in (1, 5, GEMV + 3):
        for dtype in (torch.float16, torch.float32):
            # Transposed (non-contiguous) input.
            xt = torch.randn(k, m, device=DEV).to(dtype).t()
            assert not xt.is_contiguous() or m == 1
            check_qlinear(xt, packed, scale, zero, W, 3, g, None, A, B)
            # Contiguous but not 16-byte aligned (one element into a buffer): the GEMV's vector loads.
            buf = torch.randn(m * k + 1, device=DEV).to(dtype)
            xm = buf[1:].view(m, k)
            assert xm.data_ptr() % 16 != 0
            check_qlinear(xm, packed, scale, zero, W, 3, g, None, A, B)
    # Packed codes whose base is not on a 16-byte boundary (a view one word into a buffer): the kernels'
    # 16-byte code loads get an aligned copy.
    pbuf = torch.zeros(packed.numel() + 1, dtype=torch.int32, device=DEV)
    p_off = pbuf[1:].view(packed.shape)
    p_off.copy_(packed)
    assert p_off.data_ptr() % 16 != 0
    for m in (1, 12, 100):
        xx = torch.randn(m, k, device=DEV, dtype=torch.float16)
        assert torch.equal(KERNELS.qlinear(xx, p_off, scale, zero, bits=3, group_size=g),
                           KERNELS.qlinear(xx, packed, scale, zero, bits=3, group_size=g))
        gyy = torch.randn(m, n, device=DEV, dtype=torch.float16)
        assert torch.equal(KERNELS.qlinear_grad_input(gyy, p_off, scale, zero, bits=3, group_size=g),
                           KERNELS.qlinear_grad_input(gyy, packed, scale, zero, bits=3, group_size=g))
    # Non-contiguous scales and zeros.
    s_nc, z_nc = scale.t().contiguous().t(), zero.t().contiguous().t()
    assert not s_nc.is_contiguous()
    x = torch.randn(3, k, device=DEV, dtype=torch.float16)
    for xx in (x, torch.randn(70, k, device=DEV, dtype=torch.float16)):
        assert torch.equal(KERNELS.qlinear(xx, packed, s_nc, z_nc, bits=3, group_size=g),
                           KERNELS.qlinear(xx, packed, scale, zero, bits=3, group_size=g))


@pytest.mark.parametrize("m", sorted({1, 3, GEMV, 64, 200}))
def test_deterministic(m):
    big = (1024, 4096) if not EMULATED else (136, 1024)  # emulated: every path and split, smaller
    cases = [(layer(3, 16384, 4, 32), torch.bfloat16, 4, 32),  # few rows: split-K GEMV at small M
             (layer(*big, 3, 64), torch.float16, 3, 64),
             (layer(64, 8192 if not EMULATED else 2048, 2, 128), torch.float32, 2, 128)]
    for (packed, scale, zero, W), dtype, bits, g in cases:
        n, k = W.shape
        x = torch.randn(m, k, device=DEV).to(dtype)
        bias, A, B, mask = extras("full", (m,), n, k // g)
        outs = []
        for _ in range(3):
            poison()
            outs.append(KERNELS.qlinear(x, packed, scale, zero, bias, A, B, mask, 0.7, bits=bits, group_size=g))
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
        gy = torch.randn(m, n, device=DEV).to(dtype)
        g1 = KERNELS.qlinear_grad_input(gy, packed, scale, zero, A, B, mask, 0.7, bits=bits, group_size=g)
        poison()
        g2 = KERNELS.qlinear_grad_input(gy, packed, scale, zero, A, B, mask, 0.7, bits=bits, group_size=g)
        assert torch.equal(g1, g2)


@needs_gpu
@pytest.mark.parametrize("m", (1, 64))
def test_cuda_graph_capture_replays_the_eager_result(m):
    """The op captures into a CUDA graph (no host sync, no allocation outside the graph pool):
    bench/bench_gpu.py times it so, and inference servers run it so."""
    packed, scale, zero, W = layer(5, 8192, 4, 32)  # split-K at small M
    bias, A, B, _ = extras("adapter", (m,), 5, 8192 // 32)
    x = torch.randn(m, 8192, device=DEV, dtype=torch.float16)

    def run():
        return KERNELS.qlinear(x, packed, scale, zero, bias, A, B, None, 1.0, bits=4, group_size=32)

    eager = run()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run()
    x.copy_(torch.randn_like(x))
    g.replay()
    sync()
    again = run()
    if m <= GEMV:
        assert torch.equal(out, again)  # our GEMV: deterministic, whether replayed or launched
    else:
        torch.testing.assert_close(out, again, rtol=2e-3, atol=2e-3)  # cuBLAS may pick another algorithm
    assert not torch.equal(out, eager)


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    packed, scale, zero, W = quantized(40, 256, 4, 32)
    dev = torch.device("cuda:1")
    x = torch.randn(3, 256, device=dev, dtype=torch.float16)
    y = KERNELS.qlinear(x, packed.to(dev), scale.to(dev), zero.to(dev), bits=4, group_size=32)
    assert y.device == dev
    assert rel_err(y, reference.qlinear(x.cpu(), W), x, W, 256) <= tol(torch.float16, 256, y.numel())


# ---- the format ops: bit-identical to the CPU ----------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("store", STORES, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("shape", [(96, 256, 64), (7, 96, 32), (33, 384, 128)], ids=lambda s: "x".join(map(str, s)))
def test_format_ops_equal_the_cpu_bit_for_bit(bits, store, shape):
    n, k, g = shape
    w = torch.randn(n, k) * 0.05 * (1 + 3 * torch.rand(n, 1))
    w[0, :g] = 0.25  # a constant group: scale 0, codes 0
    cpu_q = ops.quantize_rtn(w, bits, g, *store)
    poison()
    gpu_q = KERNELS.quantize_rtn(w.to(DEV), bits, g, *store)
    for name, a, b in zip(("packed", "scale", "zero"), cpu_q, gpu_q):
        assert b.device.type == DEV and b.dtype == a.dtype and b.shape == a.shape, name
        assert torch.equal(a, b.cpu()), f"quantize_rtn: {name} differs from the CPU's"
    codes = ops.unpack(cpu_q[0], bits, k)
    poison()
    assert torch.equal(KERNELS.unpack(gpu_q[0], bits, k).cpu(), codes)
    poison()
    assert torch.equal(KERNELS.pack(codes.to(DEV), bits).cpu(), cpu_q[0])
    # Random codes (every value, padding words zero).
    rnd = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    poison()
    p_gpu = KERNELS.pack(rnd.to(DEV), bits)
    assert torch.equal(p_gpu.cpu(), ops.pack(rnd, bits))
    assert torch.equal(KERNELS.unpack(p_gpu, bits, k).cpu(), rnd)
    # dequantize: W~ = scale * q + zero in float32.
    poison()
    d_gpu = KERNELS.dequantize(*gpu_q, bits, g).cpu()
    d_cpu = ops.dequantize(*cpu_q, bits, g)
    assert d_gpu.dtype == torch.float32 and torch.isfinite(d_gpu).all()
    if store[0] != torch.float32:
        # A 16-bit scale times a code is exact in float32, so fused or not, both round once: equal.
        assert torch.equal(d_gpu, d_cpu)
    else:
        # A float32 scale times a code may round; a fused multiply-add on one side only moves the result
        # by about that rounding (a few ulps of |scale| * qmax + |zero|).
        s, z = cpu_q[1].double(), cpu_q[2].double()
        bound = (2.0**-22 * (s.abs() * (2**bits - 1) + z.abs())).repeat_interleave(g, 1)
        assert ((d_gpu.double() - d_cpu.double()).abs() <= bound).all()


# ---- backward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("lead", [(1,), (2, 5), (40,)], ids=str)
def test_grad_input(dtype, bits, lead):
    n, k, g = 160, 384, 32
    packed, scale, zero, W = layer(n, k, bits, g)
    _, A, B, mask = extras("full" if len(lead) == 2 else "adapter", lead, n, k // g, rank=4)
    gy = torch.randn(*lead, n, device=DEV).to(dtype)
    poison()
    gx = KERNELS.qlinear_grad_input(gy, packed, scale, zero, A, B, mask, 2.0, bits=bits, group_size=g)
    assert gx.dtype == dtype and gx.shape == (*lead, k) and gx.device.type == DEV
    ref = reference.qlinear_grad_input(gy.cpu(), W, A.cpu(), B.cpu(), cpu(mask), 2.0, g)
    assert rel_err(gx, ref, gy, W, n) <= tol(dtype, n, gx.numel())
    # Without the adapter.
    gx0 = KERNELS.qlinear_grad_input(gy, packed, scale, zero, bits=bits, group_size=g)
    assert rel_err(gx0, reference.qlinear_grad_input(gy.cpu(), W), gy, W, n) <= tol(dtype, n, gx.numel())


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_grad_input_tensor_core_path(dtype, bits, group_size, path_limits):
    """qlinear_grad_input's tensor-core kernel from the packed codes, forced on (and off, for the same data): M
    from 1 to 130, N = 200 (ends inside a 32-row stage), K = 608 / 640 (ends inside a 64-channel block), with the
    adapter term in the epilogue (K = 576 for G = 64: K must be whole groups); N % 8 != 0 falls back to dequantize + cuBLAS."""
    n, k = 200, {32: 608, 64: 576, 128: 640}[group_size]
    packed, scale, zero, W = layer(n, k, bits, group_size)
    for lim in (1 << 20, 0):
        path_limits(GEMV, 128, lim)
        for i, m in enumerate((1, 9, 64, 130)):
            _, A, B, mask = extras(("full", "none", "adapter", "full")[i], (m,), n, k // group_size, rank=4)
            gy = torch.randn(m, n, device=DEV).to(dtype)
            poison()
            gx = KERNELS.qlinear_grad_input(gy, packed, scale, zero, A, B, mask, 1.5, bits=bits, group_size=group_size)
            ref = reference.qlinear_grad_input(gy.cpu(), W, cpu(A), cpu(B), cpu(mask), 1.5, group_size)
            assert gx.dtype == dtype and gx.shape == (m, k)
            assert rel_err(gx, ref, gy, W, n) <= tol(dtype, n, gx.numel()), (lim, m)
    path_limits(GEMV, 128, 1 << 20)
    packed, scale, zero, W = layer(30, 256, bits, 32)  # N % 8 != 0
    gy = torch.randn(7, 30, device=DEV).to(dtype)
    gx = KERNELS.qlinear_grad_input(gy, packed, scale, zero, bits=bits, group_size=32)
    assert rel_err(gx, reference.qlinear_grad_input(gy.cpu(), W), gy, W, 30) <= tol(dtype, 30, gx.numel())


@needs_gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("lead", [(1,), (2, 3), (20,)], ids=str)
@pytest.mark.parametrize("with_mask", (False, True))
def test_autograd_through_the_op(dtype, lead, with_mask):
    n, k, g = 80, 256, 32
    packed, scale, zero, W = layer(n, k, 4, g)
    x0 = torch.randn(*lead, k, device=DEV).to(dtype)
    A0, B0 = torch.randn(6, k // g, device=DEV) * 0.3, torch.randn(n, 6, device=DEV) * 0.3
    bias0 = torch.randn(n, device=DEV)
    mask = ((torch.rand(*lead, k // g, device=DEV) > 0.25).float() / 0.75) if with_mask else None
    x, A, B, bias = (t.clone().requires_grad_() for t in (x0, A0, B0, bias0))
    y = KERNELS.qlinear(x, packed, scale, zero, bias, A, B, mask, 0.5, bits=4, group_size=g)
    gy = torch.randn_like(y)  # y's dtype: the values the reference sees are exactly these
    y.backward(gy)

    xr, Ar, Br, br = (t.detach().cpu().double().requires_grad_() for t in (x0, A0, B0, bias0))
    reference.qlinear(xr, W, br, Ar, Br, cpu(mask), 0.5, g).backward(gy.cpu().double())
    assert x.grad.dtype == dtype and A.grad.dtype == B.grad.dtype == bias.grad.dtype == torch.float32
    assert rel_err(x.grad, xr.grad, gy, W, n) <= tol(dtype, n, x.numel())
    for got, want in ((A.grad, Ar.grad), (B.grad, Br.grad), (bias.grad, br.grad)):
        err = ((got.double().cpu() - want).norm() / want.norm()).item()
        assert err <= 1e-5
    gA, gB = reference.adapter_grads(x0.cpu(), gy.cpu(), A0.cpu(), B0.cpu(), cpu(mask), 0.5, g)
    assert ((A.grad.double().cpu() - gA).norm() / gA.norm()).item() <= 1e-5
    assert ((B.grad.double().cpu() - gB).norm() / gB.norm()).item() <= 1e-5


# ---- training (issue 6; `bash bench/gpu_check.sh train` runs these: -k train) ----------------------------


@needs_gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_train_step_under_bf16_autocast(bits, group_size):
    """A training-sized step of QALoRALinear under bfloat16 autocast (the forward on the cuBLAS path at 512 rows and
    on the tensor-core path at 96): grad_x from qlinear_grad_input, float32 grad_A and grad_B, against the float64
    reference at the bfloat16 inputs the kernels saw."""
    n, k = 192, 512
    lin = torch.nn.Linear(k, n, bias=True)
    mod = QALoRALinear(QuantLinear.from_linear(lin, bits=bits, group_size=group_size), rank=16, alpha=32,
                       dropout=0.0).cuda()
    torch.nn.init.normal_(mod.lora_B, std=0.05)
    W = mod.base.dequantize().double().cpu()
    for m in (96, 512):
        mod.zero_grad()
        x = torch.randn(4, m // 4, k, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = mod(x)
        assert y.dtype == torch.bfloat16
        gy = torch.randn_like(y)
        y.backward(gy)
        assert mod.lora_A.grad.dtype == mod.lora_B.grad.dtype == torch.float32
        xr = x.detach().cpu().double().requires_grad_()
        Ar = mod.lora_A.detach().cpu().double().requires_grad_()
        Br = mod.lora_B.detach().cpu().double().requires_grad_()
        ref = reference.qlinear(xr, W, mod.base.bias.cpu().double(), Ar, Br, None, mod.scaling, group_size)
        ref.backward(gy.cpu().double())
        assert rel_err(y, ref.detach(), x, W, k) <= tol(torch.bfloat16, k, y.numel())
        assert rel_err(x.grad, xr.grad, gy, W, n) <= tol(torch.bfloat16, n, x.numel())
        for got, want in ((mod.lora_A.grad, Ar.grad), (mod.lora_B.grad, Br.grad)):
            assert ((got.double().cpu() - want).norm() / want.norm()).item() <= 1e-4


@needs_gpu
def test_train_finetune_cli_on_cuda(tmp_path):
    """`qalora finetune --device cuda` (bf16 autocast by default) with gradient checkpointing on the tiny Llama:
    the loss is finite, the adapters train, and the saved model loads on the CPU."""
    from pydoc_data.topics import topics

    from qalora_ext import cli
    from tiny_llm import save_tiny_llama

    tiny = save_tiny_llama(tmp_path / "llama")
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(topics[t] for t in sorted(topics)[40:50]))
    out = tmp_path / "ft"
    assert cli.main(["finetune", "--model", str(tiny), "--bits", "3", "--data", str(text), "--steps", "4",
                     "--batch-size", "2", "--seq-len", "64", "--rank", "8", "--lr", "1e-2", "--device", "cuda",
                     "--gradient-checkpointing", "--out", str(out)]) == 0
    trained = qalora_ext.load_quantized(out)
    adapters = [m for m in trained.modules() if isinstance(m, QALoRALinear)]
    assert adapters and all(m.lora_A.device.type == "cpu" for m in adapters)
    assert any(m.lora_B.abs().sum() > 0 for m in adapters)
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    assert all(math.isfinite(v) for v in state["losses"])


@needs_gpu
def test_autograd_through_the_adapter_layer():
    lin = torch.nn.Linear(256, 96)
    mod = QALoRALinear(QuantLinear.from_linear(lin, bits=3, group_size=32), rank=8, alpha=4).cuda()
    assert mod.base.packed.is_cuda and mod.lora_A.is_cuda
    torch.nn.init.normal_(mod.lora_B, std=0.1)
    for m in (2, 40):  # GEMV and cuBLAS forward
        mod.zero_grad()
        x = torch.randn(m, 256, device=DEV, requires_grad=True)
        y = mod(x)
        gy = torch.randn_like(y)
        loss = (y * gy).sum()
        loss.backward()
        base = mod.base
        W = reference.dequantize(reference.unpack(base.packed.cpu(), 3, 256), base.scale.cpu(), base.zero.cpu(), 32)
        A, B = mod.lora_A.detach().cpu(), mod.lora_B.detach().cpu()
        gA, gB = reference.adapter_grads(x.detach().cpu(), gy.cpu(), A, B, None, mod.scaling, 32)
        assert ((mod.lora_A.grad.double().cpu() - gA).norm() / gA.norm()).item() <= 1e-5
        assert ((mod.lora_B.grad.double().cpu() - gB).norm() / gB.norm()).item() <= 1e-5
        gx = reference.qlinear_grad_input(gy.cpu(), W, A, B, None, mod.scaling, 32)
        assert rel_err(x.grad, gx, gy, W, 96) <= 1e-5
        ref_y = reference.qlinear(x.detach().cpu(), W, base.bias.cpu(), A, B, None, mod.scaling, 32)
        assert rel_err(y, ref_y, x, W, 256) <= 1e-5


@needs_gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("bits,group_size", [(3, 32), (4, 128), (2, 64)])
def test_dscale_dzero_gradients_on_cuda(dtype, bits, group_size):
    """Trained scales and zeros (SPEC "Trainable quantization parameters") on CUDA: grad dscale =
    sum_{k in g} q (gy^T x), grad dzero = gy^T xsum (float32, every forward path by M) against
    reference.quant_param_grads in float64 at the inputs the kernels saw; the output and grad_x against the
    float64 layer with scale + dscale, zero + dzero."""
    n, k = 96, 256
    lin = torch.nn.Linear(k, n)
    mod = QALoRALinear(QuantLinear.from_linear(lin, bits=bits, group_size=group_size), rank=4, alpha=8,
                       train_scale=True, train_zero=True).cuda()
    with torch.no_grad():
        mod.lora_B.normal_(0, 0.05)
        mod.dscale.normal_(0, 1e-3)
        mod.dzero.normal_(0, 1e-3)
    assert mod.dscale.is_cuda and mod.dscale.dtype == torch.float32
    codes = mod.base.codes().cpu()
    scale = mod.base.scale.cpu().double() + mod.dscale.detach().cpu().double()
    zero = mod.base.zero.cpu().double() + mod.dzero.detach().cpu().double()
    W = reference.dequantize(codes, scale, zero, group_size)
    for m in (2, 40, 300):  # GEMV, tensor-core (16-bit x) and cuBLAS forwards
        mod.zero_grad()
        x = torch.randn(m, k, device=DEV).to(dtype).requires_grad_()
        y = mod(x)
        gy = torch.randn_like(y)
        y.backward(gy)
        assert mod.dscale.grad.dtype == mod.dzero.grad.dtype == torch.float32
        assert mod.dscale.grad.is_cuda and mod.dzero.grad.is_cuda
        gs, gz = reference.quant_param_grads(x.detach().cpu(), gy.cpu(), codes, group_size)
        for got, want in ((mod.dscale.grad, gs), (mod.dzero.grad, gz)):
            err = ((got.double().cpu() - want).norm() / want.norm()).item()
            assert err <= 1e-5, (m, err)
        A, B = mod.lora_A.detach().cpu(), mod.lora_B.detach().cpu()
        ref_y = reference.qlinear(x.detach().cpu(), W, mod.base.bias.cpu(), A, B, None, mod.scaling, group_size)
        assert rel_err(y, ref_y, x, W, k) <= tol(dtype, k, y.numel())
        gx = reference.qlinear_grad_input(gy.cpu(), W, A, B, None, mod.scaling, group_size)
        assert rel_err(x.grad, gx, gy, W, n) <= tol(dtype, n, x.numel())


@needs_gpu
def test_int8_activations_flag_keeps_the_float_kernels_on_cuda():
    lin = torch.nn.Linear(128, 64)
    q = QuantLinear.from_linear(lin, bits=4, group_size=32).cuda()
    x = torch.randn(3, 128, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        plain = q(x)
        q.int8_activations = True
        assert torch.equal(q(x), plain)


@needs_gpu
def test_opcheck_on_cuda():
    packed, scale, zero, _ = layer(64, 128, 3, 32)
    A, B = torch.randn(4, 4, device=DEV), torch.randn(64, 4, device=DEV)
    mask = (torch.rand(3, 4, device=DEV) > 0.5).float() * 2
    x = torch.randn(3, 128, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.qalora.qlinear.default,
                          (x, packed, scale, zero, torch.randn(64, device=DEV), A.clone().requires_grad_(),
                           B.clone().requires_grad_(), mask, 0.5, 3, 32, 1))
    torch.library.opcheck(torch.ops.qalora.qlinear_grad_input.default,
                          (torch.randn(3, 64, device=DEV), packed, scale, zero, A, B, mask, 0.5, 3, 32, 1))


# ---- errors and switches -------------------------------------------------------------------------


@needs_gpu
def test_bad_input_names_the_problem():
    packed, scale, zero, _ = layer(16, 64, 4, 32)
    x = torch.randn(2, 64, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match="device|on cpu"):
        KERNELS.qlinear(x, packed.cpu(), scale, zero, bits=4, group_size=32)
    with pytest.raises(ValueError, match="device|on cpu"):
        KERNELS.qlinear(x, packed, scale, zero, torch.randn(16), bits=4, group_size=32)
    with pytest.raises(ValueError, match="device|on cpu"):
        KERNELS.qlinear_grad_input(torch.randn(2, 16, device=DEV), packed, scale.cpu(), zero, bits=4, group_size=32)
    with pytest.raises(ValueError, match="device"):  # the raw op (no Python wrapper) checks too
        torch.ops.qalora.qlinear(x, packed.cpu(), scale.cpu(), zero.cpu(), None, None, None, None, 1.0, 4, 32, 1)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        KERNELS.qlinear(x.double(), packed, scale, zero, bits=4, group_size=32)
    with pytest.raises(ValueError, match="last dimension 64"):
        KERNELS.qlinear(torch.randn(2, 65, device=DEV), packed, scale, zero, bits=4, group_size=32)
    with pytest.raises(ValueError, match="CPU"):
        ops.qlinear_int8(x, packed, scale, zero, bits=4, group_size=32)
    with pytest.raises(ValueError, match="CPU"):
        torch.ops.qalora.qlinear_int8(x, packed, scale, zero, None, None, None, None, 1.0, 4, 32, 1)


@needs_gpu
def test_nvtx_switch():
    packed, scale, zero, _ = layer(16, 64, 4, 32)
    x = torch.randn(2, 64, device=DEV, dtype=torch.float16)
    enabled = getattr(_C, "nvtx_enabled", None)
    before = enabled() if enabled else True
    try:
        _C.set_nvtx(False)
        if enabled:
            assert enabled() is False
        y_off = KERNELS.qlinear(x, packed, scale, zero, bits=4, group_size=32)
        _C.set_nvtx(True)
        if enabled:
            assert enabled() is True
        assert torch.equal(KERNELS.qlinear(x, packed, scale, zero, bits=4, group_size=32), y_off)
    finally:
        _C.set_nvtx(before)


@needs_gpu
@pytest.mark.skipif(not hasattr(_C, "nvtx_enabled"), reason="no _C.nvtx_enabled to read the switch")
def test_nvtx_environment_variable():
    code = "import qalora_ext; print(qalora_ext._C.nvtx_enabled())"
    env = dict(os.environ, QALORA_NVTX="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


# ---- compute-sanitizer --------------------------------------------------------------------------


def test_sanitizer_small():
    """One small case through each path: GEMV, split-K GEMV, the tensor-core kernel (plain and split-K),
    dequantize + cuBLAS, grad_input (tensor cores where N % 8 == 0, else cuBLAS), and the format ops, every bit
    width. bench/gpu_check.sh runs it under `compute-sanitizer --tool memcheck` (with the
    caching allocator off, so an access past any tensor is caught)."""
    for bits in BITS:
        for n, k, m, g in ((40, 96, 1, 32), (3, 16384, 2, 32), (40, 192, GEMV + 4, 64), (9, 256, GEMV, 128),
                           (5, 4096, 20, 32), (33, 256, 130, 32)):
            packed, scale, zero, W = layer(n, k, bits, g)
            bias, A, B, mask = extras("full", (m,), n, k // g, rank=4)
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            y = KERNELS.qlinear(x, packed, scale, zero, bias, A, B, mask, 1.0, bits=bits, group_size=g)
            xm = torch.randn(m * k + 1, device=DEV, dtype=torch.bfloat16)[1:].view(m, k)  # misaligned
            ym = KERNELS.qlinear(xm, packed, scale, zero, bits=bits, group_size=g)
            gx = KERNELS.qlinear_grad_input(y, packed, scale, zero, A, B, mask, 1.0, bits=bits, group_size=g)
            sync()
            assert torch.isfinite(y).all() and torch.isfinite(ym).all() and torch.isfinite(gx).all()
            assert rel_err(y, reference.qlinear(x.cpu(), W, bias.cpu(), A.cpu(), B.cpu(), mask.cpu(), 1.0, g),
                           x, W, k) <= tol(torch.float16, k, y.numel())
        w = torch.randn(5, 96, device=DEV)
        packed, scale, zero = KERNELS.quantize_rtn(w, bits, 32)
        codes = KERNELS.unpack(packed, bits, 96)
        assert torch.equal(KERNELS.pack(codes, bits), packed)
        assert torch.isfinite(KERNELS.dequantize(packed, scale, zero, bits, 32)).all()


# ---- the emulation itself (issue 14) ------------------------------------------------------------

emulated_only = pytest.mark.skipif(not EMULATED, reason="tests of the CUDA emulation (QALORA_CUDA_EMULATION=1)")


@emulated_only
def test_opcheck_every_emulated_cuda_op():
    """torch.library.opcheck on every CUDA op through the emulated build (schema, fake kernel, dispatch)."""
    E = torch.ops.qalora_emu
    packed, scale, zero, _ = layer(64, 128, 3, 32)
    A, B = torch.randn(4, 4), torch.randn(64, 4)
    mask = (torch.rand(3, 4) > 0.5).float() * 2
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(3, 128).to(dtype)
        torch.library.opcheck(E.qlinear.default, (x, packed, scale, zero, torch.randn(64), A, B, mask, 0.5, 3, 32, 1))
        torch.library.opcheck(E.qlinear_grad_input.default,
                              (torch.randn(3, 64).to(dtype), packed, scale, zero, A, B, mask, 0.5, 3, 32, 1))
    w = torch.randn(16, 128)
    torch.library.opcheck(E.quantize_rtn.default, (w, 4, 32, torch.float16, torch.float32))
    codes = torch.randint(0, 8, (16, 128), dtype=torch.uint8)
    torch.library.opcheck(E.pack.default, (codes, 3))
    torch.library.opcheck(E.unpack.default, (packed, 3, 128, 1))
    torch.library.opcheck(E.dequantize.default, (packed, scale, zero, 3, 32, 1))


@emulated_only
def test_emulated_ops_are_their_own_namespace():
    """The emulated kernels never answer torch.ops.qalora (the CPU kernels do), and they take the CUDA
    kernels' activation dtypes (float16 on CPU tensors), as the CUDA binding does."""
    packed, scale, zero, W = layer(16, 64, 4, 32)
    x = torch.randn(2, 64, dtype=torch.float16)
    with pytest.raises(TypeError, match="float32 or bfloat16 on CPU"):
        torch.ops.qalora.qlinear(x, packed, scale, zero, None, None, None, None, 1.0, 4, 32, 1)
    before = torch.ops.qalora_emu.launch_count()
    torch.ops.qalora_emu.qlinear(x, packed, scale, zero, None, None, None, None, 1.0, 4, 32, 1)
    assert torch.ops.qalora_emu.launch_count() > before
    with pytest.raises(ValueError, match="CPU"):
        torch.ops.qalora_emu.qlinear_int8(x, packed, scale, zero, None, None, None, None, 1.0, 4, 32, 1)


def _barrier_lines(path):
    src = (__import__("pathlib").Path(__file__).resolve().parents[1] / "csrc" / "cuda" / path).read_text()
    return [i + 1 for i, line in enumerate(src.splitlines()) if "__syncthreads();" in line]


@emulated_only
@pytest.mark.parametrize("kernel", ("gemm_mma.cu", "grad_mma.cu"))
def test_removing_any_barrier_fails_the_tests(kernel, path_limits):
    """Every __syncthreads() of the tensor-core kernels, removed one at a time (the emulation's skip_barrier
    option), makes the tensor-core cases fail: the adversarial thread order reads data no thread has written
    yet (poison, NaN) or data of the wrong stage. With all barriers in place the same cases pass."""
    lines = _barrier_lines(kernel)
    assert len(lines) >= 2
    n, k, g = 72, 640, 64
    packed, scale, zero, W = layer(n, k, 4, g)
    path_limits(0, 1 << 20, 1 << 20)

    def run_case():
        x = torch.randn(40, k, dtype=torch.float16)
        gy = torch.randn(40, n, dtype=torch.float16)
        if kernel == "gemm_mma.cu":
            out = KERNELS.qlinear(x, packed, scale, zero, bits=4, group_size=g)
            ref, a, c = reference.qlinear(x, W), x, k
        else:
            out = KERNELS.qlinear_grad_input(gy, packed, scale, zero, bits=4, group_size=g)
            ref, a, c = reference.qlinear_grad_input(gy, W), gy, n
        return torch.isfinite(out).all() and rel_err(out, ref, a, W, c) <= tol(torch.float16, c, out.numel())

    assert run_case()
    try:
        for line in lines:
            cuda_emulation.set_option("skip_barrier", f"csrc/cuda/{kernel}:{line}")
            ok = False
            try:
                ok = bool(run_case())
            except (AssertionError, RuntimeError):
                ok = False
            assert not ok, f"removing the barrier at {kernel}:{line} went unnoticed"
    finally:
        cuda_emulation.set_option("skip_barrier", "")
    assert run_case()


@emulated_only
@pytest.mark.parametrize("order", ("forward", "reverse", "shuffle"))
def test_every_thread_order_gives_the_same_bits(order, path_limits):
    """The kernels are race-free: any order of the threads between barriers gives bitwise the same result."""
    packed, scale, zero, W = layer(72, 640, 3, 128)
    x = torch.randn(20, 640, dtype=torch.bfloat16)
    gy = torch.randn(20, 72, dtype=torch.bfloat16)
    path_limits(0, 1 << 20, 1 << 20)
    base = KERNELS.qlinear(x, packed, scale, zero, bits=3, group_size=128)
    gbase = KERNELS.qlinear_grad_input(gy, packed, scale, zero, bits=3, group_size=128)
    try:
        cuda_emulation.set_option("order", order)
        cuda_emulation.set_option("seed", 7)
        assert torch.equal(KERNELS.qlinear(x, packed, scale, zero, bits=3, group_size=128), base)
        assert torch.equal(KERNELS.qlinear_grad_input(gy, packed, scale, zero, bits=3, group_size=128), gbase)
    finally:
        cuda_emulation.set_option("order", "adversarial")
        cuda_emulation.set_option("seed", 1)


@emulated_only
def test_emulation_selftest_driver():
    """The torch-free driver: the emulation layer's own tests (mma fragments against the PTX layout formulas,
    shuffle masks, cp.async groups, barriers, poison) and every kernel against a scalar reference."""
    exe = __import__("pathlib").Path(cuda_emulation.load()).parent / "csrc" / "emulation" / "qalora_emu_selftest"
    if not exe.is_file():
        pytest.skip(f"{exe} not built")
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@emulated_only
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_every_path_cpu_and_emulated_meets_one_tolerance(dtype, path_limits):
    """One epilogue (qalora/epilogue.h: bias, then adapter, rounded once) on every path: the CPU kernels (small
    and large M) and every emulated CUDA path (GEMV, split-K GEMV, tensor cores, dequantize + GEMM) agree with the
    float64 reference within the same tolerance, with bias and adapter."""
    n, k, g = 72, 512, 64
    packed, scale, zero, W = layer(n, k, 4, g)
    for m in (4, 80):
        x = torch.randn(m, k).to(dtype)
        bias, A, B, mask = extras("full", (m,), n, k // g)
        ref = reference.qlinear(x, W, bias, A, B, mask, 1.5, g)
        t = tol(dtype, k, m * n)
        y_cpu = ops.qlinear(x, packed, scale, zero, bias, A, B, mask, 1.5, bits=4, group_size=g)
        assert rel_err(y_cpu, ref, x, W, k) <= t, "CPU"
        limits = [(GEMV, 0), (0, 1 << 20), (0, 0)] if dtype != torch.float32 else [(GEMV, 0), (0, 0)]
        for lim in limits:
            path_limits(*lim)
            if m > lim[0] and lim == (GEMV, 0) and m > GEMV:
                continue  # M above the GEMV's reach: the (0, 0) case covers dequantize + GEMM
            y = KERNELS.qlinear(x, packed, scale, zero, bias, A, B, mask, 1.5, bits=4, group_size=g)
            assert rel_err(y, ref, x, W, k) <= t, lim

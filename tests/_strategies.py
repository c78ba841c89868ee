"""Hypothesis strategies and helpers for tests/test_properties.py.

Every tensor is made from a hypothesis-drawn seed (``torch.Generator``), so a
failing example replays from hypothesis' own report. The oracle is always
``qalora_ext.reference`` in float64, never a kernel.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from qalora_ext import _C, reference

# ---------------------------------------------------------------------------
# Profiles: QALORA_HYPOTHESIS=full -> 1000 examples per property; default small
# ---------------------------------------------------------------------------

PROFILE = os.environ.get("QALORA_HYPOTHESIS", "default")
if PROFILE not in ("default", "full"):
    raise ValueError(f"QALORA_HYPOTHESIS must be 'default' or 'full'; got {PROFILE!r}")
MAX_EXAMPLES = {"default": 25, "full": 1000}[PROFILE]
# One seed for the whole run (random unless given), printed by every test so a
# failure replays with QALORA_HYPOTHESIS_SEED=<seed>.
SEED = int(os.environ.get("QALORA_HYPOTHESIS_SEED", random.SystemRandom().randrange(2**32)))

SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the tree (others share it)
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)

BITS = (2, 3, 4)
GROUPS = (32, 64, 128)
T = _C.SMALL_M_THRESHOLD  # 64: packed kernels below, dequantize + BLAS at and above
TG = _C.SMALL_M_THRESHOLD_GRAD  # 10: the same for grad_input
GEMV = _C.GEMV_MAX_M  # 4: decode kernels up to here
BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8-bit significand)
F32_TOL = 2e-5  # float32 accumulation, relative to the sum of |terms| (K <= 512 here)


def available_isas() -> list[str]:
    out = []
    for isa in _C.compiled_cpu_isas().split(","):
        try:
            _C.set_cpu_isa(isa)
            out.append(isa)
        except ValueError:
            pass
        finally:
            _C.set_cpu_isa("auto")
    return out + ["auto"]


ISAS = available_isas()


@contextlib.contextmanager
def cpu_isa(name: str):
    _C.set_cpu_isa(name)
    try:
        yield
    finally:
        _C.set_cpu_isa("auto")


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

seeds = st.integers(0, 2**63 - 1)
bits_st = st.sampled_from(BITS)
groups_st = st.sampled_from(GROUPS)
isa_st = st.sampled_from(ISAS)
store_dtype_st = st.sampled_from((torch.float16, torch.bfloat16, torch.float32))
act_dtype_st = st.sampled_from((torch.float32, torch.bfloat16))
# Rows on both sides of every CPU path threshold: decode (<= 4), packed rows
# (< 64; grad_input < 10), dequantize + BLAS (>= 64), up to ~130.
rows_st = st.one_of(st.integers(1, GEMV + 1), st.integers(TG - 1, TG + 1), st.integers(T - 4, T + 6),
                    st.integers(T + 7, 130))
# Odd sizes too (kernels take 16-row blocks and tails).
out_features_st = st.integers(1, 97)
groups_count_st = st.integers(1, 4)
X_LAYOUTS = ("contiguous", "transposed", "sliced_cols", "sliced_rows", "split_lead", "expanded_lead")
x_layout_st = st.sampled_from(X_LAYOUTS)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def rand(g, *shape):
    return torch.rand(*shape, generator=g)


def divisors(m: int) -> list[int]:
    return [d for d in range(1, m + 1) if m % d == 0]


def activation(g, m: int, k: int, layout: str, split: int, dtype) -> torch.Tensor:
    """An (..., k) activation with m rows in all, laid out as ``layout``.

    ``split`` divides m (the first leading dim of a 2-level shape). The values
    are fresh normal numbers; the view is often non-contiguous.
    """
    if layout == "contiguous":
        return randn(g, m, k, dtype=dtype)
    if layout == "transposed":  # column-major (m, k): stride (1, m)
        return randn(g, k, m, dtype=dtype).t()
    if layout == "sliced_cols":  # every 2nd column of a wider tensor
        return randn(g, m, 2 * k, dtype=dtype)[:, 1::2]
    if layout == "sliced_rows":  # every 3rd row, and an offset
        return randn(g, 3 * m + 1, k, dtype=dtype)[1::3]
    if layout == "split_lead":  # (split, m/split, k), from a transposed buffer
        return randn(g, m // split, split, k, dtype=dtype).transpose(0, 1)
    if layout == "expanded_lead":  # (split, m/split, k) with a stride-0 leading dim
        return randn(g, 1, m // split, k, dtype=dtype).expand(split, m // split, k)
    raise AssertionError(layout)


def noncontig(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` (2-D), in another memory layout."""
    if how == "contiguous":
        return t.contiguous()
    if how == "transposed":
        return t.t().contiguous().t()
    if how == "sliced":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype) - 7  # junk in the gaps
        wide[:, ::2] = t
        return wide[:, ::2]
    raise AssertionError(how)


weight_layout_st = st.sampled_from(("contiguous", "transposed", "sliced"))


@dataclass
class Layer:
    bits: int
    group_size: int
    n: int
    k: int
    codes: torch.Tensor  # uint8 (N, K)
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    W: torch.Tensor  # float64 reference weight
    absW: torch.Tensor  # float64 |scale| q + |zero| (the magnitude the kernels' sums see)
    extra: dict = field(default_factory=dict)


def random_layer(g, bits, group_size, n, groups, scale_dtype, zero_dtype, weight_layout="contiguous") -> Layer:
    """Random codes (both extremes present), scales and zeros like RTN's (scale ~ range/qmax, zero ~ -range/2)."""
    k = groups * group_size
    qmax = 2**bits - 1
    codes = torch.randint(0, qmax + 1, (n, k), generator=g, dtype=torch.uint8)
    codes[0, 0], codes[-1, -1] = 0, qmax
    scale = ((0.2 + rand(g, n, groups)) * 0.05 * (1 + 3 * rand(g, n, 1))).to(scale_dtype)
    zero = (-scale.float() * qmax / 2 + 0.01 * randn(g, n, groups)).to(zero_dtype)
    packed = reference.pack(codes, bits)
    W = reference.dequantize(codes, scale, zero, group_size)
    absW = (scale.double().abs().repeat_interleave(group_size, 1) * codes.double()
            + zero.double().abs().repeat_interleave(group_size, 1))
    if weight_layout != "contiguous":
        packed = noncontig(packed, weight_layout)
        scale = noncontig(scale, weight_layout)
        zero = noncontig(zero, weight_layout)
    return Layer(bits, group_size, n, k, codes, packed, scale, zero, W, absW)


def adapter(g, n, groups, rank):
    return randn(g, rank, groups) * 0.3, randn(g, n, rank) * 0.3


def pool_mask(g, lead, groups, p=0.3):
    """A dropout mask on the pooled input (1/(1-p) or 0), never all zeros."""
    mask = (rand(g, *lead, groups) > p).float() / (1 - p)
    mask.view(-1)[:1] = 1 / (1 - p)
    return mask


def assert_within(out: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    """Elementwise |out - ref| <= tol (all float64), with a readable report."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert ref.abs().sum() > 0, f"{what}: the reference is all zeros (degenerate data)"
    err = (out.double() - ref).abs()
    bad = ~(err <= tol)  # NaN counts as bad
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements out of tolerance; first at {idx}: "
                             f"got {out.double()[idx].item()!r}, reference {ref[idx].item()!r}, "
                             f"|err| {err[idx].item():.3e} > tol {tol[idx].item():.3e}")


def tolerance(ref: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The allowed error of a float32-accumulated result returned in ``dtype``.

    float32: ``F32_TOL * mag`` (mag = the sum of the absolute values of every
    term, so cancellation cannot make the bound meaningless). bfloat16 adds one
    rounding of the output (``u * |ref|``, u = 2^-8) and SPEC's allowance for a
    path that rounds W~ to bfloat16 before a 16-bit GEMM (``u * mag``).
    """
    tol = F32_TOL * mag
    if dtype == torch.bfloat16:
        tol = tol + BF16_U * (1 + 2**-7) * ref.abs() + BF16_U * mag
    return tol + 1e-30


def lead_rows(lead) -> int:
    return math.prod(lead)



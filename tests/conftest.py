"""Shared test helpers.

Every test gets fresh random data: an autouse fixture seeds torch with a new
random seed per test and prints it when the test fails; set QALORA_TEST_SEED
to replay one.
"""

from __future__ import annotations

import os
import random

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_seed(request):
    seed = int(os.environ.get("QALORA_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models gain nothing from threads,
    and spinning OpenMP workers crawl when other jobs share the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            rep.sections.append(("seed", f"QALORA_TEST_SEED={seeds[0]} reproduces this test's data"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (SPEC's error measure)."""
    ref = ref.double()
    den = ref.norm().item()
    assert den > 0, "reference is all zeros: the test data is degenerate"
    return ((out.double() - ref).norm() / den).item()


def random_weight(n: int, k: int) -> torch.Tensor:
    """A weight with uneven per-group ranges, like real layers."""
    w = torch.randn(n, k) * 0.05
    w = w * (1 + 3 * torch.rand(n, 1)) * (1 + torch.rand(1, k))
    return w


def quantized(n: int, k: int, bits: int, group_size: int, scale_dtype=torch.float16, zero_dtype=torch.float32):
    """(packed, scale, zero, float64 dequantized reference weight) for a random layer."""
    from qalora_ext import ops, reference

    w = random_weight(n, k)
    packed, scale, zero = ops.quantize_rtn(w, bits, group_size, scale_dtype, zero_dtype)
    codes = reference.unpack(packed, bits, k)
    return packed, scale, zero, reference.dequantize(codes, scale, zero, group_size)

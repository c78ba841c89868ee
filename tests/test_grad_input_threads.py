"""qlinear_grad_input on the CPU gives bitwise the same result whatever the thread count (SPEC "Precision and
determinism"), on both sides of its small-M threshold (kSmallMThresholdGrad = 10), as the forward does. Before
the fix, M = 10 and 11 differed by ~2e-7 (relative) between 1 and 2 or 8 threads: the large-M path's BLAS
split its contraction by thread count."""

from __future__ import annotations

import pytest
import torch

from qalora_ext import ops

from conftest import quantized


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("m", (1, 9, 10, 11, 16, 40, 129))
@pytest.mark.parametrize("adapter", (False, True))
def test_grad_input_is_independent_of_the_thread_count(m, adapter, restore_threads):
    n, k, g = 768, 1024, 64
    packed, scale, zero, _ = quantized(n, k, 4, g)
    gen = torch.Generator().manual_seed(m)
    gy = torch.randn(m, n, generator=gen)
    A = torch.randn(8, k // g, generator=gen) if adapter else None
    B = torch.randn(n, 8, generator=gen) if adapter else None
    outs = []
    for threads in (1, 2, 8):
        torch.set_num_threads(threads)
        outs.append(ops.qlinear_grad_input(gy, packed, scale, zero, A, B, None, 0.5, bits=4, group_size=g))
    assert torch.equal(outs[0], outs[1]), f"1 vs 2 threads: max diff {(outs[0] - outs[1]).abs().max().item():.3g}"
    assert torch.equal(outs[0], outs[2]), f"1 vs 8 threads: max diff {(outs[0] - outs[2]).abs().max().item():.3g}"


@pytest.mark.parametrize("m", (1, 10, 11, 70))
def test_forward_is_independent_of_the_thread_count(m, restore_threads):
    packed, scale, zero, _ = quantized(768, 1024, 3, 32)
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(m))
    outs = []
    for threads in (1, 2, 8):
        torch.set_num_threads(threads)
        outs.append(ops.qlinear(x, packed, scale, zero, bits=3, group_size=32))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])

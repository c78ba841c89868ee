"""QuantLinear / QALoRALinear: construction, forward, gradients, training, merge."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import qalora_ext
from qalora_ext import QALoRALinear, QuantLinear, reference

from conftest import rel_err

BITS = (2, 3, 4)


def _linear(k=256, n=96, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(1 + torch.rand(n, 1))
        if bias:
            lin.bias.normal_()
    return lin


def _randomize_adapter(layer: QALoRALinear, std=0.5):
    with torch.no_grad():
        layer.lora_B.normal_(0, std)
        layer.lora_A.normal_(0, std)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", (32, 64, 128))
def test_quantlinear_from_linear(bits, group_size):
    lin = _linear(k=384 if group_size != 64 else 576, n=72)
    q = QuantLinear.from_linear(lin, bits=bits, group_size=group_size)
    assert [n for n, _ in q.named_parameters()] == []
    assert {n for n, _ in q.named_buffers()} == {"packed", "scale", "zero", "bias"}
    assert q.scale.dtype == torch.float16 and q.zero.dtype == torch.float32
    codes, scale, zero = reference.quantize_rtn(lin.weight.detach(), bits, group_size)
    assert torch.equal(q.scale, scale) and torch.equal(q.zero, zero)
    W = q.dequantize()
    assert W.shape == (72, lin.in_features) and W.dtype == torch.float32
    ref_W = reference.dequantize(q.codes(), q.scale, q.zero, group_size)
    assert rel_err(W, ref_W) <= 1e-6
    x = torch.randn(4, 3, lin.in_features)
    assert rel_err(q(x), reference.qlinear(x, ref_W, lin.bias.detach())) <= 1e-5
    # The quantization error is what SPEC bounds: |W~ - w| <= scale/2 (+ fp error).
    half_step = q.scale.double().repeat_interleave(group_size, 1) / 2
    assert bool(((ref_W - lin.weight.double()).abs() <= half_step + 1e-6).all())


def test_quantlinear_no_bias_and_dtype_preservation():
    q = QuantLinear.from_linear(_linear(bias=False), bits=3, group_size=32, scale_dtype=torch.bfloat16)
    assert q.bias is None
    zero, scale = q.zero.clone(), q.scale.clone()
    q.half()  # moving the model to half must not re-round the format's scales/zeros
    assert q.zero.dtype == torch.float32 and torch.equal(q.zero, zero)
    assert q.scale.dtype == torch.bfloat16 and torch.equal(q.scale, scale)
    x = torch.randn(2, 256)
    assert q(x).dtype == torch.float32
    assert q(x.bfloat16()).dtype == torch.bfloat16
    assert q(x.half()).dtype == torch.float16  # not a CPU kernel dtype: computed in float32, returned as x's
    assert q(x.double()).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(x).dtype == torch.bfloat16


def test_quantlinear_errors():
    with pytest.raises(ValueError, match=r"in_features \(576\).*group_size \(128\)"):
        QuantLinear.from_linear(nn.Linear(576, 8), bits=4, group_size=128)
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        QuantLinear.from_linear(nn.Linear(64, 8), bits=8)
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="zero_dtype"):
        QuantLinear(64, 8, zero_dtype=torch.int8)
    lin = nn.Linear(64, 8)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        QuantLinear.from_linear(lin)


@pytest.mark.parametrize("bits", BITS)
def test_fresh_adapter_changes_nothing(bits):
    lin = _linear()
    q = QuantLinear.from_linear(lin, bits=bits)
    a = QALoRALinear(q, rank=8, alpha=16)
    assert {n for n, p in a.named_parameters()} == {"lora_A", "lora_B"}
    assert a.lora_A.shape == (8, 256 // 32) and a.lora_B.shape == (96, 8)
    assert a.lora_A.dtype == torch.float32 and a.lora_A.abs().sum() > 0
    assert int(a.lora_B.count_nonzero()) == 0
    for m in (1, 40):
        x = torch.randn(m, 256)
        assert torch.equal(a(x), q(x))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("use_rslora", (False, True))
def test_adapter_forward_matches_reference(bits, use_rslora):
    a = QALoRALinear.from_linear(_linear(k=576, n=200), bits=bits, group_size=64, rank=16, alpha=32,
                                 use_rslora=use_rslora)
    _randomize_adapter(a)
    assert a.scaling == (32 / math.sqrt(16) if use_rslora else 2.0)
    x = torch.randn(2, 5, 576)
    W = reference.dequantize(a.base.codes(), a.base.scale, a.base.zero, 64)
    ref = reference.qlinear(x, W, a.base.bias, a.lora_A.detach(), a.lora_B.detach(), None, a.scaling, 64)
    assert rel_err(a(x), ref) <= 1e-5


def test_dropout_acts_on_the_pooled_input():
    a = QALoRALinear.from_linear(_linear(), bits=4, rank=4, dropout=0.5)
    _randomize_adapter(a)
    x = torch.randn(64, 256)
    a.eval()
    y_eval = a(x)
    assert torch.equal(y_eval, a(x))  # no dropout in eval
    a.train()
    y1, y2 = a(x), a(x)
    assert not torch.equal(y1, y2)
    base = a.base(x)
    # The base product never sees dropout; only the adapter term changes.
    d1 = y1 - base
    assert rel_err(base + (y_eval - base), y_eval) == 0.0
    # Averaged over many masks the adapter term matches its expectation (inverted dropout).
    mean = torch.stack([a(x) - base for _ in range(300)]).mean(0)
    assert rel_err(mean, y_eval - base) < 0.15
    assert d1.abs().sum() > 0


@pytest.mark.parametrize("bits", BITS)
def test_module_gradients_match_reference(bits):
    a = QALoRALinear.from_linear(_linear(k=128, n=48), bits=bits, rank=4, alpha=8)
    _randomize_adapter(a)
    x = torch.randn(3, 7, 128, requires_grad=True)
    gy = torch.randn(3, 7, 48)
    a(x).backward(gy)
    W = reference.dequantize(a.base.codes(), a.base.scale, a.base.zero, 32)
    xr = x.detach().double().requires_grad_()
    Ar = a.lora_A.detach().double().requires_grad_()
    Br = a.lora_B.detach().double().requires_grad_()
    reference.qlinear(xr, W, a.base.bias, Ar, Br, None, a.scaling, 32).backward(gy.double())
    assert rel_err(x.grad, xr.grad) <= 1e-5
    assert rel_err(a.lora_A.grad, Ar.grad) <= 1e-5
    assert rel_err(a.lora_B.grad, Br.grad) <= 1e-5
    assert a.base.scale.grad is None and not a.base.zero.requires_grad


def test_training_loop_loss_falls():
    teacher = _linear(k=128, n=32)
    layer = QALoRALinear.from_linear(teacher, bits=2, group_size=32, rank=8, alpha=16, dropout=0.1)
    target_shift = torch.randn(32, 4) @ torch.randn(4, 4)  # a low-rank change of the function on pooled inputs
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        x = torch.randn(64, 128)
        with torch.no_grad():
            y = teacher(x) + reference.pool(x, 32).float() @ target_shift.t() * 4
        loss = torch.nn.functional.mse_loss(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def _half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half the spacing of x's dtype at x (the larger neighbour gap, to be safe at powers of two)."""
    up = torch.nextafter(x, torch.full_like(x, math.inf)) - x
    down = x - torch.nextafter(x, torch.full_like(x, -math.inf))
    return torch.maximum(up, down).double() / 2


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", (32, 128))
@pytest.mark.parametrize("zero_dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_merge_is_exact_at_parameter_level(bits, group_size, zero_dtype):
    lin = _linear(k=640, n=80)
    a = QALoRALinear.from_linear(lin, bits=bits, group_size=group_size, rank=8, alpha=16, zero_dtype=zero_dtype)
    _randomize_adapter(a, std=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = a.merge()
    assert type(merged) is QuantLinear and merged.bits == bits and merged.group_size == group_size
    assert torch.equal(merged.packed, a.base.packed)
    assert torch.equal(merged.scale, a.base.scale) and merged.scale.dtype == a.base.scale.dtype
    assert merged.zero.dtype == zero_dtype
    exact = reference.merged_zero(a.base.zero, a.lora_A.detach(), a.lora_B.detach(), a.scaling, group_size)
    assert bool(((merged.zero.double() - exact).abs() <= _half_ulp(merged.zero)).all())
    lost = reference.lost_fraction(a.base.zero, merged.zero, a.lora_A.detach(), a.lora_B.detach(), a.scaling,
                                   group_size)
    assert merged.merge_lost_fraction == pytest.approx(lost, rel=1e-9, abs=1e-15)
    if zero_dtype == torch.float32:
        assert lost < 1e-4  # float32 zeros keep the adapter (loss ~ ulp(zero) / delta)
    else:
        assert lost > 1e-5  # 16-bit zeros really lose part of the adapter
    # The merged layer's output against the float64 unmerged reference.
    x = torch.randn(9, 640)
    W = reference.dequantize(a.base.codes(), a.base.scale, a.base.zero, group_size)
    ref = reference.qlinear(x, W, a.base.bias, a.lora_A.detach(), a.lora_B.detach(), None, a.scaling, group_size)
    if zero_dtype == torch.float32:
        assert rel_err(merged(x), ref) <= 1e-5
    assert rel_err(merged(x), a(x)) <= max(1e-5, 2 * lost)


def test_merge_warns_when_16bit_zeros_lose_the_adapter():
    a = QALoRALinear.from_linear(_linear(), bits=4, rank=4, zero_dtype=torch.float16)
    with torch.no_grad():
        a.lora_B.normal_(0, 1e-5)  # an adapter far below float16's resolution of the zeros
    with pytest.warns(UserWarning, match="lost rounding the zeros"):
        merged = a.merge()
    assert merged.merge_lost_fraction > 0.01
    a32 = QALoRALinear.from_linear(_linear(), bits=4, rank=4)
    with torch.no_grad():
        a32.lora_B.normal_(0, 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert a32.merge().merge_lost_fraction < 0.01


def test_end_to_end_train_merge_same_outputs():
    """The issue's promise: Linear -> packed INT3 + adapter -> train -> merge -> same outputs."""
    lin = _linear(k=256, n=64)
    layer = QALoRALinear.from_linear(lin, bits=3, group_size=64, rank=8, alpha=16)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    target = torch.randn(64, 4)
    for _ in range(20):
        x = torch.randn(32, 256)
        loss = (layer(x) - reference.pool(x, 64).float() @ target.t()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert layer.lora_B.abs().sum() > 0
    layer.eval()
    x = torch.randn(5, 256)
    before = layer(x)
    merged = layer.merge()
    assert rel_err(merged(x), before) <= 1e-5


def test_adapter_errors():
    q = QuantLinear.from_linear(_linear())
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="rank must be an integer >= 1"):
            QALoRALinear(q, rank=bad)
    with pytest.raises(ValueError, match="dropout"):
        QALoRALinear(q, dropout=1.0)
    with pytest.raises(TypeError, match="wraps a QuantLinear"):
        QALoRALinear(nn.Linear(64, 64))
    a = QALoRALinear(q, rank=4)
    a.half()
    assert a.lora_A.dtype == torch.float32  # the adapter's master copy stays float32


def test_public_api_names():
    for name in ("QuantLinear", "QALoRALinear", "quantize_model", "add_adapters", "merge_adapters",
                 "save_quantized", "load_quantized", "save_adapter", "load_adapter", "set_int8_activations",
                 "build_info", "set_cpu_isa", "LAYOUT_CANONICAL"):
        assert hasattr(qalora_ext, name), name
        assert name in qalora_ext.__all__, name
    for name in qalora_ext.__all__:
        assert hasattr(qalora_ext, name), name


def test_zero_delta_is_the_pooled_adapter_per_weight():
    """zero_delta() is what the adapter adds to every weight of a group: s * (B A)[n, g] / G, in float64."""
    torch.manual_seed(12)
    layer = QALoRALinear.from_linear(nn.Linear(256, 48), bits=3, group_size=64, rank=5, alpha=7)
    nn.init.normal_(layer.lora_B, std=0.1)
    delta = layer.zero_delta()
    assert delta.dtype == torch.float64 and delta.shape == (48, 4)
    x = torch.randn(3, 256, dtype=torch.float64)
    # The adapter's output equals x @ (per-weight delta)^T, since pool is a mean.
    adapter_out = layer.scaling * (x.unflatten(-1, (4, 64)).mean(-1) @ layer.lora_A.double().t()) @ layer.lora_B.double().t()
    per_weight = delta.repeat_interleave(64, dim=1)
    assert torch.allclose(x @ per_weight.t(), adapter_out, rtol=1e-12, atol=1e-12)


def test_integer_input_is_refused_and_meta_runs():
    """The dtype policy (ops.kernel_dtype): integers are refused, not truncated; meta tensors trace shapes."""
    torch.manual_seed(14)
    q = QuantLinear.from_linear(nn.Linear(64, 16), bits=4, group_size=32)
    with pytest.raises(TypeError, match="floating-point input; got x of dtype torch.int64"):
        q(torch.randint(-3, 3, (2, 64)))
    y = q.to("meta")(torch.randn(5, 64, device="meta"))
    assert y.device.type == "meta" and y.shape == (5, 16) and y.dtype == torch.float32


def test_frozen_buffers_that_require_grad_are_refused():
    """scale.requires_grad = True on the stored buffer is refused, naming the tensor (dscale/dzero train instead)."""
    torch.manual_seed(16)
    q = QuantLinear.from_linear(nn.Linear(64, 16), bits=4, group_size=32)
    for name in ("scale", "zero"):
        getattr(q, name).requires_grad_(True)
        with pytest.raises(ValueError, match=f"qlinear: {name} requires grad, but the stored {name}s are frozen buffers"):
            q(torch.randn(3, 64))
        getattr(q, name).requires_grad_(False)
    q(torch.randn(3, 64))


def test_double_backward_is_refused():
    torch.manual_seed(17)
    layer = QALoRALinear.from_linear(nn.Linear(64, 16), bits=4, group_size=32, rank=4)
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x).square().sum()
    (g,) = torch.autograd.grad(y, x)  # first order is fine
    assert g.shape == x.shape
    y = layer(x).square().sum()
    with pytest.raises(RuntimeError, match="qlinear has no second derivative"):
        torch.autograd.grad(y, x, create_graph=True)


def test_state_dict_across_bit_widths_or_cast_is_refused():
    """INT3 and INT4 at K = 32 have the same words per row: the state dict's metadata tells them apart."""
    torch.manual_seed(19)
    lin = nn.Linear(32, 8)
    q3 = QuantLinear.from_linear(lin, bits=3, group_size=32)
    q4 = QuantLinear.from_linear(lin, bits=4, group_size=32)
    assert q3.packed.shape == q4.packed.shape
    with pytest.raises(RuntimeError, match="saved from a layer with bits=4.*this layer has bits=3"):
        q3.load_state_dict(q4.state_dict())
    sd = {k: (v.half() if v.is_floating_point() or v.dtype == torch.int32 else v) for k, v in q3.state_dict().items()}
    with pytest.raises(RuntimeError, match="packed must be int32 .*got torch.float16"):
        q3.load_state_dict(sd)
    other = QuantLinear.from_linear(nn.Linear(32, 8), bits=3, group_size=32)
    other.load_state_dict(q3.state_dict())  # same format: loads
    assert torch.equal(other.packed, q3.packed)

"""Trainable scales and zeros (SPEC "Trainable quantization parameters"): dscale, dzero.

Gradients against reference.py (float64) and by gradcheck, the exact merge
(stored values are their float64 targets rounded once), and the module's
parameter surface (nothing new unless turned on; the stored buffers stay frozen).
"""

from __future__ import annotations

import math

import pytest
import torch

from qalora_ext import reference as ref
from qalora_ext.format import round_to_storage
from qalora_ext.model import add_adapters, freeze_all_but_adapters, merge_adapters
from qalora_ext.nn import QALoRALinear, QuantLinear
from qalora_ext.training.finetune import parameter_groups


def _layer(bits, group, n=40, k=256, rank=4, train_scale=True, train_zero=True, scale_dtype=torch.float16,
           zero_dtype=torch.float32, dropout=0.0, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        linear.bias.copy_(torch.randn(n, generator=g) * 0.1)
    layer = QALoRALinear.from_linear(linear, bits, group, rank=rank, alpha=2 * max(rank, 1), dropout=dropout,
                                     scale_dtype=scale_dtype, zero_dtype=zero_dtype, train_scale=train_scale,
                                     train_zero=train_zero)
    with torch.no_grad():  # as after some training: every trained quantity away from its start
        if layer.lora_B is not None:
            layer.lora_B.normal_(0, 0.05, generator=g)
        for p in (layer.dscale, layer.dzero):
            if p is not None:
                p.normal_(0, 3e-3, generator=g)
    return layer


def _reference_forward(layer, x, mask=None):
    """The same layer in float64 with reference.py: W~ from scale + dscale, zero + dzero."""
    codes = layer.base.codes()
    scale = layer.base.scale.double() + (layer.dscale.double() if layer.dscale is not None else 0)
    zero = layer.base.zero.double() + (layer.dzero.double() if layer.dzero is not None else 0)
    w = ref.dequantize(codes, scale, zero, layer.group_size)
    return ref.qlinear(x, w, layer.base.bias, layer.lora_A, layer.lora_B, mask, layer.scaling, layer.group_size)


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 128), (3, 32)])
@pytest.mark.parametrize("m", [3, 70])  # both sides of the small-M threshold
def test_gradients_match_float64_reference(bits, group, m):
    layer = _layer(bits, group)
    x = torch.randn(2, m, layer.in_features, requires_grad=True)
    gy = torch.randn(2, m, layer.out_features)
    layer(x).backward(gy)

    x64 = x.detach().double().requires_grad_()
    params64 = {n: p.detach().double().requires_grad_() for n, p in layer.trainable_parameters().items()}
    codes = layer.base.codes()
    scale = layer.base.scale.double() + params64["dscale"]
    zero = layer.base.zero.double() + params64["dzero"]
    w = ref.dequantize(codes, scale, zero, group)
    y64 = ref.qlinear(x64, w, layer.base.bias, params64["lora_A"], params64["lora_B"], None, layer.scaling, group)
    y64.backward(gy.double())

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(x.grad, x64.grad) < 1e-5
    for name, p in layer.trainable_parameters().items():
        assert p.grad.dtype == torch.float32
        assert rel(p.grad, params64[name].grad) < 1e-5, name
    # The explicit SPEC formulas agree with float64 autograd.
    gs, gz = ref.quant_param_grads(x.detach(), gy, codes, group)
    assert rel(layer.dscale.grad, gs) < 1e-5 and rel(layer.dzero.grad, gz) < 1e-5


def test_dscale_dzero_see_the_undropped_input():
    layer = _layer(3, 32, dropout=0.5)
    layer.train()
    torch.manual_seed(1234)
    x = torch.randn(6, layer.in_features)
    gy = torch.randn(6, layer.out_features)
    layer(x).backward(gy)
    gs, gz = ref.quant_param_grads(x, gy, layer.base.codes(), 32)
    assert torch.allclose(layer.dscale.grad.double(), gs, rtol=1e-5, atol=1e-5 * gs.abs().max().item())
    assert torch.allclose(layer.dzero.grad.double(), gz, rtol=1e-5, atol=1e-5 * gz.abs().max().item())


def test_gradcheck_dscale_dzero():
    layer = _layer(3, 32, n=8, k=64, rank=2)
    x = torch.randn(3, 64)

    def f(dscale, dzero):
        scale = layer.base.scale.float() + dscale
        zero = layer.base.zero.float() + dzero
        return layer.base(x, scale=scale, zero=zero)

    ds = (torch.randn(8, 2) * 1e-2).requires_grad_()
    dz = (torch.randn(8, 2) * 1e-2).requires_grad_()
    # The kernels run in float32; y is linear in both, so central differences are exact
    # up to float32 rounding (~1e-7 |y| / eps).
    with pytest.warns(UserWarning):
        assert torch.autograd.gradcheck(f, (ds, dz), eps=1e-2, atol=2e-3, rtol=2e-3, fast_mode=False)


@pytest.mark.parametrize("scale_dtype,zero_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float32),
                                                    (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("rank", [0, 4])
def test_merge_is_exact(scale_dtype, zero_dtype, rank):
    layer = _layer(3, 32, rank=rank, scale_dtype=scale_dtype, zero_dtype=zero_dtype)
    layer.eval()
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        y_unmerged = layer(x)
    merged = layer.merge()
    assert torch.equal(merged.packed, layer.base.packed)
    s64, z64 = ref.merged_scale_zero(layer.base.scale, layer.base.zero, layer.dscale, layer.dzero, layer.lora_A,
                                     layer.lora_B, layer.scaling, 32)
    assert merged.scale.dtype == scale_dtype and merged.zero.dtype == zero_dtype
    # Rounded once: within half an ulp of the float64 target (round_to_storage is that rounding).
    assert torch.equal(merged.scale, round_to_storage(s64, scale_dtype))
    assert torch.equal(merged.zero, round_to_storage(z64, zero_dtype))
    ulp = torch.finfo(scale_dtype).eps * s64.abs()
    assert bool(((merged.scale.double() - s64).abs() <= ulp / 2 + torch.finfo(scale_dtype).tiny).all())
    # The lost fraction is the weight-space one.
    codes = layer.base.codes()
    lost = ref.weight_lost_fraction(codes, layer.base.scale, layer.base.zero, s64, z64, merged.scale, merged.zero, 32)
    assert math.isclose(merged.merge_lost_fraction, lost, rel_tol=1e-6, abs_tol=1e-12)
    with torch.no_grad():
        y_merged = merged(x)
    err = ((y_merged - y_unmerged).norm() / y_unmerged.norm()).item()
    if scale_dtype == torch.float32:
        assert err < 1e-4  # SPEC: float32 scales and zeros
    else:
        # What the scales' rounding explains: dW = (scale'_stored - scale'_target) q.
        w_err = ref.dequantize(codes, merged.scale.double() - s64, torch.zeros_like(z64), 32)
        bound = (x.double() @ w_err.t()).norm() / y_unmerged.double().norm()
        assert err < 1e-4 + 2 * bound.item()


def test_merge_matches_float64_output():
    layer = _layer(4, 64, scale_dtype=torch.float32)
    x = torch.randn(7, layer.in_features)
    with torch.no_grad():
        y = layer.merge()(x).double()
    y64 = _reference_forward(layer, x)
    assert ((y - y64).norm() / y64.norm()).item() < 1e-5


def test_merge_refuses_nan_dscale_and_warns_on_lossy_storage():
    layer = _layer(3, 32)
    with torch.no_grad():
        layer.dscale[0, 0] = float("nan")
    with pytest.raises(ValueError, match="dscale"):
        layer.merge()
    layer = _layer(3, 32, rank=0, train_zero=False, scale_dtype=torch.bfloat16)
    with torch.no_grad():
        layer.dscale.mul_(1e-3)  # far below bfloat16's resolution of the scales
    with pytest.warns(UserWarning, match="lost"):
        merged = layer.merge()
    assert merged.merge_lost_fraction > 0.01


def test_parameters_exist_only_when_turned_on():
    plain = _layer(3, 32, train_scale=False, train_zero=False)
    assert [n for n, _ in plain.named_parameters()] == ["lora_A", "lora_B"]
    assert set(plain.state_dict()) == {"lora_A", "lora_B", "base.packed", "base.scale", "base.zero", "base.bias"}
    zero_only = _layer(3, 32, rank=0, train_scale=False)
    assert [n for n, _ in zero_only.named_parameters()] == ["dzero"]
    with pytest.raises(ValueError, match="rank must be an integer >= 1 unless"):
        _layer(3, 32, rank=0, train_scale=False, train_zero=False)
    both = _layer(2, 64)
    assert [n for n, _ in both.named_parameters()] == ["lora_A", "lora_B", "dscale", "dzero"]
    both.half()
    assert all(p.dtype == torch.float32 for p in both.parameters())


def test_stored_buffers_stay_frozen():
    layer = _layer(3, 32)
    layer.base.scale.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        layer.base(torch.randn(2, layer.in_features))
    layer.base.scale.requires_grad_(False)
    layer.base.zero.requires_grad_(True)
    with pytest.raises(ValueError, match="dzero"):
        layer.base(torch.randn(2, layer.in_features))


def test_model_helpers_train_and_merge_quant_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    from qalora_ext.model import quantize_model

    quantize_model(model, bits=3, group_size=32)
    add_adapters(model, rank=0, train_scale=True, train_zero=True)
    freeze_all_but_adapters(model)
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert names == ["0.dscale", "0.dzero", "2.dscale", "2.dzero"]
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.1, quant_lr=5e-3)
    assert groups[0]["params"] == [] and groups[1]["lr"] == 5e-3 and groups[1]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(groups, lr=1e-3)
    x = torch.randn(8, 64)
    target = torch.randn(8, 16)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x), target)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        before = model(x)
    merge_adapters(model)
    assert all(isinstance(m, QuantLinear) for m in (model[0], model[2]))
    with torch.no_grad():
        after = model(x)
    # float16 scales: the merge rounds dscale into them.
    assert ((after - before).norm() / before.norm()).item() < 1e-2


def test_bfloat16_activations_train_scales_and_zeros():
    """bf16 x (the CPU's bf16 paths): output and every gradient within bf16 rounding of float64."""
    layer = _layer(3, 32, n=64, k=256)
    for m in (4, 80):  # the packed kernel and the bf16 GEMM path
        layer.zero_grad(set_to_none=True)
        x = torch.randn(m, layer.in_features).bfloat16().requires_grad_()
        gy = torch.randn(m, layer.out_features)
        y = layer(x)
        assert y.dtype == torch.bfloat16
        y.backward(gy.bfloat16())
        x64 = x.detach().double().requires_grad_()
        params64 = {n: p.detach().double().requires_grad_() for n, p in layer.trainable_parameters().items()}
        w = ref.dequantize(layer.base.codes(), layer.base.scale.double() + params64["dscale"],
                           layer.base.zero.double() + params64["dzero"], 32)
        y64 = ref.qlinear(x64, w, layer.base.bias, params64["lora_A"], params64["lora_B"], None, layer.scaling, 32)
        y64.backward(gy.bfloat16().double())

        def rel(a, b):
            return ((a.double() - b).norm() / b.norm()).item()

        assert rel(y.detach(), y64.detach()) < 2e-2
        assert rel(x.grad, x64.grad) < 2e-2
        for name, p in layer.trainable_parameters().items():
            assert p.grad.dtype == torch.float32 and rel(p.grad, params64[name].grad) < 2e-2, name

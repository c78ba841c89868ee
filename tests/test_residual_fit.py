"""The residual-fit start (quantize.residual_fit): least squares of the quantization error, checked in float64."""

from __future__ import annotations

import pytest
import torch

from qalora_ext import reference as ref
from qalora_ext.nn import QALoRALinear, QuantLinear
from qalora_ext.quantize.residual_fit import fit_layer_residual, fit_quantization_residual


def _setup(bits=3, group=32, n=24, k=128, rank=0, train_scale=False, train_zero=True):
    linear = torch.nn.Linear(k, n, bias=False).requires_grad_(False)
    linear.weight.copy_(torch.randn(n, k) * 0.05)
    w = linear.weight.clone()
    base = QuantLinear.from_linear(linear, bits, group)
    layer = QALoRALinear(base, rank=rank, alpha=16, train_scale=train_scale, train_zero=train_zero)
    # Correlated calibration inputs, as real activations are.
    mix = torch.randn(k, k) / k**0.5 + torch.eye(k)
    x = torch.randn(256, k) @ mix
    return w, layer, x


def _output_error(layer, w, x):
    with torch.no_grad():
        y = layer(x).double()
    return (y - x.double() @ w.double().t()).norm().item()


def test_zero_fit_without_calibration_is_the_group_mean():
    w, layer, _ = _setup()
    fit_layer_residual(layer, w)
    e = w.double() - layer.base.dequantize().double()
    expected = ref.pool(e, 32)  # the mean error of each group
    assert torch.allclose(layer.dzero.double(), expected, atol=1e-7)


@pytest.mark.parametrize("kw", [dict(rank=0, train_zero=True), dict(rank=0, train_scale=True, train_zero=True),
                                dict(rank=4, train_zero=False), dict(rank=4, train_scale=True, train_zero=False),
                                dict(rank=0, train_scale=True, train_zero=False)])
def test_calibrated_fit_reduces_the_output_error(kw):
    w, layer, x = _setup(**kw)
    h = x.t() @ x
    before = _output_error(layer, w, x)
    report = fit_layer_residual(layer, w, h, damp=1e-4)
    after = _output_error(layer, w, x)
    assert after < before * 0.999
    assert report["after"] < report["before"]
    assert report["after"] == pytest.approx(after / (x.double() @ w.double().t()).norm().item(), rel=1e-3)


def test_zero_fit_is_the_weighted_least_squares_optimum():
    w, layer, x = _setup()
    h = x.t() @ x
    fit_layer_residual(layer, w, h, damp=0.0)
    base_err = _output_error(layer, w, x)
    # Any other per-group shift does worse.
    for _ in range(3):
        with torch.no_grad():
            saved = layer.dzero.clone()
            layer.dzero.add_(torch.randn_like(layer.dzero) * 1e-3)
        assert _output_error(layer, w, x) > base_err
        with torch.no_grad():
            layer.dzero.copy_(saved)


def test_full_rank_adapter_fit_equals_the_zero_fit():
    w, zero_layer, x = _setup()
    h = x.t() @ x
    fit_layer_residual(zero_layer, w, h)
    groups = zero_layer.in_features // zero_layer.group_size
    adapter_layer = QALoRALinear(zero_layer.base, rank=groups, alpha=8)
    fit_layer_residual(adapter_layer, w, h)
    assert torch.allclose(adapter_layer.zero_delta(), zero_layer.zero_delta(), atol=1e-6, rtol=1e-4)


def test_model_level_fit_checks_names_and_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    source = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    source.load_state_dict(model.state_dict())
    from qalora_ext.model import add_adapters, quantize_model

    quantize_model(model, bits=2, group_size=32)
    add_adapters(model, rank=0, train_zero=True, train_scale=True)
    report = fit_quantization_residual(model, source, [torch.randn(16, 64)], progress=False)
    assert set(report) == {"0", "2"} and all(r["after"] <= r["before"] for r in report.values())
    with pytest.raises(ValueError, match="no module"):
        fit_quantization_residual(model, torch.nn.Sequential(torch.nn.Linear(64, 32)), None, progress=False)
    with pytest.raises(ValueError, match="shape"):
        fit_layer_residual(model[0], torch.randn(5, 5))

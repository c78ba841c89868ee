"""Model surgery: quantize_model, add_adapters, merge_adapters."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import qalora_ext
from qalora_ext import QALoRALinear, QuantLinear

from conftest import rel_err


class TinyLM(nn.Module):
    """Embedding, two blocks of linears (one with in_features 96, not a multiple of 64), tied head."""

    def __init__(self, vocab=50, d=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(d, 96), "down": nn.Linear(96, d), "proj": nn.Linear(d, d)})
            for _ in range(2)
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["down"](torch.relu(b["up"](h))) + b["proj"](h)
        return self.lm_head(h)


def _quant_names(model, cls=QuantLinear):
    return sorted(n for n, m in model.named_modules() if type(m) is cls)


def test_quantize_model_defaults_skip_head_and_warn_once():
    model = TinyLM()
    with pytest.warns(UserWarning, match=r"2 layer\(s\) left unquantized.*blocks.0.down \(in_features=96\)"):
        qalora_ext.quantize_model(model, bits=3, group_size=64, progress=False)
    assert _quant_names(model) == ["blocks.0.proj", "blocks.0.up", "blocks.1.proj", "blocks.1.up"]
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed.weight
    assert type(model.blocks[0]["down"]) is nn.Linear


def test_quantize_model_target_modules_and_errors():
    model = TinyLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qalora_ext.quantize_model(model, bits=4, group_size=32, target_modules=["up"], progress=False)
    assert _quant_names(model) == ["blocks.0.up", "blocks.1.up"]
    model = TinyLM()
    qalora_ext.quantize_model(model, bits=2, group_size=32, target_modules=r"blocks\.1\..*", progress=False)
    assert _quant_names(model) == ["blocks.1.down", "blocks.1.proj", "blocks.1.up"]
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        qalora_ext.quantize_model(TinyLM(), target_modules=["nope"], progress=False)
    with pytest.raises(ValueError, match="method='gptq' needs calibration"):
        qalora_ext.quantize_model(TinyLM(), method="gptq")
    with pytest.raises(ValueError, match="calibration is only used by method='gptq'"):
        qalora_ext.quantize_model(TinyLM(), calibration=[torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match="method must be"):
        qalora_ext.quantize_model(TinyLM(), method="awq")
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        qalora_ext.quantize_model(TinyLM(), bits=8)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_quantized_model_output_matches_layerwise_reference(bits):
    model = TinyLM()
    ids = torch.randint(0, 50, (2, 9))
    qalora_ext.quantize_model(model, bits=bits, group_size=32, progress=False)
    # Replace every QuantLinear by a float Linear holding its dequantized weight: same function.
    ref = TinyLM()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if k in ref.state_dict()}, strict=False)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            lin = ref.get_submodule(name)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize())
                lin.bias.copy_(m.bias)
    assert rel_err(model(ids), ref.double()(ids)) <= 1e-5


def test_add_train_merge_model():
    model = TinyLM()
    qalora_ext.quantize_model(model, bits=3, group_size=32, progress=False)
    qalora_ext.add_adapters(model, rank=4, alpha=8, dropout=0.1)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * len(_quant_names(model, QALoRALinear)) == 12
    with pytest.raises(ValueError, match="no quantized layer matched"):
        qalora_ext.add_adapters(model, target_modules=["missing"])
    with pytest.raises(ValueError, match="already has an adapter"):
        qalora_ext.add_adapters(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 50, (4, 12))
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    before = model(ids)
    report = qalora_ext.merge_adapters(model)
    assert set(report) == set(_quant_names(model)) and len(report) == 6
    assert all(0 <= f < 1e-3 for f in report.values())
    assert not _quant_names(model, QALoRALinear)
    assert rel_err(model(ids), before) <= 1e-5


def test_quantized_layers_lists_each_packed_layer_once():
    torch.manual_seed(11)
    from qalora_ext.model import quantized_layers

    model = TinyLM()
    qalora_ext.quantize_model(model, bits=3, group_size=32, progress=False)
    qalora_ext.add_adapters(model, rank=4, target_modules=["proj"])
    layers = quantized_layers(model)
    want = {f"blocks.{i}.{n}" for i in range(2) for n in ("up", "down", "proj")}
    assert set(layers) == want  # no "blocks.i.proj.base", no head
    for i in range(2):
        assert isinstance(layers[f"blocks.{i}.proj"], QALoRALinear)
        assert type(layers[f"blocks.{i}.up"]) is QuantLinear
    # A layer shared under two names is listed once, under its first name.
    model.blocks[1]["up"] = model.blocks[0]["up"]
    assert "blocks.1.up" not in quantized_layers(model)


def test_quantize_model_gptq_is_the_gptq_quantizer():
    """method='gptq' (it once said "not available") gives exactly quantize_model_gptq's layers."""
    from qalora_ext.quantize.gptq import quantize_model_gptq

    torch.manual_seed(13)
    model = TinyLM()
    calib = [torch.randint(0, 50, (2, 16)) for _ in range(2)]
    a = qalora_ext.quantize_model(copy.deepcopy(model), bits=3, group_size=32, method="gptq", calibration=calib,
                                  progress=False)
    b = quantize_model_gptq(copy.deepcopy(model), calib, bits=3, group_size=32, progress=False)
    names = _quant_names(a)
    assert names and names == _quant_names(b)
    rtn = qalora_ext.quantize_model(copy.deepcopy(model), bits=3, group_size=32, progress=False)
    differs = False
    for n in names:
        la, lb = a.get_submodule(n), b.get_submodule(n)
        assert torch.equal(la.packed, lb.packed) and torch.equal(la.scale, lb.scale) and torch.equal(la.zero, lb.zero)
        differs |= not torch.equal(la.packed, rtn.get_submodule(n).packed)
    assert differs  # GPTQ, not RTN


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_refuses_non_finite_adapters_naming_the_layer(bad):
    torch.manual_seed(18)
    model = TinyLM()
    qalora_ext.quantize_model(model, bits=3, group_size=32, progress=False)
    qalora_ext.add_adapters(model, rank=4)
    last = [n for n, m in model.named_modules() if isinstance(m, QALoRALinear)][-1]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QALoRALinear):
                m.lora_B.normal_(0, 0.1)
        model.get_submodule(last).lora_B[0, 0] = bad
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=rf"merge_adapters: layer '{last}': the adapter holds NaN or infinite values "
                                         r"\(lora_B\)"):
        qalora_ext.merge_adapters(model)
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing merged

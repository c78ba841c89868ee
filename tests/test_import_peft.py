"""PEFT QA-LoRA (``use_qalora``) adapter import.

Two oracles: PEFT's formula written out in float64 from its source
(``QALoraLinearVariant.forward``: ``mean(x) * L @ A^T @ B^T * scaling``), which
runs everywhere, and -- when ``peft`` is installed -- PEFT itself: its
``GPTQLoraLinear`` with the QA-LoRA variant over a linear layer holding our
dequantized weight, and whole adapters written by ``save_pretrained``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import quantized, rel_err
from qalora_ext import load_adapter, load_quantized, quantize_model, save_adapter, save_quantized
from qalora_ext.interop import peft_import as ip
from qalora_ext.nn import QALoRALinear, QuantLinear

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def peft_qalora_f64(x, W, bias, A, B, scaling, group_size):
    """PEFT's QA-LoRA forward (variants.py), in float64: base + (mean(x) * L) A^T B^T * scaling."""
    x = x.double()
    L = x.shape[-1] // group_size
    pooled = x.view(*x.shape[:-1], L, group_size).mean(-1) * L
    y = x @ W.double().t() + (0 if bias is None else bias.double())
    return y + (pooled @ A.double().t()) @ B.double().t() * scaling


def write_peft_adapter(folder: Path, layers: dict, *, r: int, alpha: float, group_size: int, **extra) -> Path:
    """A PEFT-style adapter folder (config + safetensors) written by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_qalora": True, "qalora_group_size": group_size,
           "use_rslora": False, "use_dora": False, "bias": "none", "lora_dropout": 0.0,
           "target_modules": sorted({n.split(".")[-1] for n in layers}), "rank_pattern": {}, "alpha_pattern": {},
           "peft_version": "handwritten"}
    cfg.update(extra)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {}
    for name, (A, B) in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _quant_layer(n, k, bits, group_size, bias=True):
    packed, scale, zero, ref = quantized(n, k, bits, group_size)
    layer = QuantLinear(k, n, bits, group_size, bias=bias)
    b = torch.randn(n) * 0.1 if bias else None
    layer.load_packed(packed, scale, zero, b)
    return layer, ref, b


# ---------------------------------------------------------------------------
# Against PEFT's formula (no peft needed)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_layer_matches_peft_formula(tmp_path, group_size, use_rslora):
    n, k, r, alpha, bits = 48, group_size * 5, 4, 12.0, 4
    layer, W, bias = _quant_layer(n, k, bits, group_size)
    A = torch.randn(r, k // group_size) * 0.3
    B = torch.randn(n, r) * 0.3
    model = Holder(layer)
    write_peft_adapter(tmp_path / "ad", {"proj": (A, B)}, r=r, alpha=alpha, group_size=group_size,
                       use_rslora=use_rslora)
    report = ip.import_peft_qalora(model, tmp_path / "ad")
    assert isinstance(model.proj, QALoRALinear)
    L = k // group_size
    torch.testing.assert_close(model.proj.lora_A, A * L, rtol=0, atol=0)
    assert torch.equal(model.proj.lora_B, B)
    scaling = alpha / (math.sqrt(r) if use_rslora else r)
    assert model.proj.scaling == pytest.approx(scaling)
    assert report["layers"]["proj"]["A_factor"] == L and "L * A_peft" in report["conversion"]

    x = torch.randn(3, 5, k)
    with torch.no_grad():
        got = model(x)
    want = peft_qalora_f64(x, W, bias, A, B, scaling, group_size)
    assert rel_err(got, want) < 1e-5
    # the adapter really contributes (B != 0)
    assert rel_err(got, peft_qalora_f64(x, W, bias, A, B * 0, scaling, group_size)) > 1e-3


def test_rank_and_alpha_patterns(tmp_path):
    g = 32
    a, _, _ = _quant_layer(32, 64, 4, g)
    b, _, _ = _quant_layer(32, 64, 4, g)
    model = nn.Module()
    model.q_proj, model.v_proj = a, b
    layers = {"q_proj": (torch.randn(8, 2), torch.randn(32, 8)), "v_proj": (torch.randn(2, 2), torch.randn(32, 2))}
    write_peft_adapter(tmp_path / "ad", layers, r=8, alpha=16, group_size=g, rank_pattern={"v_proj": 2},
                       alpha_pattern={"v_proj": 3})
    report = ip.import_peft_qalora(model, tmp_path / "ad")
    assert (model.q_proj.rank, model.q_proj.alpha) == (8, 16.0)
    assert (model.v_proj.rank, model.v_proj.alpha) == (2, 3.0)
    assert report["layers"]["v_proj"]["scaling"] == pytest.approx(1.5)


def test_refusals(tmp_path):
    g = 32
    layer, _, _ = _quant_layer(32, 128, 3, g)
    A, B = torch.randn(4, 4), torch.randn(32, 4)

    def attempt(match, layers=None, model=None, **cfg):
        folder = tmp_path / f"ad{len(list(tmp_path.iterdir()))}"
        kw = dict(r=4, alpha=8, group_size=g)
        kw.update(cfg)
        write_peft_adapter(folder, layers or {"proj": (A, B)}, **kw)
        target = model if model is not None else Holder(copy.deepcopy(layer))
        with pytest.raises(ValueError, match=match):
            ip.import_peft_qalora(target, folder)
        return target

    attempt("plain LoRA adapter.*qalora quantize", use_qalora=False)
    m = attempt(r"qalora_group_size=64.*group_size=32", group_size=64, layers={"proj": (A[:, :2], B)})
    assert isinstance(m.proj, QuantLinear)  # unchanged on error
    attempt(r"do not fit rank 8", r=8)
    attempt(r"proj: adapter shapes", layers={"proj": (A[:, :3], B)})
    attempt("DoRA", use_dora=True)
    attempt("modules_to_save", modules_to_save=["lm_head"])
    attempt("trained base biases", bias="all")
    attempt("peft_type is 'LOHA'", peft_type="LOHA")
    attempt("load_adapter", peft_type="QALORA_EXT")
    attempt("no such module", layers={"nothere": (A, B)})
    float_model = Holder(nn.Linear(128, 32))
    attempt("not a quantized layer", model=float_model)
    # lora_B missing / extra tensors
    folder = write_peft_adapter(tmp_path / "partial", {"proj": (A, B)}, r=4, alpha=8, group_size=g)
    save_file({"base_model.model.proj.lora_A.weight": A}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="needs both lora_A and lora_B"):
        ip.import_peft_qalora(Holder(copy.deepcopy(layer)), folder)
    save_file({"base_model.model.proj.lora_A.weight": A, "base_model.model.proj.lora_B.weight": B,
               "base_model.model.proj.lora_magnitude_vector": torch.ones(32)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="DoRA magnitudes"):
        ip.import_peft_qalora(Holder(copy.deepcopy(layer)), folder)
    with pytest.raises(FileNotFoundError):
        ip.import_peft_qalora(Holder(copy.deepcopy(layer)), tmp_path / "missing")


# ---------------------------------------------------------------------------
# Against PEFT itself (needs peft)
# ---------------------------------------------------------------------------


def _peft():
    peft = pytest.importorskip("peft")
    try:
        import peft.tuners.lora.gptq  # noqa: F401  (QA-LoRA lives in its GPTQ LoRA layer)
    except ImportError:
        pytest.skip("this peft has no GPTQLoraLinear (QA-LoRA variant)")
    return peft


class FakeGPTQ(nn.Linear):
    """A linear layer PEFT dispatches to its GPTQ LoRA class (so use_qalora takes effect) without gptqmodel."""


def _peftify(model: nn.Module) -> nn.Module:
    """A float copy of our quantized model whose quantized layers are FakeGPTQ with the dequantized weight."""
    float_model = copy.deepcopy(model)
    for name, m in list(float_model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = FakeGPTQ(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(float_model.get_submodule(parent) if parent else float_model, child, lin)
    return float_model


def _peft_model(float_model, **cfg):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.gptq import GPTQLoraLinear

    config = LoraConfig(use_qalora=True, init_lora_weights=False, **cfg)
    config._register_custom_module({FakeGPTQ: GPTQLoraLinear})
    pm = get_peft_model(float_model, config)
    with torch.no_grad():  # PEFT leaves B = 0 or small; make the adapter matter
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return pm.eval()


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_layer_matches_real_peft(tmp_path, group_size, use_rslora):
    _peft()
    n, k = 40, group_size * 3
    layer, _, _ = _quant_layer(n, k, 3, group_size)
    ours = Holder(layer)
    pm = _peft_model(_peftify(ours), r=5, lora_alpha=7, target_modules=["proj"], qalora_group_size=group_size,
                     use_rslora=use_rslora)
    wrapped = pm.base_model.model.proj
    assert type(wrapped).__name__ == "GPTQLoraLinear" and "default" in wrapped.lora_variant
    pm.save_pretrained(tmp_path / "peft")
    ip.import_peft_qalora(ours, tmp_path / "peft")
    x = torch.randn(4, 6, k)
    with torch.no_grad():
        want = pm(x)
        got = ours(x)
    assert rel_err(got, want) < 1e-5


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations raised inside peft
def test_tiny_llm_real_peft_round_trip(tmp_path, one_thread):
    peft = _peft()
    from tiny_llm import make_tiny_llama

    model = make_tiny_llama(96, hidden=64, intermediate=128, layers=2)
    quantize_model(model, bits=4, group_size=32, progress=False)
    pm = _peft_model(_peftify(model), r=4, lora_alpha=8, qalora_group_size=32,
                     target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
                     alpha_pattern={"v_proj": 2})
    pm.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        want = pm(input_ids=ids).logits

    save_quantized(model, tmp_path / "base")
    ours = load_quantized(tmp_path / "base")
    report = ip.import_peft_qalora(ours, tmp_path / "peft")
    assert len(report["layers"]) == 6 and report["peft_version"] == peft.__version__
    assert ours.model.layers[0].mlp.down_proj.rank == 2
    assert ours.model.layers[1].self_attn.v_proj.alpha == 2.0
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    assert rel_err(got, want) < 1e-5
    assert all(p.requires_grad == ("lora_" in n) for n, p in ours.named_parameters())

    # converted adapter -> our adapter format -> fresh base: identical outputs
    save_adapter(ours, tmp_path / "ours_adapter")
    again = load_adapter(load_quantized(tmp_path / "base"), tmp_path / "ours_adapter")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, got)

    # the folder-to-folder helper the CLI uses
    rep = ip.convert_peft_qalora(tmp_path / "peft", tmp_path / "base", tmp_path / "out_adapter")
    assert Path(rep["output"]).is_dir()
    third = load_adapter(load_quantized(tmp_path / "base"), tmp_path / "out_adapter")
    with torch.no_grad():
        assert torch.equal(third(input_ids=ids).logits, got)

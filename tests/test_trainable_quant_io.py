"""Trained scales and zeros (dscale, dzero; SPEC "Trainable quantization parameters") through every path that
saves, loads, merges or exports a model: stored bit for bit or folded (rounded once), never dropped.

Oracle: reference.py (merged_scale_zero, weight_lost_fraction) in float64; the exports are read back with the
export tests' own decoders (the MLX layout parsed by hand, GGUF by llama.cpp's ``gguf`` package).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))
from tiny_llm import make_tiny_llama, make_tokenizer  # noqa: E402

import qalora_ext  # noqa: E402
from qalora_ext import reference as ref  # noqa: E402
from qalora_ext.checkpoint import CheckpointError, load_adapter, save_adapter  # noqa: E402
from qalora_ext.checkpoint import files as ckpt_files  # noqa: E402
from qalora_ext.format import round_to_storage  # noqa: E402
from qalora_ext.model import add_adapters, merge_adapters, quantize_model  # noqa: E402
from qalora_ext.nn import QALoRALinear, QuantLinear  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = [(True, True), (True, False), (False, True)]


def _model(rank=4, train_scale=True, train_zero=True, bits=3, group_size=32, scale_dtype=torch.float16,
           zero_dtype=torch.float32, vocab=320, hidden=64, std=3e-3):
    """A tiny quantized Llama with adapters whose every trained quantity is away from its start."""
    model = make_tiny_llama(vocab, hidden=hidden, intermediate=2 * hidden, layers=1)
    quantize_model(model, bits=bits, group_size=group_size, scale_dtype=scale_dtype, zero_dtype=zero_dtype,
                   progress=False)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapters(model, rank=rank, alpha=2 * max(rank, 1), train_scale=train_scale, train_zero=train_zero)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QALoRALinear):
                if m.lora_B is not None:
                    m.lora_B.normal_(0, 0.05)
                for p in (m.dscale, m.dzero):
                    if p is not None:
                        p.normal_(0, std)
    return model.eval(), base_state


def _fresh_base(base_state, vocab=320, hidden=64, bits=3, group_size=32, **kw):
    model = make_tiny_llama(vocab, hidden=hidden, intermediate=2 * hidden, layers=1)
    quantize_model(model, bits=bits, group_size=group_size, progress=False, **kw)
    model.load_state_dict(base_state)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@torch.no_grad()
def _targets(m):
    """The float64 merged scale and zero of a QALoRALinear (reference.py)."""
    return ref.merged_scale_zero(m.base.scale, m.base.zero, m.dscale, m.dzero, m.lora_A, m.lora_B, m.scaling,
                                 m.group_size)


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QALoRALinear)}


# ---------------------------------------------------------------------------
# save_adapter / load_adapter
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [4, 0])
@pytest.mark.parametrize("train_scale,train_zero", FLAGS)
def test_adapter_file_stores_and_restores_them_bit_for_bit(tmp_path, rank, train_scale, train_zero):
    model, base_state = _model(rank, train_scale, train_zero)
    ids = torch.randint(0, 320, (2, 9))
    want = _logits(model, ids)
    out = save_adapter(model, tmp_path / "ad")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["format_version"] == 2
    assert (cfg["train_scale"], cfg["train_zero"], cfg["rank"]) == (train_scale, train_zero, rank)
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    layers = _layers(model)
    expect = {f"{n}.{p}" for n, m in layers.items() for p in m.trainable_parameters()}
    assert keys == expect and dtypes == {torch.float32}
    # Names a PEFT reader could not take for its own (its keys end in .weight).
    assert not any(k.endswith(".weight") for k in keys)
    assert any(k.endswith(".dscale") for k in keys) == train_scale
    assert any(k.endswith(".dzero") for k in keys) == train_zero
    assert any(".lora_" in k for k in keys) == (rank > 0)

    fresh = _fresh_base(base_state)
    assert not torch.equal(_logits(fresh, ids), want)
    load_adapter(fresh, out)
    got_layers = _layers(fresh)
    assert set(got_layers) == set(layers)
    for n, m in layers.items():
        g = got_layers[n]
        assert (g.rank, g.train_scale, g.train_zero) == (rank, train_scale, train_zero)
        for p, t in m.trainable_parameters().items():
            got = g.trainable_parameters()[p]
            assert got.requires_grad and got.dtype == torch.float32
            assert torch.equal(got, t), (n, p)
    assert torch.equal(_logits(fresh, ids), want)

    # Onto a model with the same adapters: copied in place (an optimizer holding them keeps working).
    same, _ = _model(rank, train_scale, train_zero)
    same.load_state_dict(base_state, strict=False)
    held = {n: dict(m.trainable_parameters()) for n, m in _layers(same).items()}
    load_adapter(same, out)
    for n, m in _layers(same).items():
        for p, t in m.trainable_parameters().items():
            assert t is held[n][p] and torch.equal(t, layers[n].trainable_parameters()[p])


def test_adapter_without_them_is_version_1_and_loads_as_before(tmp_path):
    model, base_state = _model(4, False, False)
    out = save_adapter(model, tmp_path / "ad")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["train_scale"] is False and cfg["train_zero"] is False
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        assert all(k.endswith((".lora_A", ".lora_B")) for k in f.keys())
    # A version-1 file written before the keys existed (no train_* anywhere) loads the same.
    for entry in cfg["layers"].values():
        del entry["train_scale"], entry["train_zero"]
    del cfg["train_scale"], cfg["train_zero"]
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = _fresh_base(base_state)
    load_adapter(fresh, out, verify=False)
    ids = torch.randint(0, 320, (2, 9))
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))
    assert all(m.dscale is None and m.dzero is None for m in _layers(fresh).values())


def test_a_version_1_reader_refuses_them_by_version(tmp_path, monkeypatch):
    model, base_state = _model(4, True, True)
    ad = save_adapter(model, tmp_path / "ad")
    q = qalora_ext.save_quantized(model, tmp_path / "q")
    monkeypatch.setattr(ckpt_files, "FORMAT_VERSION", 1)  # what a reader of version 1 checks against
    with pytest.raises(CheckpointError, match="format_version 2 is newer than this qalora_ext reads"):
        load_adapter(_fresh_base(base_state), ad)
    with pytest.raises(CheckpointError, match="format_version 2 is newer than this qalora_ext reads"):
        qalora_ext.load_quantized(q)


def test_load_adapter_checks_their_tensors(tmp_path):
    model, base_state = _model(4, True, True)
    out = save_adapter(model, tmp_path / "ad")
    cfg = json.loads((out / "adapter_config.json").read_text())
    name = next(iter(cfg["layers"]))
    cfg["layers"][name]["train_zero"] = False  # the file still holds its dzero
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected: .*dzero"):
        load_adapter(_fresh_base(base_state), out, verify=False)
    cfg["layers"][name]["train_zero"] = "yes"
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="train_zero must be true or false"):
        load_adapter(_fresh_base(base_state), out, verify=False)
    cfg["layers"][name]["train_zero"] = True
    cfg["layers"][name]["rank"] = 0
    for k in ("train_scale", "train_zero"):
        cfg["layers"][name][k] = False
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rank must be an integer >= 1 unless train_scale or train_zero"):
        load_adapter(_fresh_base(base_state), out, verify=False)


# ---------------------------------------------------------------------------
# save_quantized / load_quantized (unmerged), merge_adapters
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [4, 0])
def test_unmerged_checkpoint_saves_and_loads_them(tmp_path, rank):
    model, _ = _model(rank, True, True)
    ids = torch.randint(0, 320, (2, 9))
    want = _logits(model, ids)
    out = qalora_ext.save_quantized(model, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 2
    entry = next(e["adapter"] for e in qc["modules"].values() if e["adapter"])
    assert (entry["rank"], entry["train_scale"], entry["train_zero"]) == (rank, True, True)
    loaded = qalora_ext.load_quantized(out)
    assert torch.equal(_logits(loaded, ids), want)
    got = _layers(loaded)
    for n, m in _layers(model).items():
        assert torch.equal(got[n].dscale, m.dscale) and torch.equal(got[n].dzero, m.dzero)
        assert got[n].dscale.requires_grad and got[n].dzero.requires_grad
        assert not got[n].base.scale.requires_grad


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_merge_adapters_folds_them_rounded_once_and_saves_version_1(tmp_path, scale_dtype):
    model, _ = _model(4, True, True, scale_dtype=scale_dtype)
    layers = {n: m for n, m in _layers(model).items()}
    targets = {n: _targets(m) for n, m in layers.items()}
    before = {n: (m.base.codes(), m.base.scale.clone(), m.base.zero.clone()) for n, m in layers.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bfloat16 scales lose a visible part of a small dscale
        report = merge_adapters(model)
    for n, (s64, z64) in targets.items():
        merged = model.get_submodule(n)
        assert type(merged) is QuantLinear
        codes, scale, zero = before[n]
        assert torch.equal(merged.codes(), codes)
        assert torch.equal(merged.scale, round_to_storage(s64, scale_dtype))
        assert torch.equal(merged.zero, round_to_storage(z64, torch.float32))
        assert not torch.equal(merged.scale, scale)
        lost = ref.weight_lost_fraction(codes, scale, zero, s64, z64, merged.scale, merged.zero, merged.group_size)
        assert report[n] == pytest.approx(lost, rel=1e-6, abs=1e-12)
    out = qalora_ext.save_quantized(model, tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format_version"] == 1


# ---------------------------------------------------------------------------
# finetune checkpoints: resume is bit for bit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [4, 0])
def test_finetune_resume_restores_them_bit_for_bit(tmp_path, fresh_seed, rank):
    from qalora_ext.training.data import TokenDataset
    from qalora_ext.training.finetune import finetune

    ds = TokenDataset({"input_ids": torch.randint(0, 256, (6, 16))})
    kw = dict(batch_size=2, lr=1e-2, quant_lr=3e-3, save_every=2, seed=fresh_seed % 1000, progress=False,
              loss_plot=False)

    def model():
        torch.manual_seed(fresh_seed)  # the same base and the same adapter init each time
        m = make_tiny_llama(256, hidden=64, intermediate=128, layers=1)
        quantize_model(m, bits=3, group_size=32, progress=False)
        return add_adapters(m, rank=rank, alpha=8, dropout=0.1 if rank else 0.0, train_scale=True,
                            train_zero=True)

    full = model()
    torch.manual_seed(1)
    r_full = finetune(full, ds, steps=4, output_dir=tmp_path / "full", **kw)
    first = model()
    torch.manual_seed(1)
    finetune(first, ds, steps=2, output_dir=tmp_path / "split", **kw)
    resumed = model()
    torch.manual_seed(2)
    r_res = finetune(resumed, ds, steps=4, output_dir=tmp_path / "split", resume=True, **kw)
    assert r_res.resumed_from.name == "checkpoint-000002" and r_res.losses == r_full.losses
    want = {n: p for n, p in full.named_parameters() if p.requires_grad}
    got = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert set(got) == set(want) and any(n.endswith(".dscale") for n in want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert all(want[n].abs().sum() > 0 for n in want if n.endswith((".dscale", ".dzero")))


# ---------------------------------------------------------------------------
# Exports: MLX and GGUF fold dscale into the scales and dzero into the zeros
# ---------------------------------------------------------------------------


def test_mlx_export_folds_them(tmp_path):
    from test_export_mlx import mlx_codes, mlx_dequantize, read_safetensors

    from qalora_ext.interop.mlx_export import export_mlx

    tok_dir = tmp_path / "tok"
    make_tokenizer().save_pretrained(tok_dir)
    for scale_dtype in ("float16", "float32"):
        model, _ = _model(4, True, True, hidden=128, bits=3, group_size=64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # float16: part of the random change rounds away (reported)
            report = export_mlx(model, tmp_path / scale_dtype, tokenizer=tok_dir, scale_dtype=scale_dtype,
                                progress=False)
        tensors, _ = read_safetensors(tmp_path / scale_dtype / "model.safetensors")
        tdt = getattr(torch, scale_dtype)
        num = den = 0.0
        for name, m in _layers(model).items():
            s64, z64 = _targets(m)
            scales = tensors[f"{name}.scales"][1].astype(np.float64)
            biases = tensors[f"{name}.biases"][1].astype(np.float64)
            np.testing.assert_array_equal(scales, round_to_storage(s64, tdt).double().numpy(), err_msg=name)
            np.testing.assert_array_equal(biases, round_to_storage(z64, tdt).double().numpy(), err_msg=name)
            words = tensors[f"{name}.weight"][1]
            codes = m.base.codes()
            np.testing.assert_array_equal(mlx_codes(words, 3, m.in_features), codes.numpy())
            got = mlx_dequantize(words, scales, biases, 3, 64)
            target = ref.dequantize(codes, s64, z64, 64).numpy()
            w = ref.dequantize(codes, m.base.scale, m.base.zero, 64).numpy()
            num += np.square(got - target).sum()
            den += np.square(target - w).sum()
            if scale_dtype == "float16":  # float16 scales: the file's are what merge() stores, bit for bit
                np.testing.assert_array_equal(scales, m.merge().scale.double().numpy(), err_msg=name)
        # Weight space (SPEC): the reported fraction is the trained change's share lost in the file.
        assert report.lost_fraction == pytest.approx(np.sqrt(num / den), rel=1e-6)
        if scale_dtype == "float32":
            assert report.lost_fraction < 1e-5


@pytest.mark.filterwarnings("ignore:export_gguf.*lost more than")
def test_gguf_export_folds_them(tmp_path):
    gguf = pytest.importorskip("gguf")
    from test_export_gguf import PROJ, hf_row_of_gguf_row

    from qalora_ext.interop.gguf_export import export_gguf

    tok = make_tokenizer()
    model, _ = _model(4, True, True, bits=4, group_size=32, vocab=len(tok))
    rep = export_gguf(model, tmp_path / "m.gguf", tok, progress=False)
    r = gguf.GGUFReader(os.fspath(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in r.tensors}
    cfg = model.config
    num = den = 0.0
    for hf, g in PROJ.items():
        m = model.model.layers[0].get_submodule(hf)
        t = tensors[f"blk.0.{g}.weight"]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(m.out_features, m.in_features)
        heads = cfg.num_attention_heads if g == "attn_q" else cfg.num_key_value_heads if g == "attn_k" else 0
        if heads:
            got = got[np.argsort(hf_row_of_gguf_row(m.out_features, heads))]
        s64, z64 = _targets(m)
        codes = m.base.codes()
        d = np.repeat(s64.numpy().astype(np.float16).astype(np.float32), 32, axis=1)  # numpy: rounded once
        mm = np.repeat(z64.numpy().astype(np.float16).astype(np.float32), 32, axis=1)
        np.testing.assert_array_equal(got, (d * codes.numpy().astype(np.float32) + mm).astype(np.float32),
                                      err_msg=g)
        # float16 scales: d is what merge() stores, bit for bit.
        np.testing.assert_array_equal(d[:, ::32], m.merge().scale.float().numpy())
        target = ref.dequantize(codes, s64, z64, 32).numpy()
        w = ref.dequantize(codes, m.base.scale, m.base.zero, 32).numpy()
        num += np.square(got.astype(np.float64) - target).sum()
        den += np.square(target - w).sum()
    assert rep.adapters_merged == 7
    assert rep.adapter_lost_fraction == pytest.approx(np.sqrt(num / den), rel=1e-6)


def test_gguf_refuses_merged_scales_float16_cannot_hold_without_lossy(tmp_path):
    pytest.importorskip("gguf")
    from qalora_ext.interop.gguf_export import export_gguf

    tok = make_tokenizer()
    model, _ = _model(0, True, False, bits=4, group_size=32, vocab=len(tok), scale_dtype=torch.float32)
    with torch.no_grad():  # float32 scales that are float16 numbers: exportable until dscale moves them
        for m in _layers(model).values():
            m.base.scale.copy_(m.base.scale.half().float())
    with pytest.raises(ValueError, match=r"merged scales \(scale \+ dscale\).*lossy=True"):
        export_gguf(model, tmp_path / "m.gguf", tok, progress=False)
    assert not (tmp_path / "m.gguf").exists()
    rep = export_gguf(model, tmp_path / "m.gguf", tok, lossy=True, progress=False)
    assert rep.lossy_scales == 7


# ---------------------------------------------------------------------------
# Importers and FSDP helpers: no silent drop, no AttributeError on rank 0
# ---------------------------------------------------------------------------


def test_peft_import_refuses_to_drop_them(tmp_path):
    from qalora_ext.interop.peft_import import import_peft_qalora

    model, _ = _model(4, True, False)
    name, layer = next(iter(_layers(model).items()))
    peft = tmp_path / "peft"
    peft.mkdir()
    groups = layer.in_features // layer.group_size
    (peft / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "use_qalora": True, "qalora_group_size": 32, "r": 2, "lora_alpha": 4,
        "target_modules": [name.rsplit(".", 1)[-1]]}))
    from safetensors.torch import save_file

    save_file({f"base_model.model.{name}.lora_A.weight": torch.randn(2, groups),
               f"base_model.model.{name}.lora_B.weight": torch.randn(layer.out_features, 2)},
              str(peft / "adapter_model.safetensors"))
    dscale = layer.dscale.detach().clone()
    with pytest.raises(ValueError, match="holds trained scales/zeros"):
        import_peft_qalora(model, peft)
    assert model.get_submodule(name) is layer and torch.equal(layer.dscale, dscale)


def test_full_adapters_passes_over_rank_0_layers():
    from qalora_ext.training.fsdp import full_adapters

    model, _ = _model(0, True, True)
    with full_adapters(model) as m:  # unsharded: nothing to gather, and no AttributeError on lora_A None
        assert m is model


def test_finetune_resume_refuses_other_trained_quantities(tmp_path, fresh_seed):
    from qalora_ext.training.data import TokenDataset
    from qalora_ext.training.finetune import finetune

    ds = TokenDataset({"input_ids": torch.randint(0, 256, (4, 16))})
    kw = dict(batch_size=2, lr=1e-2, save_every=1, progress=False, loss_plot=False)

    def model(**flags):
        m = make_tiny_llama(256, hidden=64, intermediate=128, layers=1)
        quantize_model(m, bits=4, group_size=32, progress=False)
        return add_adapters(m, rank=2, alpha=4, **flags)

    finetune(model(), ds, steps=1, output_dir=tmp_path / "plain", **kw)
    with pytest.raises(ValueError, match=r"quant_parameters: checkpoint None, now \['dscale'\]"):
        finetune(model(train_scale=True), ds, steps=2, output_dir=tmp_path / "plain", resume=True, **kw)
    finetune(model(), ds, steps=2, output_dir=tmp_path / "plain", resume=True, **kw)  # as before
    finetune(model(train_zero=True), ds, steps=1, output_dir=tmp_path / "z", **kw)
    with pytest.raises(ValueError, match=r"quant_parameters: checkpoint \['dzero'\], now None"):
        finetune(model(), ds, steps=2, output_dir=tmp_path / "z", resume=True, **kw)


def test_transformers_from_pretrained_loads_them_trainable(tmp_path):
    import qalora_ext.interop.hf  # noqa: F401  (registers quant_method qalora_ext with transformers)
    from transformers import AutoModelForCausalLM

    model, _ = _model(0, True, True)
    ids = torch.randint(0, 320, (2, 9))
    want = _logits(model, ids)
    out = qalora_ext.save_quantized(model, tmp_path / "q")
    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert torch.equal(_logits(hf, ids), want)
    trained = {n for n, p in hf.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad} and trained
    for n, m in _layers(model).items():
        assert torch.equal(hf.get_submodule(n).dscale, m.dscale)

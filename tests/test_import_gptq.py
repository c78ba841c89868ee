"""GPTQ checkpoint import: layouts, zero conventions, act-order, whole models.

The oracle is GPTQ's published layout and math, written here independently of
the importer: a numpy packer that follows AutoGPTQ's ``QuantLinear.pack`` word
loops (including the 3-bit 10 + 1 + 10 + 1 + 10 straddling pattern), and the
GPTQ dequantization ``s * (q - z)`` in float32 (and float64). Set
QALORA_AUTOGPTQ_PYTHON to an interpreter with auto-gptq installed to also
check against checkpoints written by AutoGPTQ's own packer.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from qalora_ext.interop import gptq_import as ig
from qalora_ext import load_quantized, ops, reference, save_quantized
from qalora_ext.nn import QuantLinear

# ---------------------------------------------------------------------------
# Independent GPTQ packer (AutoGPTQ's published word loops, numpy uint32)
# ---------------------------------------------------------------------------


def _pack_words(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack values (M, C) along axis 0 into (M*bits/32, C) uint32, AutoGPTQ's loops."""
    values = values.astype(np.uint32)
    out = np.zeros((values.shape[0] // 32 * bits, values.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4):
            for j in range(i, i + 32 // bits):
                out[row] |= values[j] << np.uint32(bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 codes in 3 words, codes 10 and 21 straddle
            for j in range(i, i + 10):
                out[row] |= values[j] << np.uint32(3 * (j - i))
            i += 10
            out[row] |= values[i] << np.uint32(30)
            row += 1
            out[row] |= (values[i] >> np.uint32(2)) & np.uint32(1)
            i += 1
            for j in range(i, i + 10):
                out[row] |= values[j] << np.uint32(3 * (j - i) + 1)
            i += 10
            out[row] |= values[i] << np.uint32(31)
            row += 1
            out[row] |= (values[i] >> np.uint32(1)) & np.uint32(3)
            i += 1
            for j in range(i, i + 10):
                out[row] |= values[j] << np.uint32(3 * (j - i) + 2)
            i += 10
            row += 1
    return out


def gptq_qweight(codes_nk: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (N, K) -> GPTQ qweight (K*b/32, N) int32 (packed along K)."""
    return torch.from_numpy(_pack_words(codes_nk.t().numpy(), bits).view(np.int32).copy())


def gptq_qzeros(stored_ln: torch.Tensor, bits: int) -> torch.Tensor:
    """stored zero fields (L, N) -> GPTQ qzeros (L, N*b/32) int32 (packed along N)."""
    return torch.from_numpy(_pack_words(stored_ln.t().numpy(), bits).T.view(np.int32).copy())


def store_zeros(z: torch.Tensor, bits: int, convention: str) -> torch.Tensor:
    """What a writer stores: z (v2) or z - 1 masked to b bits (v1, as GPTQModel writes)."""
    return z if convention == "gptq_v2" else (z - 1) & ((1 << bits) - 1)


def random_gptq_layer(n, k, bits, group_size, zeros="random", scale_dtype=torch.float16):
    """Random codes (N, K), zeros (L, N) and positive scales (L, N) of a GPTQ layer."""
    maxq = (1 << bits) - 1
    groups = k // group_size
    codes = torch.randint(0, maxq + 1, (n, k), dtype=torch.int64)
    if zeros == "sym":
        z = torch.full((groups, n), 1 << (bits - 1), dtype=torch.int64)
    else:
        z = torch.randint(0, maxq + 1, (groups, n), dtype=torch.int64)
        # Both extremes in every layer: some groups at 0, some at 2^b - 1.
        z[0, : n // 2] = 0
        z[-1, n // 2:] = maxq
        z[:, 0] = 0
        z[:, -1] = maxq
    scales = (torch.rand(groups, n) * 0.02 + 1e-3).to(scale_dtype)
    return codes, z, scales


def gptq_dequant_f32(codes, z, scales, g_idx):
    """GPTQ's dequantization s[g] * (q - z[g]) in float32, g = g_idx[k]; (N, K)."""
    s = scales.float()[g_idx].t()  # (N, K)
    zz = z[g_idx].t().float()
    return s * (codes.float() - zz)


def gptq_dequant_f64(codes, z, scales, g_idx):
    s = scales.double()[g_idx].t()
    return s * (codes.double() - z[g_idx].t().double())


# ---------------------------------------------------------------------------
# Worked examples of the published layout
# ---------------------------------------------------------------------------


def test_worked_example_4bit():
    codes = torch.arange(1, 9, dtype=torch.int64).repeat(4).view(1, 32)  # one output channel
    qw = gptq_qweight(codes, 4)
    assert qw.shape == (4, 1)
    assert int(qw[0, 0]) & 0xFFFFFFFF == 0x87654321
    assert torch.equal(ig.unpack_gptq_qweight(qw, 4).long(), codes)


@pytest.mark.parametrize("pos,value,words", [
    (10, 0b111, (0xC0000000, 0x00000001, 0)),  # 2 low bits end word 0, high bit starts word 1
    (21, 0b101, (0, 0x80000000, 0x00000002)),  # low bit ends word 1, 2 high bits start word 2
    (31, 0b011, (0, 0, 0x60000000)),
])
def test_worked_example_3bit_straddle(pos, value, words):
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, pos] = value
    qw = gptq_qweight(codes, 3)
    assert [int(w) & 0xFFFFFFFF for w in qw[:, 0]] == list(words)
    assert torch.equal(ig.unpack_gptq_qweight(qw, 3).long(), codes)
    # The same stream packed along N (qzeros)
    qz = gptq_qzeros(codes, 3)
    assert [int(w) & 0xFFFFFFFF for w in qz[0]] == list(words)
    assert torch.equal(ig.unpack_gptq_qzeros(qz, 3, 32), codes)


def _bigint_stream(values, bits: int, words: int) -> list[int]:
    """Pack values as one Python-int bitstream (value i at bit bits*i), cut into signed 32-bit words."""
    acc = 0
    for i, v in enumerate(values):
        acc |= int(v) << (bits * i)
    out = [(acc >> (32 * w)) & 0xFFFFFFFF for w in range(words)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in out]


@pytest.mark.parametrize("bits,n", [(2, 48), (3, 40), (4, 48), (3, 96)])
def test_qzeros_stream_any_out_features(bits, n):
    """qzeros rows are one bitstream along N; N need not fill whole 32-code chunks."""
    z = torch.randint(0, 1 << bits, (3, n))
    words = -(-n * bits // 32)
    qz = torch.tensor([_bigint_stream(row, bits, words) for row in z.tolist()], dtype=torch.int32)
    assert torch.equal(ig.unpack_gptq_qzeros(qz, bits, n), z)
    # and qweight columns are the same stream along K
    k = 64
    codes = torch.randint(0, 1 << bits, (n, k))
    cols = [_bigint_stream(codes[j].tolist(), bits, k * bits // 32) for j in range(n)]
    qw = torch.tensor(cols, dtype=torch.int32).t().contiguous()
    assert torch.equal(ig.unpack_gptq_qweight(qw, bits).long(), codes)


# ---------------------------------------------------------------------------
# One layer: bits x conventions x zeros at both extremes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("convention", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("zeros", ["random", "sym"])
def test_convert_layer_bit_exact(bits, convention, zeros):
    group_size = int(np.random.default_rng(torch.initial_seed()).choice([32, 64, 128]))
    n, k = 64, group_size * 3
    codes, z, scales = random_gptq_layer(n, k, bits, group_size, zeros)
    qweight = gptq_qweight(codes, bits)
    qzeros = gptq_qzeros(store_zeros(z, bits, convention), bits)
    g_idx = torch.arange(k, dtype=torch.int32) // group_size
    expect_warning = convention == "gptq" and bool((z == 0).any())
    if expect_warning:
        with pytest.warns(UserWarning, match="zero minus one"):
            packed, scale, zero = ig.convert_gptq_layer(qweight, qzeros, scales, g_idx, bits, group_size, convention)
    else:
        packed, scale, zero = ig.convert_gptq_layer(qweight, qzeros, scales, g_idx, bits, group_size, convention)

    assert packed.dtype == torch.int32 and scale.dtype == torch.float16 and zero.dtype == torch.float32
    assert torch.equal(reference.unpack(packed, bits, k).long(), codes)
    assert torch.equal(scale, scales.t())
    want = gptq_dequant_f32(codes, z, scales, g_idx.long())
    # Our kernels and the float64 reference of our format, both bit for bit.
    assert torch.equal(ops.dequantize(packed, scale, zero, bits, group_size), want)
    ref = reference.dequantize(reference.unpack(packed, bits, k), scale, zero, group_size)
    assert torch.equal(ref, gptq_dequant_f64(codes, z, scales, g_idx.long()))
    assert torch.equal(ref.float(), want)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_v1_stored_max_field_readings(bits):
    """v1 stores z - 1: a stored 2^b - 1 is a wrapped z = 0 (default) or z = 2^b (AutoGPTQ kernels)."""
    n, k, g = 32, 64, 32
    codes, z, scales = random_gptq_layer(n, k, bits, g)
    stored = (z - 1) & ((1 << bits) - 1)
    qweight, qzeros = gptq_qweight(codes, bits), gptq_qzeros(stored, bits)
    gi = torch.arange(k) // g
    with pytest.warns(UserWarning, match="v1_wrap_zeros=False"):
        p, s, zero = ig.convert_gptq_layer(qweight, qzeros, scales, None, bits, g, "gptq")
    assert torch.equal(ops.dequantize(p, s, zero, bits, g), gptq_dequant_f32(codes, z, scales, gi))
    z_nowrap = stored + 1  # 0 -> 2^b
    assert int(z_nowrap.max()) == 1 << bits
    with pytest.warns(UserWarning, match="v1_wrap_zeros=True"):
        p, s, zero = ig.convert_gptq_layer(qweight, qzeros, scales, None, bits, g, "v1", v1_wrap_zeros=False)
    assert torch.equal(ops.dequantize(p, s, zero, bits, g), gptq_dequant_f32(codes, z_nowrap, scales, gi))


def test_bf16_and_fp32_scales():
    bits, g, n, k = 4, 32, 32, 128
    codes, z, scales = random_gptq_layer(n, k, bits, g, scale_dtype=torch.bfloat16)
    qw, qz = gptq_qweight(codes, bits), gptq_qzeros(z, bits)
    gi = torch.arange(k) // g
    p, s, zero = ig.convert_gptq_layer(qw, qz, scales, None, bits, g, "gptq_v2")
    assert s.dtype == torch.bfloat16
    assert torch.equal(ops.dequantize(p, s, zero, bits, g), gptq_dequant_f32(codes, z, scales, gi))
    # float32 scales: -s*z and s*q each round once, so within an ulp or so of s*(q-z).
    s32 = torch.rand(k // g, n) * 0.02 + 1e-3
    p, s, zero = ig.convert_gptq_layer(qw, qz, s32, None, bits, g, "gptq_v2")
    assert s.dtype == torch.float32
    torch.testing.assert_close(ops.dequantize(p, s, zero, bits, g), gptq_dequant_f32(codes, z, s32, gi),
                               rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------
# Act-order
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_act_order_static_groups_accepted(bits):
    """g_idx constant on every run of G channels (static groups, maybe relabelled) converts exactly."""
    g, n, k = 64, 32, 256
    codes, z, scales = random_gptq_layer(n, k, bits, g)
    qw, qz = gptq_qweight(codes, bits), gptq_qzeros(z, bits)
    trivial = torch.arange(k, dtype=torch.int32) // g
    relabel = torch.randperm(k // g).to(torch.int32)[trivial.long()]  # groups in another order
    for gi in (trivial, relabel):
        p, s, zero = ig.convert_gptq_layer(qw, qz, scales, gi, bits, g, "gptq_v2")
        assert torch.equal(ops.dequantize(p, s, zero, bits, g), gptq_dequant_f32(codes, z, scales, gi.long()))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("convention", ["gptq", "gptq_v2"])
def test_act_order_permuted_refused(bits, convention):
    g, n, k = 32, 32, 128
    codes, z, scales = random_gptq_layer(n, k, bits, g)
    qw, qz = gptq_qweight(codes, bits), gptq_qzeros(store_zeros(z, bits, convention), bits)
    perm = torch.randperm(k)
    while bool((perm // g == torch.arange(k) // g).all()):
        perm = torch.randperm(k)
    gi = (perm // g).to(torch.int32)  # desc_act: channel k belongs to the group of its rank
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.up_proj: act-order.*not contiguous.*desc_act=False"):
        ig.convert_gptq_layer(qw, qz, scales, gi, bits, g, convention, name="model.layers.0.mlp.up_proj")


# ---------------------------------------------------------------------------
# Layer-level errors
# ---------------------------------------------------------------------------


def test_layer_errors():
    bits, g, n, k = 4, 32, 32, 64
    codes, z, scales = random_gptq_layer(n, k, bits, g)
    qw, qz = gptq_qweight(codes, bits), gptq_qzeros(z, bits)
    with pytest.raises(ValueError, match=r"unsupported bits=8.*2, 3, 4"):
        ig.convert_gptq_layer(qw, qz, scales, None, 8, g, "gptq")
    with pytest.raises(ValueError, match=r"group_size=-1.*32, 64, 128"):
        ig.convert_gptq_layer(qw, qz, scales, None, bits, -1, "gptq")
    with pytest.raises(ValueError, match=r"group_size=256.*32, 64, 128"):
        ig.convert_gptq_layer(qw, qz, scales, None, bits, 256, "gptq")
    with pytest.raises(ValueError, match="convention"):
        ig.convert_gptq_layer(qw, qz, scales, None, bits, g, "marlin")
    with pytest.raises(TypeError, match="int32"):
        ig.convert_gptq_layer(qw.long(), qz, scales, None, bits, g, "gptq")
    with pytest.raises(ValueError, match="qweight has shape"):
        ig.convert_gptq_layer(qw, qz, scales, None, 3, g, "gptq", in_features=k)
    with pytest.raises(ValueError, match="qzeros has shape"):
        ig.convert_gptq_layer(qw, qz[:1], scales, None, bits, g, "gptq")
    with pytest.raises(ValueError, match="layer: qzeros has 5 columns"):
        ig.convert_gptq_layer(qw, torch.cat([qz, qz[:, :1]], 1), scales, None, bits, g, "gptq")
    with pytest.raises(ValueError, match="scales has shape"):
        ig.convert_gptq_layer(qw, qz, scales[:, :16], None, bits, g, "gptq")
    with pytest.raises(ValueError, match="scales has 1 groups"):
        ig.convert_gptq_layer(qw, qz[:1], scales[:1], None, bits, g, "gptq")
    with pytest.raises(ValueError, match="g_idx has 10 entries"):
        ig.convert_gptq_layer(qw, qz, scales, torch.zeros(10, dtype=torch.int32), bits, g, "gptq")
    with pytest.raises(ValueError, match="g_idx values"):
        ig.convert_gptq_layer(qw, qz, scales, torch.full((k,), 5, dtype=torch.int32), bits, g, "gptq")
    with pytest.raises(ValueError, match="zero_dtype"):
        ig.convert_gptq_layer(qw, qz, scales, None, bits, g, "gptq", zero_dtype=torch.float16)
    with pytest.raises(ValueError, match="non-finite"):
        ig.convert_gptq_layer(qw, qz, scales.clone().fill_(float("inf")), None, bits, g, "gptq")


# ---------------------------------------------------------------------------
# Whole checkpoints
# ---------------------------------------------------------------------------


def _tiny_llama(bias: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, attention_bias=bias, bos_token_id=0, eos_token_id=2,
                         pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model


def _gptq_quantize(w: torch.Tensor, bits: int, group_size: int):
    """Asymmetric min-max GPTQ-style quantization: codes (N, K), z (L, N), s (L, N) fp16."""
    n, k = w.shape
    maxq = (1 << bits) - 1
    wg = w.view(n, k // group_size, group_size)
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    s = ((hi - lo) / maxq).clamp(min=1e-5).half()
    z = torch.round(-lo / s.float()).clamp(0, maxq).long()
    q = torch.clamp(torch.round(wg / s.float()[..., None]) + z[..., None], 0, maxq).long()
    return q.view(n, k), z.t().contiguous(), s.t().contiguous()


def write_gptq_checkpoint(folder: Path, bits: int, group_size: int, convention: str = "gptq",
                          bias: bool = True, shards: int = 2, config_in: str = "quantize_config.json",
                          desc_act: bool = False):
    """A tiny Llama as a GPTQ checkpoint folder; returns the float reference model (GPTQ-dequantized weights)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = _tiny_llama(bias)
    tensors = {}
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for name in linear_names:
            lin = model.get_submodule(name)
            q, z, s = _gptq_quantize(lin.weight.float(), bits, group_size)
            k = lin.in_features
            tensors[f"{name}.qweight"] = gptq_qweight(q, bits)
            tensors[f"{name}.qzeros"] = gptq_qzeros(store_zeros(z, bits, convention), bits)
            tensors[f"{name}.scales"] = s
            tensors[f"{name}.g_idx"] = torch.arange(k, dtype=torch.int32) // group_size
            if lin.bias is not None:
                lin.bias.copy_(lin.bias.half().float())
                tensors[f"{name}.bias"] = lin.bias.half().clone()
            # The reference layer holds GPTQ's float32 dequantization.
            lin.weight.copy_(gptq_dequant_f32(q, z, s, torch.arange(k) // group_size))
        for key, t in model.state_dict().items():
            prefix = key.rpartition(".")[0]
            if prefix in linear_names or key == "lm_head.weight":
                continue
            t16 = t.half()
            tensors[key] = t16.clone()
            t.copy_(t16.float())  # the reference sees what the checkpoint stores
    keys = sorted(tensors)
    parts = [keys[i::shards] for i in range(shards)]
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, part in enumerate(parts):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    qc = {"bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": False, "static_groups": False,
          "damp_percent": 0.01, "true_sequential": True, "quant_method": "gptq", "checkpoint_format": convention}
    config = model.config.to_dict()
    config["torch_dtype"] = "float16"
    if config_in == "quantize_config.json":
        (folder / "quantize_config.json").write_text(json.dumps(qc))
    else:
        config["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(config))
    return model, tensors


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("bits,group_size,convention,config_in,shards", [
    (4, 32, "gptq", "quantize_config.json", 2),
    (3, 64, "gptq_v2", "config.json", 1),
    (2, 32, "gptq", "config.json", 3),
])
def test_import_tiny_model_round_trip(tmp_path, one_thread, bits, group_size, convention, config_in, shards):
    ref_model, tensors = write_gptq_checkpoint(tmp_path / "gptq", bits, group_size, convention,
                                               config_in=config_in, shards=shards)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ig.import_gptq(tmp_path / "gptq", dtype=torch.float32, progress=False)
    # The only warning allowed: a v1 zero field at 2^b - 1 (a group without negative weights)
    assert all("zero minus one" in str(w.message) for w in caught), [str(w.message) for w in caught]
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quant) == 2 * 7
    for name, layer in quant.items():
        assert layer.bits == bits and layer.group_size == group_size
        assert layer.scale.dtype == torch.float16 and layer.zero.dtype == torch.float32
        # bit for bit GPTQ's float32 dequantization
        assert torch.equal(layer.dequantize(), ref_model.get_submodule(name).weight), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = model.qalora_import_report
    assert report["convention"] == convention and len(report["layers"]) == 14

    ids = torch.randint(0, 96, (2, 9))
    ref = _logits(ref_model, ids)
    got = _logits(model, ids)
    assert ((got.double() - ref.double()).norm() / ref.double().norm()).item() < 1e-5

    out = save_quantized(model, tmp_path / "ours")
    loaded = load_quantized(out)
    assert torch.equal(_logits(loaded, ids), got)
    for name, layer in quant.items():
        other = loaded.get_submodule(name)
        assert torch.equal(other.packed, layer.packed) and torch.equal(other.scale, layer.scale)
        assert torch.equal(other.zero, layer.zero)


def test_convert_gptq_folder_to_folder(tmp_path, one_thread):
    """The CLI's entry point: GPTQ folder in, qalora_ext checkpoint (with the tokenizer) out."""
    from tiny_llm import make_tokenizer

    src = tmp_path / "gptq"
    write_gptq_checkpoint(src, 4, 32, "gptq_v2", shards=1)
    make_tokenizer().save_pretrained(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = ig.convert_gptq(src, tmp_path / "out", dtype=torch.float32, progress=False)
    out = Path(report["output"])
    assert "tokenizer.json" in report["copied_files"] and (out / "tokenizer.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "qalora_ext"
    assert cfg["quantization_config"]["bits"] == 4 and cfg["quantization_config"]["zero_dtype"] == "float32"
    model = load_quantized(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14


def test_dynamic_per_module_overrides(tmp_path, one_thread):
    """GPTQModel's `dynamic`: a module quantized with other bits than the base config."""
    from safetensors.torch import save_file

    src = tmp_path / "gptq"
    ref_model, tensors = write_gptq_checkpoint(src, 4, 32, "gptq_v2", shards=1)
    name = "model.layers.1.mlp.down_proj"
    lin = ref_model.get_submodule(name)
    codes, z, scales = random_gptq_layer(lin.out_features, lin.in_features, 2, 64)
    tensors[f"{name}.qweight"] = gptq_qweight(codes, 2)
    tensors[f"{name}.qzeros"] = gptq_qzeros(z, 2)
    tensors[f"{name}.scales"] = scales
    tensors[f"{name}.g_idx"] = torch.arange(lin.in_features, dtype=torch.int32) // 64
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    _edit_json(src / "quantize_config.json",
               dynamic={r"-:.*lm_head": {}, r"+:.*\.1\.mlp\.down_proj": {"bits": 2, "group_size": 64}})
    model = ig.import_gptq(src, progress=False)
    layer = model.get_submodule(name)
    assert (layer.bits, layer.group_size) == (2, 64)
    gi = torch.arange(lin.in_features) // 64
    assert torch.equal(layer.dequantize(), gptq_dequant_f32(codes, z, scales, gi))
    assert model.model.layers[0].mlp.down_proj.bits == 4


def test_import_keeps_stored_dtypes(tmp_path, one_thread):
    write_gptq_checkpoint(tmp_path / "gptq", 4, 32, "gptq_v2", shards=1)
    model = ig.import_gptq(tmp_path / "gptq", progress=False)
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert model.model.layers[0].self_attn.q_proj.bias.dtype == torch.float32  # QuantLinear bias is float32
    assert model.model.layers[0].self_attn.q_proj.scale.dtype == torch.float16


def test_import_act_order_checkpoint_refused(tmp_path):
    _, tensors = write_gptq_checkpoint(tmp_path / "gptq", 4, 32, "gptq_v2", shards=1, desc_act=True)
    from safetensors.torch import save_file

    k = tensors["model.layers.1.mlp.down_proj.g_idx"].numel()
    tensors["model.layers.1.mlp.down_proj.g_idx"] = (torch.randperm(k) // 32).to(torch.int32)
    save_file(tensors, str(tmp_path / "gptq" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj: act-order"):
        ig.import_gptq(tmp_path / "gptq", progress=False)


def _edit_json(path: Path, **changes):
    d = json.loads(path.read_text())
    target = d["quantization_config"] if "quantization_config" in d else d
    for k, v in changes.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = v
    path.write_text(json.dumps(d))


def test_import_errors(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "gptq"
    _, tensors = write_gptq_checkpoint(src, 4, 32, "gptq_v2", shards=1)
    qc = src / "quantize_config.json"

    _edit_json(qc, bits=8)
    with pytest.raises(ValueError, match=r"unsupported bits=8"):
        ig.import_gptq(src, progress=False)
    _edit_json(qc, bits=4, group_size=-1)
    with pytest.raises(ValueError, match=r"group_size=-1.*32, 64, 128"):
        ig.import_gptq(src, progress=False)
    _edit_json(qc, group_size=32, checkpoint_format="marlin")
    with pytest.raises(ValueError, match="marlin"):
        ig.import_gptq(src, progress=False)
    _edit_json(qc, checkpoint_format=None, format="gptq_v2", quant_method="awq")
    with pytest.raises(ValueError, match="quant_method 'awq'"):
        ig.import_gptq(src, progress=False)
    _edit_json(qc, quant_method="gptq", group_size=64)
    with pytest.raises(ValueError, match=r"scales has \d+ groups.*Wrong group_size"):
        ig.import_gptq(src, progress=False)
    _edit_json(qc, group_size=32)

    broken = dict(tensors)
    del broken["model.layers.0.self_attn.k_proj.qzeros"]
    save_file(broken, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj: missing tensor.*qzeros"):
        ig.import_gptq(src, progress=False)

    broken = dict(tensors)
    del broken["model.norm.weight"]
    save_file(broken, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no tensor for.*model\.norm\.weight"):
        ig.import_gptq(src, progress=False)

    broken = dict(tensors)
    broken["model.layers.0.mlp.gate_proj.scales"] = broken["model.layers.0.mlp.gate_proj.scales"][:, :64].contiguous()
    save_file(broken, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj: scales has shape"):
        ig.import_gptq(src, progress=False)

    broken = dict(tensors)
    broken["model.layers.0.bogus.weight"] = torch.zeros(2)
    save_file(broken, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no place for.*bogus"):
        ig.import_gptq(src, progress=False)

    (src / "model.safetensors").unlink()
    torch.save({}, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors"):
        ig.import_gptq(src, progress=False)

    qc.unlink()
    with pytest.raises(ValueError, match="not a GPTQ checkpoint"):
        ig.import_gptq(src, progress=False)
    with pytest.raises(FileNotFoundError):
        ig.import_gptq(tmp_path / "nowhere", progress=False)


def test_config_sources_must_agree(tmp_path):
    src = tmp_path / "gptq"
    write_gptq_checkpoint(src, 4, 32, "gptq_v2", shards=1)
    d = json.loads((src / "config.json").read_text())
    d["quantization_config"] = {"bits": 4, "group_size": 64, "quant_method": "gptq"}
    (src / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="group_size=32 but config.json"):
        ig.read_gptq_config(src)
    d["quantization_config"]["group_size"] = 32
    (src / "config.json").write_text(json.dumps(d))
    cfg = ig.read_gptq_config(src)
    assert cfg["convention"] == "gptq_v2" and cfg["source"] == "quantize_config.json"
    _edit_json(src / "quantize_config.json", checkpoint_format=None)
    assert ig.read_gptq_config(src)["convention"] == "gptq"  # no format: AutoGPTQ v1


# ---------------------------------------------------------------------------
# Against the real AutoGPTQ packer (optional: needs an interpreter with auto-gptq)
# ---------------------------------------------------------------------------

_AUTOGPTQ_SCRIPT = textwrap.dedent("""
    import sys, types, importlib.util, json
    # auto_gptq/__init__ imports transformers APIs that transformers 5 removed;
    # its QuantLinear modules do not need them.
    spec = importlib.util.find_spec("auto_gptq")
    pkg = types.ModuleType("auto_gptq"); pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["auto_gptq"] = pkg
    import torch
    from safetensors.torch import save_file
    from auto_gptq.nn_modules.qlinear.qlinear_cuda_old import QuantLinear
    out, seed = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(seed)
    tensors, ref = {}, {}
    for bits in (2, 3, 4):
        for g in (32, 128):
            k, n = 256, 64
            maxq = 2 ** bits - 1
            lin = torch.nn.Linear(k, n, bias=True).half()
            scales = (torch.rand(n, k // g) * 0.02 + 1e-3).half()
            # zeros 1..maxq: AutoGPTQ's v1 packer corrupts neighbours for z = 0 (unmasked -1)
            zeros = torch.randint(1, maxq + 1, (n, k // g))
            q = torch.randint(0, maxq + 1, (n, k))
            s_full = scales.float().repeat_interleave(g, 1)
            z_full = zeros.float().repeat_interleave(g, 1)
            lin.weight.data = (s_full * (q.float() - z_full)).half()
            ql = QuantLinear(bits, g, k, n, True, use_cuda_fp16=False)
            ql.pack(lin.float(), scales.float(), zeros.clone(), None)
            ql.scales = ql.scales.half()
            name = f"b{bits}g{g}"
            for t in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                tensors[f"{name}.{t}"] = getattr(ql, t).contiguous()
            # AutoGPTQ's own dequantization (its torch path, float16), read out with x = I
            eye = torch.eye(k, dtype=torch.float16)
            ql.bias = None
            ref[name] = ql(eye).t().contiguous()
    save_file(tensors, out + "/layers.safetensors")
    save_file(ref, out + "/autogptq_dequant.safetensors")
""")


def _autogptq_python():
    exe = os.environ.get("QALORA_AUTOGPTQ_PYTHON")
    if not exe:
        pytest.skip("set QALORA_AUTOGPTQ_PYTHON to a python with auto-gptq to check against AutoGPTQ's packer")
    return exe


@pytest.mark.slow
def test_against_autogptq_packer(tmp_path, fresh_seed):
    from safetensors.torch import load_file

    exe = _autogptq_python()
    script = tmp_path / "write.py"
    script.write_text(_AUTOGPTQ_SCRIPT)
    res = subprocess.run([exe, str(script), str(tmp_path), str(fresh_seed)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    layers = load_file(str(tmp_path / "layers.safetensors"))
    ref = load_file(str(tmp_path / "autogptq_dequant.safetensors"))
    for bits in (2, 3, 4):
        for g in (32, 128):
            name = f"b{bits}g{g}"
            p, s, zero = ig.convert_gptq_layer(layers[f"{name}.qweight"], layers[f"{name}.qzeros"],
                                               layers[f"{name}.scales"], layers[f"{name}.g_idx"], bits, g, "gptq")
            w = ops.dequantize(p, s, zero, bits, g)
            # AutoGPTQ computes s * (q - z) in float16: our exact float32 value rounded once to float16.
            assert torch.equal(w.half(), ref[name]), name


# ---------------------------------------------------------------------------
# Against GPTQModel end to end (optional: needs an interpreter with gptqmodel)
# ---------------------------------------------------------------------------

_GPTQMODEL_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from tiny_llm import save_tiny_llama
    from safetensors.torch import save_file
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer
    out, bits, g, fmt, sym, act = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
    torch.manual_seed(int(sys.argv[8]))
    src = save_tiny_llama(out + "/float", hidden=128, intermediate=256)
    tok = AutoTokenizer.from_pretrained(src)
    texts = ["def f(x): return x * 2", "The quick brown fox jumps over the lazy dog. " * 4,
             "import os\\nprint(os.getcwd())", "class A:\\n    pass\\n" * 3] * 4
    calib = [{"input_ids": tok(t)["input_ids"], "attention_mask": [1] * len(tok(t)["input_ids"])} for t in texts]
    qc = QuantizeConfig(bits=bits, group_size=g, format=fmt, sym=sym == "sym", desc_act=act != "none",
                        static_groups=act == "static")
    model = GPTQModel.load(str(src), qc, device="cpu")
    model.quantize(calib, batch_size=1)
    model.save(out + "/gptq")
    # GPTQModel's own dequantization (float16 scales, TorchLinear kernel) and logits
    m = GPTQModel.load(out + "/gptq", device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    ref = {n: mod.dequantize_weight().t().contiguous() for n, mod in m.model.named_modules()
           if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight")}
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        ref["__logits__"] = m.model(input_ids=ids).logits.float().contiguous()
    ref["__ids__"] = ids
    save_file(ref, out + "/gptqmodel_ref.safetensors")
""")


@pytest.mark.slow
@pytest.mark.parametrize("bits,group_size,fmt,sym,act", [
    (4, 32, "gptq", "sym", "none"),
    (3, 64, "gptq", "asym", "none"),
    (2, 32, "gptq_v2", "asym", "none"),
    (4, 32, "gptq", "asym", "static"),
    (4, 128, "gptq", "asym", "desc"),
])
def test_against_gptqmodel(tmp_path, fresh_seed, bits, group_size, fmt, sym, act):
    """A checkpoint written by GPTQModel imports bit for bit; a true act-order one is refused."""
    from safetensors.torch import load_file

    exe = os.environ.get("QALORA_GPTQMODEL_PYTHON")
    if not exe:
        pytest.skip("set QALORA_GPTQMODEL_PYTHON to a python with gptqmodel to check against GPTQModel")
    script = tmp_path / "quantize.py"
    script.write_text(_GPTQMODEL_SCRIPT)
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "4"))
    res = subprocess.run([exe, str(script), str(Path(__file__).parent), str(tmp_path), str(bits), str(group_size),
                          fmt, sym, act, str(fresh_seed)], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)  # GPTQModel writes a logs/ folder into its working directory
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    src = tmp_path / "gptq"
    if act == "desc":
        with pytest.raises(ValueError, match="act-order.*not contiguous"):
            ig.import_gptq(src, progress=False)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ig.import_gptq(src, dtype=torch.float32, progress=False)
    assert model.qalora_import_report["convention"] == fmt
    ref = load_file(str(tmp_path / "gptqmodel_ref.safetensors"))
    layers = [n for n in ref if not n.startswith("__")]
    assert len(layers) == 14
    for name in layers:
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.bits == bits and layer.group_size == group_size
        # GPTQModel computes s * (q - z) in float16: our exact float32 value rounded once
        assert torch.equal(layer.dequantize().half(), ref[name]), name
    with torch.no_grad():
        logits = model(input_ids=ref["__ids__"]).logits.float()
    assert ((logits - ref["__logits__"]).norm() / ref["__logits__"].norm()).item() < 1e-2  # GPTQModel ran in fp16
    loaded = load_quantized(save_quantized(model, tmp_path / "ours"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ref["__ids__"]).logits.float(), logits)

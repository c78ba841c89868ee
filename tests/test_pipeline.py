"""The main job on a tiny random Llama: streaming quantization, the CLI end to end, merge exactness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import qalora_ext  # noqa: E402
from qalora_ext import cli  # noqa: E402
from qalora_ext import loading as hf  # noqa: E402
from qalora_ext.checkpoint.quantized import save_model  # noqa: E402
from qalora_ext.nn import QALoRALinear, QuantLinear  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_llm import save_tiny_llama  # noqa: E402

from conftest import rel_err  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # Sharded on purpose: streaming quantization reads across shard files.
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", max_shard_size="60KB")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[40:60]))
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _ids(vocab=300, shape=(2, 24)):
    return torch.randint(3, vocab, shape)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_streaming_quantization_equals_in_memory(tiny_dir, bits):
    assert len(list(Path(tiny_dir).glob("model-*.safetensors"))) > 1
    streamed = hf.quantize_pretrained(tiny_dir, bits=bits, group_size=32, progress=False)
    model, _, _ = hf.load_model(tiny_dir)
    qalora_ext.quantize_model(model, bits=bits, group_size=32, progress=False)
    names = [n for n, m in streamed.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 14  # 7 projections x 2 layers; the tied head stays float
    assert isinstance(streamed.lm_head, torch.nn.Linear)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    for n in names:
        a, b = streamed.get_submodule(n), model.get_submodule(n)
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    ids = _ids()
    assert torch.equal(_logits(streamed, ids), _logits(model, ids))


def test_streaming_rejects_group_size_that_fits_no_layer(tmp_path):
    folder = save_tiny_llama(tmp_path / "odd", hidden=48, intermediate=80, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="group_size=32.*not multiples"):
        hf.quantize_pretrained(folder, bits=4, group_size=32, progress=False)


def test_streaming_warns_about_layers_left_float(tmp_path):
    # in_features 64 (q/k/v/gate/up, o) fit G=64; down_proj has in_features 96: stays float.
    folder = save_tiny_llama(tmp_path / "mixed", hidden=64, intermediate=96)
    with pytest.warns(UserWarning, match=r"2 of 14 layers are left unquantized.*group_size=64"):
        model = hf.quantize_pretrained(folder, bits=4, group_size=64, progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


def test_merged_logits_equal_adapter_logits_and_survive_save_load(tiny_dir, tmp_path):
    model = hf.quantize_pretrained(tiny_dir, bits=3, group_size=32, progress=False)
    qalora_ext.add_adapters(model, rank=4, alpha=8)
    with torch.no_grad():  # trained-looking adapters: B is zero at init
        for m in model.modules():
            if isinstance(m, QALoRALinear):
                m.lora_B.normal_(0, 0.2)
    ids = _ids()
    before = _logits(model, ids)
    report = qalora_ext.merge_adapters(model)
    assert len(report) == 14 and max(report.values()) < 1e-6  # float32 zeros keep the adapter
    merged = _logits(model, ids)
    assert rel_err(merged, before) <= 1e-5
    tok = hf.load_tokenizer(tiny_dir)
    out = save_model(model, tok, tmp_path / "merged")
    loaded, tok2, _ = hf.load_model(out)
    assert torch.equal(_logits(loaded, ids), merged)
    assert tok2("def f(x): return x")["input_ids"] == tok("def f(x): return x")["input_ids"]


def test_cli_end_to_end(tiny_dir, text_file, tmp_path, capsys):
    q, ft, mg = tmp_path / "q", tmp_path / "ft", tmp_path / "merged"
    assert cli.main(["quantize", "--model", str(tiny_dir), "--bits", "3", "--group-size", "32", "--out", str(q)]) == 0
    base = qalora_ext.load_quantized(q)
    assert sum(isinstance(m, QuantLinear) for m in base.modules()) == 14
    assert cli.main(["finetune", "--model", str(q), "--data", str(text_file), "--steps", "6", "--batch-size", "2",
                     "--seq-len", "32", "--rank", "4", "--lr", "1e-2", "--save-every", "3", "--out", str(ft)]) == 0
    trained = qalora_ext.load_quantized(ft)
    adapters = [m for m in trained.modules() if isinstance(m, QALoRALinear)]
    assert len(adapters) == 14 and any(m.lora_B.abs().sum() > 0 for m in adapters)
    assert (ft / "loss.png").is_file()
    assert cli.main(["merge", "--model", str(ft), "--out", str(mg)]) == 0
    merged = qalora_ext.load_quantized(mg)
    assert not any(isinstance(m, QALoRALinear) for m in merged.modules())
    ids = _ids()
    assert rel_err(_logits(merged, ids), _logits(trained, ids)) <= 1e-5
    assert cli.main(["eval", "--model", str(mg), "--data", str(text_file), "--windows", "2", "--window", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert cli.main(["generate", "--model", str(mg), "--prompt", "hello", "--max-new-tokens", "5",
                     "--no-chat-template"]) == 0
    captured = capsys.readouterr()
    assert "14 packed layers" in captured.err
    assert captured.out.endswith("\n")  # the reply line (a random tiny model may say nothing printable)


def test_cli_gptq_quantize(tiny_dir, text_file, tmp_path):
    out = tmp_path / "gptq"
    assert cli.main(["quantize", "--model", str(tiny_dir), "--method", "gptq", "--bits", "3", "--calib-samples", "8",
                     "--calib-seq-len", "32", "--out", str(out)]) == 0
    model = qalora_ext.load_quantized(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert torch.isfinite(_logits(model, _ids())).all()


def test_cli_errors_are_clear(tiny_dir, tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tmp_path / "nope")]) == 2
    assert "model not found" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert cli.main(["finetune", "--model", str(tiny_dir), "--data", str(empty), "--steps", "1",
                     "--out", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err.lower()
    assert cli.main(["merge", "--model", str(tiny_dir), "--out", str(tmp_path / "m")]) == 2
    assert "no adapters" in capsys.readouterr().err


def test_cli_finetune_device_and_autocast(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "ft"
    assert cli.main(["finetune", "--model", str(tiny_dir), "--bits", "4", "--data", str(text_file), "--steps", "2",
                     "--batch-size", "2", "--seq-len", "32", "--rank", "4", "--device", "cpu", "--autocast", "bf16",
                     "--method", "rtn", "--out", str(out)]) == 0
    trained = qalora_ext.load_quantized(out)
    assert any(isinstance(m, QALoRALinear) and m.lora_B.abs().sum() > 0 for m in trained.modules())
    assert cli.main(["finetune", "--model", str(tiny_dir), "--data", str(text_file), "--steps", "1",
                     "--device", "meta", "--out", str(tmp_path / "o")]) == 2
    assert "cpu or cuda" in capsys.readouterr().err
    assert cli.main(["finetune", "--model", str(tiny_dir), "--data", str(text_file), "--steps", "1",
                     "--device", "gpu0", "--out", str(tmp_path / "o")]) == 2
    assert "is not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["finetune", "--model", str(tiny_dir), "--data", str(text_file), "--steps", "1",
                         "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_cli_help_runs():
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    for cmd in cli.COMMANDS:
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from qalora_ext import loading as hf

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    folder = sys.argv[1]
    import transformers.models.llama.modeling_llama  # imports cost ~120 MB: not the model's
    torch.ones(1) @ torch.ones(1)
    before = rss("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")   # reset the peak (VmHWM)
    model = hf.quantize_pretrained(folder, bits=4, group_size=32, progress=False)
    print(json.dumps({"before": before, "peak": rss("VmHWM:")}))
""")


def test_streaming_quantization_bounds_peak_memory(tmp_path):
    # 8 layers of 512 x 2048: 126 MB of float32 weights in 16 MB shards.
    folder = save_tiny_llama(tmp_path / "big", max_shard_size="16MB", hidden=512, intermediate=2048, layers=8,
                             heads=8, kv_heads=2)
    float_bytes = sum(f.stat().st_size for f in folder.glob("model-*.safetensors"))
    assert float_bytes > 100e6
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["before"]
    # Packed INT4 is ~1/6 of float32; with one layer's float weights in
    # flight and allocator slack, well under half the float model (seen: 0.3).
    assert growth < 0.45 * float_bytes, f"peak grew by {growth / 1e6:.0f} MB for a {float_bytes / 1e6:.0f} MB model"


@pytest.mark.parametrize("shape", ((1, 24), (3, 40)))  # 24 and 120 rows: both sides of the large-M path (64)
def test_training_step_through_a_real_model(tiny_dir, shape):
    # A decoder's inner layers see inputs that require grad (the adapters
    # upstream); the CPU ops must not record autograd inside themselves.
    model = hf.quantize_pretrained(tiny_dir, bits=4, group_size=32, progress=False)
    qalora_ext.add_adapters(model, rank=4, alpha=8)
    model.train()
    ids = _ids(shape=shape)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [m.lora_B.grad for m in model.modules() if isinstance(m, QALoRALinear)]  # A.grad is 0 while B == 0
    assert len(grads) == 14 and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_cli_bench_prints_both_models(tiny_dir, capsys):
    assert cli.main(["bench", "--model", str(tiny_dir), "--prompt-len", "8", "--new-tokens", "2",
                     "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "float32" in out and "INT4 G32" in out and "packed / float time" in out


@pytest.mark.parametrize("family", ("qwen2", "mistral"))
def test_other_families_quantize_train_and_merge(tmp_path, family):
    from tiny_llm import save_tiny_family

    folder = save_tiny_family(tmp_path / family, family)
    model = hf.quantize_pretrained(folder, bits=4, group_size=32, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert isinstance(model.lm_head, torch.nn.Linear)  # untied output head: still not quantized
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    qalora_ext.add_adapters(model, rank=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QALoRALinear):
                m.lora_B.normal_(0, 0.2)
    ids = _ids()
    before = _logits(model, ids)
    qalora_ext.merge_adapters(model)
    assert rel_err(_logits(model, ids), before) <= 1e-5


def test_cli_resume_loses_nothing(tiny_dir, text_file, tmp_path):
    common = ["finetune", "--model", str(tiny_dir), "--bits", "4", "--data", str(text_file), "--batch-size", "2",
              "--seq-len", "32", "--rank", "4", "--lr", "1e-2", "--save-every", "2",
              "--calib-samples", "16", "--calib-seq-len", "64"]  # the default GPTQ base, small: it reruns the same
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert cli.main(common + ["--steps", "4", "--out", str(straight)]) == 0
    assert cli.main(common + ["--steps", "2", "--out", str(interrupted)]) == 0
    assert cli.main(common + ["--steps", "4", "--out", str(interrupted)]) == 2  # no silent restart over a run
    assert cli.main(common + ["--steps", "4", "--resume", "--out", str(interrupted)]) == 0
    a = qalora_ext.load_quantized(straight).state_dict()
    b = qalora_ext.load_quantized(interrupted).state_dict()
    adapters = [k for k in a if k.endswith(("lora_A", "lora_B"))]
    assert len(adapters) == 28
    assert all(torch.equal(a[k], b[k]) for k in a)

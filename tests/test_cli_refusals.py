"""The CLI refuses what would lose data or give silently wrong results (the hostile-input sweep's findings)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from qalora_ext import cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# The tiny float model and its INT4 G32 quantization, as test_cli.py builds them.
from test_cli import quantized_dir, tiny_dir  # noqa: E402,F401  (pytest fixtures)


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["quantize", "finetune", "merge", "export-mlx", "export-gguf-inside", "demo",
                                     "import-gptq"])
def test_output_that_would_overwrite_the_input_is_refused(command, tiny_dir, quantized_dir, capsys):
    src = tiny_dir if command in ("quantize", "demo", "import-gptq") else quantized_dir
    before = _snapshot(src)
    argv = {
        "quantize": ["quantize", "--model", str(src), "--out", str(src)],
        "finetune": ["finetune", "--model", str(src), "--out", str(src), "--steps", "1"],
        "merge": ["merge", "--model", str(src), "--out", str(src)],
        "export-mlx": ["export", "--format", "mlx", "--model", str(src), "--out", str(src)],
        # a file of the input folder, named as the output
        "export-gguf-inside": ["export", "--format", "gguf", "--model", str(src), "--out",
                               str(src / "model.safetensors")],
        "demo": ["demo", "--model", str(src), "--out", str(src)],
        "import-gptq": ["import", "--format", "gptq", str(src), "--out", str(src.parent)],  # replaces src's folder
    }[command]
    assert cli.main(argv) == 2
    assert "would overwrite the command's input" in capsys.readouterr().err
    assert _snapshot(src) == before


def test_generate_refuses_empty_prompts_binary_input_and_bad_temperatures(quantized_dir, capsys, monkeypatch):
    model = ["generate", "--model", str(quantized_dir)]
    assert cli.main(model + ["--prompt", "", "--no-chat-template"]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe\x00binary\x80\n"), encoding="utf-8"))
    assert cli.main(model) == 2
    assert "standard input is not text" in capsys.readouterr().err
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit) as e:
            cli.main(model + ["--temperature", bad, "--prompt", "hi"])
        assert e.value.code == 2
        assert "must be a finite number >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(model + ["--max-new-tokens", "0", "--prompt", "hi"])


def test_resume_refuses_flags_that_contradict_the_checkpoint(quantized_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    base = ["finetune", "--model", str(quantized_dir), "--out", str(out), "--seq-len", "32", "--batch-size", "1",
            "--max-examples", "8"]
    assert cli.main(base + ["--steps", "1", "--rank", "8"]) == 0
    capsys.readouterr()
    assert cli.main(base + ["--steps", "2", "--resume", "--rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "--rank 4 contradicts the checkpoint being resumed" in err and "rank 8" in err
    assert cli.main(base + ["--steps", "2", "--resume"]) == 0  # takes the checkpoint's rank
    import json

    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert {m["adapter"]["rank"] for m in modules.values()} == {8}


def test_binary_data_file_is_named(quantized_dir, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert cli.main(["finetune", "--model", str(quantized_dir), "--out", str(tmp_path / "ft"), "--data", str(data),
                     "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "not text" in err


def test_binary_jsonl_file_is_named(quantized_dir, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(b'{"instruction": "a", "response": "b"}\n' + bytes(range(128, 256)) + b"\n")
    assert cli.main(["finetune", "--model", str(quantized_dir), "--out", str(tmp_path / "ft"), "--data", str(data),
                     "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "not text" in err


@pytest.mark.parametrize("command", ["finetune", "demo"])
def test_rank_0_needs_something_to_train(command, tiny_dir, quantized_dir, tmp_path, capsys):
    argv = {"finetune": ["finetune", "--model", str(quantized_dir), "--out", str(tmp_path / "ft"), "--steps", "1"],
            "demo": ["demo", "--model", str(tiny_dir), "--out", str(tmp_path / "demo"), "--steps", "1",
                     "--no-train-scales", "--no-train-zeros"]}[command]  # the demo trains both by default
    assert cli.main(argv + ["--rank", "0"]) == 2
    err = capsys.readouterr().err
    assert "--rank 0 trains no adapter, so it needs --train-scales or --train-zeros" in err
    assert not (tmp_path / "ft").exists() and not (tmp_path / "demo").exists()
    assert cli.main(argv + ["--rank", "-1"]) == 2
    assert "--rank must be >= 0" in capsys.readouterr().err


def test_rank_0_trains_scales_and_zeros_and_merge_folds_them(quantized_dir, tmp_path, capsys):
    """`qalora finetune --rank 0 --train-scales --train-zeros`, resumed (a contradicting flag refused), then
    `qalora merge`: same codes, new scales and zeros, the lost fraction printed."""
    import json

    import torch

    import qalora_ext
    from qalora_ext.nn import QALoRALinear, QuantLinear

    out = tmp_path / "ft"
    base = ["finetune", "--model", str(quantized_dir), "--out", str(out), "--seq-len", "32", "--batch-size", "1",
            "--max-examples", "8", "--lr", "1e-2"]
    assert cli.main(base + ["--steps", "1", "--rank", "0", "--train-scales", "--train-zeros",
                            "--quant-lr", "1e-3"]) == 0
    capsys.readouterr()
    ckpt = json.loads(next(out.glob("checkpoint-*/adapter_config.json")).read_text())
    assert (ckpt["rank"], ckpt["train_scale"], ckpt["train_zero"]) == (0, True, True)
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["settings"]["quant_lr"] == 1e-3
    assert cli.main(base + ["--steps", "2", "--resume", "--rank", "4"]) == 2
    assert "--rank 4 contradicts" in capsys.readouterr().err
    assert cli.main(base + ["--steps", "2", "--resume", "--quant-lr", "1e-3"]) == 0  # the checkpoint's flags
    capsys.readouterr()
    trained = qalora_ext.load_quantized(out)
    layers = {n: m for n, m in trained.named_modules() if isinstance(m, QALoRALinear)}
    assert layers and all(m.rank == 0 and m.lora_A is None for m in layers.values())
    assert all(m.dscale.abs().sum() > 0 and m.dzero.abs().sum() > 0 for m in layers.values())

    merged_dir = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(out), "--out", str(merged_dir)]) == 0
    printed = capsys.readouterr().out
    assert "trained scales, zeros into the stored scales and zeros" in printed
    assert "lost to storage rounding: largest" in printed
    merged = qalora_ext.load_quantized(merged_dir)
    for n, m in layers.items():
        q = merged.get_submodule(n)
        assert type(q) is QuantLinear
        assert torch.equal(q.packed, m.base.packed)
        assert not torch.equal(q.scale, m.base.scale) and not torch.equal(q.zero, m.base.zero)
        want_scale, want_zero, _ = m.merged_scale_zero()
        assert torch.equal(q.scale, want_scale) and torch.equal(q.zero, want_zero)


def test_init_residual_needs_the_float_model(quantized_dir, tmp_path, capsys):
    """A quantized --model has no float weights to fit to: refused before any work, whatever else is asked."""
    for extra in ([], ["--resume"], ["--fsdp"]):
        out = tmp_path / "ft"
        assert cli.main(["finetune", "--model", str(quantized_dir), "--out", str(out), "--steps", "1",
                         "--init", "residual"] + extra) == 2
        err = capsys.readouterr().err
        assert "--init residual fits the adapters to the quantization error W - W~, which needs the float " \
               "weights" in err
        assert f"{quantized_dir} is already quantized" in err
        assert not out.exists()

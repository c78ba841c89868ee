"""The CLI package's structure: one module per command, shared flags declared once, plain-argument entry points
(run_demo, bench_model) and the checks `qalora export` makes on a folder before handing the model to an exporter."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import qalora_ext  # noqa: E402
from qalora_ext import cli  # noqa: E402
from qalora_ext.cli import common  # noqa: E402
from qalora_ext.nn import QALoRALinear, QuantLinear  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

COMMAND_NAMES = ("info", "quantize", "finetune", "merge", "import", "export", "eval", "generate", "bench", "demo")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_llm import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def quantized_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int4"
    assert cli.main(["quantize", "--model", str(tiny_dir), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    return out


def _subparsers(parser):
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_every_command_is_a_module_with_its_arguments_and_its_run():
    assert tuple(cli.COMMANDS) == COMMAND_NAMES
    assert tuple(_subparsers(cli.build_parser())) == COMMAND_NAMES  # the order `qalora --help` lists them in
    for module in cli._COMMAND_MODULES:
        assert callable(module.add_arguments) and callable(module.run) and module.HELP
        assert cli.COMMANDS[module.NAME] is module.run


def test_shared_flags_have_one_declaration_and_one_set_of_defaults():
    parser = cli.build_parser()
    quant = {"bits": 3, "group_size": 32, "scale_dtype": "float16", "zero_dtype": "float32",
             "calib_samples": 128, "calib_seq_len": 256}
    # GPTQ where the command has calibration text (finetune's data, the demo's corpus); quantize stays RTN.
    for argv, method in ((["quantize", "--out", "x"], "rtn"), (["finetune", "--out", "x"], "gptq"),
                         (["demo"], "gptq")):
        args = vars(parser.parse_args(argv))
        assert {k: args[k] for k in quant} == quant, argv
        assert args["method"] == method, argv
        assert vars(parser.parse_args(argv + ["--method", "rtn"]))["method"] == "rtn"
    ev, dm = parser.parse_args(["eval"]), parser.parse_args(["demo"])
    assert (ev.windows, ev.window) == (16, 512)
    assert (dm.windows, dm.window) == (8, 512)  # the demo's own default, given to the shared helper
    subs = _subparsers(parser)
    helps = {name: {a.dest: a.help for a in subs[name]._actions} for name in ("eval", "demo")}
    assert helps["eval"]["windows"] == "evaluation windows (default 16)"
    assert helps["demo"]["windows"] == "evaluation windows (default 8)"
    assert helps["eval"]["window"] == helps["demo"]["window"]


def test_trainable_quant_flags_say_what_they_train():
    parser = cli.build_parser()
    subs = _subparsers(parser)
    for name in ("finetune", "demo"):
        helps = {a.dest: (a.option_strings, a.help) for a in subs[name]._actions}
        assert helps["train_scales"][0] == ["--train-scales"] and "scales" in helps["train_scales"][1]
        assert helps["train_zeros"][0] == ["--train-zeros"] and "zeros" in helps["train_zeros"][1]
        assert "learning rate of the trained scales and zeros" in helps["quant_lr"][1]
        assert "0: no adapter" in helps["rank"][1]
        args = parser.parse_args([name] + (["--out", "x"] if name == "finetune" else []))
        assert (args.train_scales, args.train_zeros, args.quant_lr) == (None, None, None)
        args = parser.parse_args([name, "--train-scales", "--train-zeros", "--quant-lr", "3e-3", "--rank", "0"]
                                 + (["--out", "x"] if name == "finetune" else []))
        assert (args.train_scales, args.train_zeros, args.quant_lr, args.rank) == (True, True, 3e-3, 0)
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--quant-lr", "0"])


def test_quant_options_are_plain_keyword_arguments_of_loading_quantize():
    import inspect

    import torch

    from qalora_ext import loading

    args = cli.build_parser().parse_args(["quantize", "--out", "x", "--scale-dtype", "bfloat16", "--bits", "2"])
    options = common.quant_options(args)
    assert options["scale_dtype"] is torch.bfloat16 and options["zero_dtype"] is torch.float32
    assert options["bits"] == 2
    assert set(options) <= set(inspect.signature(loading.quantize).parameters)


def test_errors_become_one_line_and_status_2(capsys, monkeypatch):
    def bad(args):
        raise ValueError("--thing 3: expected 4")

    monkeypatch.delenv("QALORA_DEBUG", raising=False)
    assert common.run_reporting_errors(bad, None) == 2
    assert capsys.readouterr().err == "[qalora] error: --thing 3: expected 4\n"
    monkeypatch.setenv("QALORA_DEBUG", "1")
    with pytest.raises(ValueError):
        common.run_reporting_errors(bad, None)


def test_run_demo_takes_plain_arguments(tiny_dir, tmp_path, capsys):
    from qalora_ext.demo import DemoResult, run_demo

    result = run_demo(tiny_dir, bits=4, steps=2, batch_size=2, seq_len=32, rank=4, windows=2, window=32,
                      prompt="hi", out=tmp_path / "demo", calib_samples=4, calib_seq_len=32, train_scale=True,
                      quant_lr=1e-3)
    assert isinstance(result, DemoResult)
    assert all(math.isfinite(p) for p in (result.source_perplexity, result.quantized_perplexity,
                                          result.merged_perplexity))
    assert len(result.losses) == 2 and result.out == tmp_path / "demo"
    merged = qalora_ext.load_quantized(result.out)
    assert sum(isinstance(m, QuantLinear) and m.bits == 4 for m in merged.modules()) == 14
    assert not any(isinstance(m, QALoRALinear) for m in merged.modules())
    out = capsys.readouterr().out
    assert "QA-LoRA demo: llama, INT4 G32 (GPTQ), rank 4, 2 steps" in out  # GPTQ: the default base
    assert "(2 windows x 32 tokens of Python's pydoc topics)" in out
    assert set(result.phases.times) >= {"load source model", "merge and save", "generate"}


def test_bench_model_takes_plain_arguments_and_returns_the_measurements(tiny_dir, quantized_dir):
    from qalora_ext.generation import bench_model

    result = bench_model(tiny_dir, bits=3, prompt_len=8, new_tokens=2, repeats=1, int8_activations=True)
    assert [name for name, _, _ in result.rows] == ["float32", "INT3 G32", "INT3 i8act"]
    assert all(tp > 0 and td > 0 for _, tp, td in result.rows)
    table = result.table().splitlines()
    assert table[0].startswith("model llama, 1 threads, prompt 8 tokens, 2 decoded tokens, median of 1")
    assert table[-1].startswith("int8-activation packed / float time")
    with pytest.raises(ValueError, match="already quantized"):
        bench_model(quantized_dir)


def test_export_checks_the_folder_before_the_exporters_see_a_model(tiny_dir, quantized_dir, tmp_path, capsys):
    def export(fmt, model, out, *extra):
        return cli.main(["export", "--format", fmt, "--model", str(model), "--out", str(out), *extra])

    assert export("mlx", tiny_dir, tmp_path / "m") == 2
    assert "is not a qalora_ext checkpoint" in capsys.readouterr().err
    assert export("gguf", tiny_dir, tmp_path / "g.gguf") == 2
    assert "is not a qalora_ext quantized checkpoint; the GGUF exporter writes" in capsys.readouterr().err
    assert export("mlx", tmp_path / "nope", tmp_path / "m") == 2
    assert "no such model folder" in capsys.readouterr().err
    assert export("gguf", tmp_path / "nope", tmp_path / "g.gguf") == 2
    assert "model not found" in capsys.readouterr().err
    before = sorted(p.name for p in quantized_dir.iterdir())
    assert export("mlx", quantized_dir, quantized_dir) == 2
    assert "would overwrite the command's input" in capsys.readouterr().err
    assert sorted(p.name for p in quantized_dir.iterdir()) == before
    assert not (tmp_path / "m").exists() and not (tmp_path / "g.gguf").exists()


def test_export_names_the_gguf_model_after_its_folder(quantized_dir, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    assert cli.main(["export", "--format", "gguf", "--model", str(quantized_dir), "--out", str(path)]) == 0
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.name"].contents() == quantized_dir.name


def test_export_of_a_folder_without_tokenizer(quantized_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in quantized_dir.iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors":
            shutil.copy2(f, bare / f.name)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["export", "--format", "mlx", "--model", str(bare), "--out", str(tmp_path / "mlx")]) == 0
    captured = capsys.readouterr()
    assert "[qalora] warning: export_mlx: no tokenizer files were found" in captured.err
    assert "note: no tokenizer files were found" in captured.out  # in the report too
    assert json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]["bits"] == 4
    assert not (tmp_path / "mlx" / "tokenizer.json").exists()
    # GGUF carries the vocabulary: a folder without a tokenizer is an error, before anything is written.
    assert cli.main(["export", "--format", "gguf", "--model", str(bare), "--out", str(tmp_path / "g.gguf")]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "g.gguf").exists()


def test_export_with_a_tokenizer_copies_it(quantized_dir, tmp_path):
    out = tmp_path / "mlx"
    assert cli.main(["export", "--format", "mlx", "--model", str(quantized_dir), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").read_bytes() == (Path(quantized_dir) / "tokenizer.json").read_bytes()

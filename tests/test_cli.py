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
        assert helps["train_scales"][0] == ["--train-scales", "--no-train-scales"]
        assert helps["train_zeros"][0] == ["--train-zeros", "--no-train-zeros"]
        assert "scales" in helps["train_scales"][1] and "zeros" in helps["train_zeros"][1]
        assert "learning rate of the trained scales and zeros" in helps["quant_lr"][1]
        assert "0: no adapter" in helps["rank"][1] or "default 0: no adapter" in helps["rank"][1]
        args = parser.parse_args([name] + (["--out", "x"] if name == "finetune" else []))
        if name == "finetune":  # nothing but the adapter unless asked (a resume takes the checkpoint's)
            assert (args.train_scales, args.train_zeros, args.init) == (None, None, "zero")  # rank: the checkpoint's or 16
        else:  # the demo's default: the setting that measured best (bench/results/paper_table.md)
            assert (args.train_scales, args.train_zeros, args.rank, args.init) == (True, True, 0, "residual")
            args = parser.parse_args([name, "--no-train-scales", "--no-train-zeros", "--rank", "16"])
            assert (args.train_scales, args.train_zeros, args.rank) == (False, False, 16)
        assert args.quant_lr == common.QUANT_LR
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


def test_init_flag_says_what_it_does():
    subs = _subparsers(cli.build_parser())
    for name in ("finetune", "demo"):
        action = next(a for a in subs[name]._actions if a.dest == "init")
        assert action.option_strings == ["--init"] and action.choices == ("zero", "residual")
        assert action.default == ("zero" if name == "finetune" else "residual")  # the demo: the best measured
        assert f"(default {action.default})" in action.help
        assert "B = 0 and dscale = dzero = 0" in action.help and "quantization error W - W~" in action.help
    finetune_help = next(a for a in subs["finetune"]._actions if a.dest == "init").help
    assert "Only with a float --model" in finetune_help and "--resume" in finetune_help


def _residual_summary(out: str) -> tuple[float, float]:
    import re

    m = re.search(r"--init residual: .* layers fitted to the quantization error; mean relative output error on the "
                  r"calibration text ([0-9.]+) -> ([0-9.]+)", out)
    assert m, out
    return float(m.group(1)), float(m.group(2))


def test_finetune_init_residual_starts_at_the_fit_of_the_gptq_base(tiny_dir, tmp_path, capsys):
    """`--init residual` on a float model: the start is fit_quantization_residual of the new layers to the float
    weights on GPTQ's own calibration batches (checked against a direct call: a fit without calibration, or on
    other batches, or to other weights, differs); a learning rate of 1e-9 keeps one step's trained values at the
    start. The adapter is fitted too, and a resume that finds a checkpoint skips the fit."""
    import torch

    from qalora_ext import add_adapters, loading
    from qalora_ext.quantize.calibration import calibration_batches
    from qalora_ext.quantize.residual_fit import fit_quantization_residual

    calib = ["--calib-samples", "8", "--calib-seq-len", "32"]
    base = ["finetune", "--model", str(tiny_dir), "--bits", "3", "--seq-len", "32", "--batch-size", "1",
            "--max-examples", "4", "--lr", "1e-9", "--quant-lr", "1e-9", "--seed", "3"] + calib
    zeros = tmp_path / "zeros"
    assert cli.main(base + ["--steps", "1", "--rank", "0", "--train-zeros", "--init", "residual",
                            "--out", str(zeros)]) == 0
    before, after = _residual_summary(capsys.readouterr().out)
    assert after < before
    got = {n: m.dzero for n, m in qalora_ext.load_quantized(zeros).named_modules() if isinstance(m, QALoRALinear)}

    lm, tok, _ = loading.quantize(tiny_dir, bits=3, method="gptq", calib_samples=8, calib_seq_len=32, seed=3,
                                  progress=False)
    add_adapters(lm, rank=0, train_zero=True)
    source, _, _ = loading.load_model(tiny_dir)
    fit_quantization_residual(lm, source, calibration_batches(tok, None, 8, 32, seed=3), progress=False)
    want = {n: m.dzero for n, m in lm.named_modules() if isinstance(m, QALoRALinear)}
    assert len(got) == 14 and got.keys() == want.keys()
    assert all(want[n].abs().max() > 1e-4 for n in want)  # a real start, not zero
    assert all(torch.allclose(got[n], want[n], rtol=0, atol=1e-6 * want[n].abs().max().item()) for n in want)

    adapter = tmp_path / "adapter"
    argv = base + ["--rank", "4", "--init", "residual", "--save-every", "1", "--out", str(adapter)]
    assert cli.main(argv + ["--steps", "1"]) == 0
    assert "--init residual: adapter of 14 layers fitted" in capsys.readouterr().out
    layers = [m for m in qalora_ext.load_quantized(adapter).modules() if isinstance(m, QALoRALinear)]
    assert all(m.lora_B.abs().max() > 1e-3 for m in layers)  # SPEC's zero start: B = 0 (here within 1e-8)
    assert cli.main(argv + ["--steps", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "holds the trained state: --init residual (a start) is not applied" in out
    assert "layers fitted" not in out


def test_demo_init_residual_fits_before_training(tiny_dir, tmp_path, capsys):
    from qalora_ext.demo import run_demo

    argv = ["demo", "--model", str(tiny_dir), "--bits", "3", "--steps", "1", "--batch-size", "1", "--seq-len", "32",
            "--rank", "4", "--windows", "1", "--window", "32", "--prompt", "hi", "--calib-samples", "4",
            "--calib-seq-len", "32", "--out", str(tmp_path / "demo"), "--init", "residual"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    before, after = _residual_summary(out)
    assert after < before
    assert out.index("layers fitted to the quantization error") < out.index("[qalora] fine-tune (")
    assert "QA-LoRA demo: llama, INT3 G32 (GPTQ), rank 4, 1 steps, residual-fitted start" in out
    assert "fit the start to the quantization error: done in" in out
    with pytest.raises(ValueError, match="init must be 'zero' or 'residual'"):
        run_demo(tiny_dir, init="gptq")

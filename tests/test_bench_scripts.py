"""The GPU benchmark scripts' code paths, run where there is no GPU: bench_gpu's report from modelled timings
(--dry-run) and bench_train_gpu's three variants on the CPU at a quarter of the size. They check that the scripts
the GPU machine runs do not break; their numbers mean nothing here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_dry_run_reports_every_table_and_target(tmp_path, capsys):
    bench = _load("bench_gpu")
    out = tmp_path / "r.json"
    assert bench.main(["--dry-run", "--json", str(out), "--out-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for heading in ("INT4 vs cuBLAS", "Bits at", "Adapter epilogue", "Path by M", "Issue 5 targets"):
        assert heading in text, heading
    res = json.loads(out.read_text())
    assert len(res["targets"]) == 13 and {t["status"] for t in res["targets"]} <= {"PASS", "MISS", "n/a"}
    assert bench.recommended_limits(res["paths"])["mma_max_m"] >= 1
    assert (tmp_path / "gpu_bench.md").read_text() == text


@pytest.mark.usefixtures("one_thread")
def test_bench_train_runs_every_variant_on_the_cpu(tmp_path, capsys):
    bench = _load("bench_train_gpu")
    out = tmp_path / "t.json"
    assert bench.main(["--device", "cpu", "--scale", "4", "--tokens", "16", "--steps", "1", "--warmup", "0",
                       "--no-compile", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [v["label"] for v in res["variants"]] == ["ours (qalora_ext)", "(a) dense bf16 + LoRA",
                                                      "(b) dequant->bf16 matmul, eager"]
    assert all(v["step_s"] > 0 for v in res["variants"])
    memory = next(t for t in res["targets"] if t["label"].startswith("base-weight"))
    assert 3.3 < memory["value"] < 3.4  # 16 bits / (4 + 16/64 + 32/64) bits per weight = 3.37
    assert "Issue 6 targets" in capsys.readouterr().out


def test_bench_finetune_cpu_quick_runs_each_configuration_in_its_own_worker(tmp_path):
    """bench_finetune_cpu --quick: a tiny random Llama, each configuration in a fresh worker process driven in
    lockstep, peak memory per worker, the profile of one more step of ours; the numbers mean nothing here."""
    import importlib.util as iu

    bench = _load("bench_finetune_cpu")
    out = tmp_path / "ft"
    has_peft = iu.find_spec("peft") is not None
    assert bench.main(["--quick", "--configs", "ours-bf16,peft-bf16", "--profile", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["config"] for r in res["rows"]] == ["ours-bf16"] + (["peft-bf16"] if has_peft else [])
    assert (not has_peft) == ("peft-bf16" in res["skipped"])
    for r in res["rows"]:
        assert len(r["step_s"]) == 1 + 2 and all(t > 0 for t in r["step_s"]), r  # the profiled step is not in it
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["median_step_s"])
        assert r["adapter_dtypes"] == ["float32"] and r["trainable_params"] > 0
        assert r["train_peak_mib"] is None or r["train_peak_mib"] > 0
        assert r["load_peak_mib"] > 0
    if has_peft:
        ours, theirs = res["rows"]
        assert ours["first_loss"] == pytest.approx(theirs["first_loss"], rel=0.05)  # same data, untrained adapters
        assert [t["label"].split(" >=")[0].split(" training")[0] for t in res["targets"]] == [
            "ours bf16 tokens/s", "ours bf16"]
    assert set(res["profile"]) == {"ours-bf16"}
    shares = {row["category"]: row["share"] for row in res["profile"]["ours-bf16"]["rows"]}
    assert {"packed layers + adapters", "attention (SDPA, RoPE)", "head (lm_head)", "optimizer (clip + AdamW)",
            "loss (float32 cross-entropy)"} <= set(shares)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    text = out.with_suffix(".md").read_text()
    assert "| configuration" in text and "Profile: one step of ours" in text

"""The QA-LoRA paper's claim in miniature, on SmolLM2-135M-Instruct.

For each (bits, group size), held-out perplexity of:
  (a) the source model (float; its projections are GGUF Q4_1 dequantized),
  (b) the RTN base,
  (c) the GPTQ base,
  (d) what users do today: a float LoRA on all seven projections of the GPTQ
      base (QLoRA-style: the adapter sees the full input), merged into float
      weights, then re-quantized with GPTQ to the same bits and group size,
  (e) QA-LoRA on the GPTQ base, merged into the zeros (still INT-b, no
      re-quantization).
(d) and (e) use the same data, steps, rank, alpha, learning rate and seeds.
Writes bench/results/paper_table.md (+ .json) and bench/results/paper_table.png.

    python bench/reproduce_paper.py            # the full run (42 minutes on 2 cores, see bench/results/paper_table.md)
    python bench/reproduce_paper.py --quick    # a smoke run on a few steps
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

import qalora_ext
from qalora_ext import loading as hf
from qalora_ext.quantize.calibration import calibration_batches
from qalora_ext.training import data
from qalora_ext.training import finetune as train
from qalora_ext.quantize.gptq import quantize_model_gptq
from qalora_ext.model import add_adapters, merge_adapters, set_module
from qalora_ext.nn import QuantLinear

RESULTS = Path(__file__).resolve().parent / "results"


class FloatLoRALinear(nn.Module):
    """A plain LoRA over a frozen packed layer: ``y = base(x) + s * (x A^T) B^T`` (A: r x K).

    The baseline of the paper's comparison: its update ``s * B A`` is a full
    (N, K) matrix, so merging it leaves the quantization grid and the merged
    model must be quantized again.
    """

    def __init__(self, base: QuantLinear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init, as for QA-LoRA

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        w = self.base.dequantize().double() + self.scaling * (self.lora_B.double() @ self.lora_A.double())
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        linear.weight.copy_(w.float())
        if self.base.bias is not None:
            linear.bias.copy_(self.base.bias.float())
        return linear


def add_float_lora(model: nn.Module, rank: int, alpha: float) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for n in names:
        set_module(model, n, FloatLoRALinear(model.get_submodule(n), rank, alpha))
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("lora_A") or name.endswith("lora_B"))


def merge_float_lora(model: nn.Module) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, FloatLoRALinear)]
    for n in names:
        set_module(model, n, model.get_submodule(n).merged_linear())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="4:64,3:32,2:32", help="bits:group pairs (default 4:64,3:32,2:32)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 8 calibration samples, 2 windows")
    ap.add_argument("--out", default=str(RESULTS / "paper_table"), help="output path without extension")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.calib_samples, args.windows, args.window = 3, 8, 2, 128
        args.out = str(RESULTS / "paper_table_quick")
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]

    t_start = time.time()
    folder = hf.resolve_model(None)
    source, tokenizer, _ = hf.load_model(folder)
    train_text, heldout_text = data.default_corpus_split()
    windows = data.heldout_windows(tokenizer, heldout_text, num_windows=args.windows, window=args.window)
    calibration = calibration_batches(tokenizer, train_text, args.calib_samples, args.calib_seq_len,
                                               seed=args.seed)
    dataset = data.load_training_data(None, tokenizer, args.seq_len)

    def ppl(model):
        return data.perplexity(model, windows, progress=False)

    def log(msg):
        print(f"[paper {time.time() - t_start:7.0f} s] {msg}", flush=True)

    meta = {
        "command": "python bench/reproduce_paper.py " + " ".join(sys.argv[1:]),
        "model": folder.name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "qalora_ext": qalora_ext.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {qalora_ext.build_info()['cpu_isa_active']}",
        "text_sha256": data.corpus_sha256(train_text + heldout_text),
        "eval": f"{args.windows} windows x {args.window} tokens of the held-out part",
        "train": f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, rank {args.rank}, alpha "
                 f"{args.alpha}, lr {args.lr}, seed {args.seed}",
        "calibration": f"{args.calib_samples} x {args.calib_seq_len} tokens of the training part",
    }
    results = {"meta": meta, "source": ppl(source), "rows": []}
    log(f"source perplexity {results['source']:.3f}")
    del source

    def train_adapters(model):
        torch.manual_seed(args.seed)
        return train.finetune(model, dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, progress=False, loss_plot=False)

    for bits, group in configs:
        row = {"bits": bits, "group_size": group}
        t0 = time.time()
        rtn = hf.quantize_pretrained(folder, bits, group, "rtn", progress=False)
        row["rtn"] = ppl(rtn)
        del rtn
        log(f"INT{bits} G{group}: RTN {row['rtn']:.3f}")
        gptq = hf.quantize_pretrained(folder, bits, group, "gptq", calibration=calibration, progress=False)
        row["gptq"] = ppl(gptq)
        log(f"INT{bits} G{group}: GPTQ {row['gptq']:.3f}")

        qa = copy.deepcopy(gptq)
        torch.manual_seed(args.seed)
        add_adapters(qa, rank=args.rank, alpha=args.alpha)
        res = train_adapters(qa)
        row["qalora_loss"] = [res.losses[0], res.losses[-1]]
        report = merge_adapters(qa)
        row["qalora_lost_fraction"] = max(report.values())
        row["qalora_merged"] = ppl(qa)
        del qa
        log(f"INT{bits} G{group}: QA-LoRA merged {row['qalora_merged']:.3f} (loss {res.losses[0]:.3f} -> "
            f"{res.losses[-1]:.3f})")

        lora = gptq
        torch.manual_seed(args.seed)
        add_float_lora(lora, args.rank, args.alpha)
        res = train_adapters(lora)
        row["lora_loss"] = [res.losses[0], res.losses[-1]]
        merge_float_lora(lora)
        row["lora_merged_float"] = ppl(lora)
        quantize_model_gptq(lora, calibration, bits=bits, group_size=group, progress=False)
        row["lora_requantized"] = ppl(lora)
        del lora, gptq
        log(f"INT{bits} G{group}: LoRA merged float {row['lora_merged_float']:.3f}, re-quantized "
            f"{row['lora_requantized']:.3f} (loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f})")
        row["seconds"] = time.time() - t0
        results["rows"].append(row)
        meta["run_seconds"] = time.time() - t_start
        write(results, Path(args.out))
    log(f"done; {args.out}.md")
    return 0


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta, rows = results["meta"], results["rows"]
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# QA-LoRA vs LoRA-then-requantize on SmolLM2-135M-Instruct (held-out perplexity, lower is better)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; Python {meta['python']}, torch {meta['torch']}, qalora_ext "
        f"{meta['qalora_ext']}; run time {meta['run_seconds'] / 60:.1f} min  ",
        f"Text: Python's pydoc topics (sha256 {meta['text_sha256'][:16]}...), eval {meta['eval']}  ",
        f"Training (d) and (e) alike: {meta['train']}; GPTQ calibration {meta['calibration']}",
        "",
        "| bits | G | (a) source | (b) RTN | (c) GPTQ | (d) LoRA on GPTQ, merged, re-GPTQ | (e) QA-LoRA on GPTQ, merged "
        "| (d) before re-quantizing (float) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['group_size']} | {results['source']:.2f} | {r['rtn']:.2f} | {r['gptq']:.2f} "
                     f"| {r['lora_requantized']:.2f} | {r['qalora_merged']:.2f} | {r['lora_merged_float']:.2f} |")
    lines += [
        "",
        "(e) stays INT-b after the merge: the adapter moves only the zeros (largest fraction of an adapter lost "
        "to float32 zero storage: " + ", ".join(f"{r['qalora_lost_fraction']:.1e}" for r in rows) + "). "
        "(d) must be quantized again after its merge, and that second quantization is what it loses.",
        "",
        "Training loss, first -> last step: " + "; ".join(
            f"INT{r['bits']} G{r['group_size']}: QA-LoRA {r['qalora_loss'][0]:.3f} -> {r['qalora_loss'][1]:.3f}, "
            f"LoRA {r['lora_loss'][0]:.3f} -> {r['lora_loss'][1]:.3f}" for r in rows),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    plot(results, out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    series = [("(b) RTN", "rtn"), ("(c) GPTQ", "gptq"), ("(d) LoRA, merged, re-GPTQ", "lora_requantized"),
              ("(e) QA-LoRA, merged", "qalora_merged")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], width, label=label)
    ax.axhline(results["source"], color="black", linestyle="--", linewidth=1, label="(a) source")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [f"INT{r['bits']} G{r['group_size']}" for r in rows])
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("SmolLM2-135M: QA-LoRA vs LoRA-then-requantize")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""The QA-LoRA paper's claim in miniature, on SmolLM2-135M-Instruct, tuned fairly.

For each (bits, group size), held-out perplexity of:
  (a) the source model (float; its projections are GGUF Q4_1 dequantized),
  (b) the RTN base,
  (c) the GPTQ base,
  (d) what users do today: a float LoRA on all seven projections of the GPTQ
      base (QLoRA-style: the adapter sees the full input), merged into float
      weights, then re-quantized with GPTQ to the same bits and group size,
  (e) QA-LoRA on the GPTQ base, merged into the zeros (still INT-b, no
      re-quantization),
  (f) learned per-group scales and zeros (dscale, dzero; no adapter), merged
      into the stored scales and zeros (still INT-b, same codes),
  (g) QA-LoRA plus learned scales (adapter into the zeros, dscale into the
      scales),
and (f) or (g) from the residual-fit start (``quantize.residual_fit``), where
``--fit-start`` names them.

Every trained row gets the same token budget (steps x batch x sequence) and
the same data and seed. Learning rates are chosen per method on a VALIDATION
slice of the training part (``data.default_validation_split``: training and
GPTQ calibration never see it), at the ``--sweep-config`` bit width; the
other widths reuse the choice. The held-out part is only evaluated, never
used to choose. Each row reports its trainable parameters, training time and
stored bits per weight.

Writes bench/results/paper_table.md (+ .json) and bench/results/paper_table.png.

    python bench/reproduce_paper.py            # the full run (see bench/results/paper_table.md for its time)
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
from tqdm.auto import tqdm

import qalora_ext
from qalora_ext.quantize.residual_fit import fit_quantization_residual
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


METHODS = {
    # key: (label, adapter rank? , train_scale, train_zero)
    "lora": "(d) LoRA on GPTQ, merged, re-GPTQ",
    "qalora": "(e) QA-LoRA, merged into zeros",
    "scales_zeros": "(f) learned scales + zeros, merged",
    "qalora_scales": "(g) QA-LoRA + learned scales, merged",
}
DEFAULT_LRS = {  # (adapter lr, quant lr) grids; the quant lr is the dscale/dzero group's (no weight decay)
    "lora": [(3e-4, None), (1e-3, None), (3e-3, None)],
    "qalora": [(1e-3, None), (3e-3, None), (1e-2, None)],
    "scales_zeros": [(1e-3, 2e-5), (1e-3, 6e-5), (1e-3, 2e-4)],
    "qalora_scales": [("best", 2e-5), ("best", 6e-5), ("best", 2e-4)],  # adapter lr: (e)'s choice
}


def parse_grid(text: str) -> dict:
    """``method=lr[/quant_lr],...;method=...`` -> {method: [(lr, quant_lr), ...]}."""
    grid = {}
    for part in filter(None, text.split(";")):
        name, values = part.split("=", 1)
        items = []
        for v in values.split(","):
            lr, _, qlr = v.partition("/")
            items.append((lr if lr == "best" else float(lr), float(qlr) if qlr else None))
        grid[name.strip()] = items
    return grid


def stored_bits_per_weight(bits: int, group: int, scale_dtype=torch.float16, zero_dtype=torch.float32) -> float:
    return bits + (torch.finfo(scale_dtype).bits + torch.finfo(zero_dtype).bits) / group


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="3:32,2:32,4:64", help="bits:group pairs (default 3:32,2:32,4:64)")
    ap.add_argument("--sweep-config", default="3:32", help="the bits:group where learning rates are chosen")
    ap.add_argument("--methods", default="lora,qalora,scales_zeros",
                    help="comma list of: lora (d), qalora (e), scales_zeros (f), qalora_scales (g)")
    ap.add_argument("--lrs", default="", help="override grids: 'qalora=1e-3,3e-3;scales_zeros=1e-3/2e-5,...'")
    ap.add_argument("--fit-start", default="scales_zeros",
                    help="methods also run from the residual-fit start at their chosen lr (comma list, or '')")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--val-windows", type=int, default=6)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps, one lr each, 8 calibration samples, "
                                                         "2 windows")
    ap.add_argument("--out", default=str(RESULTS / "paper_table"), help="output path without extension")
    args = ap.parse_args()
    grids = {m: list(DEFAULT_LRS[m]) for m in DEFAULT_LRS}
    grids.update(parse_grid(args.lrs))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    fit_start = [m.strip() for m in args.fit_start.split(",") if m.strip() and m.strip() in methods]
    if args.quick:
        args.steps, args.calib_samples, args.windows, args.val_windows, args.window = 2, 8, 2, 2, 128
        grids = {m: g[1:2] for m, g in grids.items()}
        args.out = str(RESULTS / "paper_table_quick")
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    sweep_config = tuple(int(v) for v in args.sweep_config.split(":"))
    if sweep_config not in configs:
        ap.error(f"--sweep-config {args.sweep_config} is not one of --configs")
    configs.remove(sweep_config)
    configs.insert(0, sweep_config)  # choose first, then reuse

    t_start = time.time()
    folder = hf.resolve_model(None)
    source, tokenizer, _ = hf.load_model(folder)
    source.eval()
    train_text, validation_text = data.default_validation_split()
    _, heldout_text = data.default_corpus_split()
    windows = data.heldout_windows(tokenizer, heldout_text, num_windows=args.windows, window=args.window)
    val_windows = data.heldout_windows(tokenizer, validation_text, num_windows=args.val_windows, window=args.window)
    calibration = calibration_batches(tokenizer, train_text, args.calib_samples, args.calib_seq_len, seed=args.seed)
    dataset = data.TokenDataset(data.tokenize_text_blocks(train_text, tokenizer, args.seq_len,
                                                          name="default corpus, training part less validation"))

    def ppl(model, w=windows):
        return data.perplexity(model, w, progress=False)

    def log(msg):
        print(f"[paper {time.time() - t_start:7.0f} s] {msg}", flush=True)

    meta = {
        "command": "python bench/reproduce_paper.py " + " ".join(sys.argv[1:]),
        "model": folder.name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "qalora_ext": qalora_ext.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {qalora_ext.build_info()['cpu_isa_active']}",
        "text_sha256": data.corpus_sha256(train_text + validation_text + heldout_text),
        "eval": f"{args.windows} windows x {args.window} tokens of the held-out part",
        "validation": f"{args.val_windows} windows x {args.window} tokens of the validation slice "
                      f"({len(validation_text)} characters at the end of the training part, never trained on)",
        "train": f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens "
                 f"({args.steps * args.batch_size * args.seq_len} tokens) for every trained row, rank {args.rank}, alpha {args.alpha}, seed {args.seed}, "
                 f"AdamW, constant lr; dscale/dzero in their own group without weight decay",
        "calibration": f"{args.calib_samples} x {args.calib_seq_len} tokens of the training part (less validation)",
        "sweep": f"learning rates chosen on validation at INT{sweep_config[0]} G{sweep_config[1]}",
    }
    results = {"meta": meta, "source": ppl(source), "rows": [], "sweep": []}
    log(f"source perplexity {results['source']:.3f}")
    chosen: dict[str, tuple] = {}

    def run(gptq, method, bits, group, lr, quant_lr, fit=False):
        """Train one method from the GPTQ base; returns (result dict, the merged INT-b model)."""
        model = copy.deepcopy(gptq)
        torch.manual_seed(args.seed)
        if method == "lora":
            add_float_lora(model, args.rank, args.alpha)
        else:
            add_adapters(model, rank=0 if method == "scales_zeros" else args.rank, alpha=args.alpha,
                         train_scale=method in ("scales_zeros", "qalora_scales"),
                         train_zero=method == "scales_zeros")
        fit_report = None
        if fit:
            fit_report = fit_quantization_residual(model, source, calibration, progress=False)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        start_val = ppl(model, val_windows) if fit else None
        t0 = time.time()
        torch.manual_seed(args.seed)
        res = train.finetune(model, dataset, steps=args.steps, batch_size=args.batch_size, lr=lr, quant_lr=quant_lr,
                             seed=args.seed, progress=False, loss_plot=False)
        seconds = time.time() - t0
        out = {"method": method, "bits": bits, "group_size": group, "lr": lr, "quant_lr": quant_lr, "fit_start": fit,
               "loss_first": res.losses[0], "loss_last": res.losses[-1], "losses": res.losses,
               "train_seconds": seconds, "trainable_parameters": trainable,
               "stored_bits_per_weight": stored_bits_per_weight(bits, group)}
        if fit_report is not None:
            out["fit_error_mean"] = [sum(r[k] for r in fit_report.values()) / len(fit_report) for k in ("before", "after")]
            out["fit_start_val_ppl"] = start_val
        if method == "lora":
            merge_float_lora(model)
            out["merged_float_val_ppl"] = ppl(model, val_windows)
            quantize_model_gptq(model, calibration, bits=bits, group_size=group, progress=False)
        else:
            report = merge_adapters(model)
            out["lost_fraction"] = max(report.values())
        out["val_ppl"] = ppl(model, val_windows)
        return out, model

    def tag(r):
        q = f", quant lr {r['quant_lr']:g}" if r["quant_lr"] else ""
        return f"{r['method']}{' (fit start)' if r['fit_start'] else ''} lr {r['lr']:g}{q}"

    for bits, group in configs:
        row = {"bits": bits, "group_size": group, "stored_bits_per_weight": stored_bits_per_weight(bits, group)}
        t0 = time.time()
        rtn = hf.quantize_pretrained(folder, bits, group, "rtn", progress=False)
        row["rtn"] = ppl(rtn)
        del rtn
        gptq = hf.quantize_pretrained(folder, bits, group, "gptq", calibration=calibration, progress=False)
        row["gptq"] = ppl(gptq)
        row["gptq_val"] = ppl(gptq, val_windows)
        log(f"INT{bits} G{group}: RTN {row['rtn']:.3f}, GPTQ {row['gptq']:.3f} (validation {row['gptq_val']:.3f})")
        row["methods"] = {}
        sweeping = (bits, group) == sweep_config
        for method in methods:
            if sweeping:
                grid = [((chosen["qalora"][0] if lr == "best" and "qalora" in chosen else
                          (1e-3 if lr == "best" else lr)), qlr) for lr, qlr in grids[method]]
            else:
                grid = [chosen[method][:2]]
            best = None
            for lr, qlr in tqdm(grid, desc=f"INT{bits} {method}", leave=False):
                out, model = run(gptq, method, bits, group, lr, qlr)
                log(f"INT{bits} G{group}: {tag(out)}: validation {out['val_ppl']:.3f} (loss {out['loss_first']:.3f} "
                    f"-> {out['loss_last']:.3f}, {out['train_seconds']:.0f} s)")
                if sweeping:
                    results["sweep"].append(out)
                if best is None or out["val_ppl"] < best[0]["val_ppl"]:
                    best = (out, model)
                else:
                    del model
            if method in fit_start:
                out, model = run(gptq, method, bits, group, best[0]["lr"], best[0]["quant_lr"], fit=True)
                log(f"INT{bits} G{group}: {tag(out)}: validation {out['val_ppl']:.3f} (at the fitted start "
                    f"{out['fit_start_val_ppl']:.3f}; loss {out['loss_first']:.3f} -> {out['loss_last']:.3f})")
                if sweeping:
                    results["sweep"].append(out)
                    chosen_fit = out["val_ppl"] < best[0]["val_ppl"]
                else:
                    chosen_fit = chosen[method][2]
                row["methods"][method + "+fit"] = dict(out, heldout_ppl=ppl(model))
                if chosen_fit:
                    best = (out, model)
            if sweeping:
                chosen[method] = (best[0]["lr"], best[0]["quant_lr"], best[0]["fit_start"])
            out, model = best
            out["heldout_ppl"] = ppl(model)
            row["methods"][method] = out
            del model
            log(f"INT{bits} G{group}: {METHODS[method]}: held-out {out['heldout_ppl']:.3f} ({tag(out)})")
        del gptq
        row["seconds"] = time.time() - t0
        results["rows"].append(row)
        results["chosen"] = {m: {"lr": c[0], "quant_lr": c[1], "fit_start": c[2]} for m, c in chosen.items()}
        meta["run_seconds"] = time.time() - t_start
        write(results, Path(args.out))
    log(f"done; {args.out}.md")
    return 0


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta, rows = results["meta"], results["rows"]
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    methods = [m for m in METHODS if any(m in r["methods"] for r in rows)]
    lines = [
        "# Fine-tuned INT-b SmolLM2-135M-Instruct: which merge keeps the quality (held-out perplexity, lower is "
        "better)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; Python {meta['python']}, torch {meta['torch']}, qalora_ext "
        f"{meta['qalora_ext']}; run time {meta['run_seconds'] / 60:.1f} min  ",
        f"Text: Python's pydoc topics (sha256 {meta['text_sha256'][:16]}...), eval {meta['eval']}; choices on "
        f"{meta['validation']}  ",
        f"Training, every trained row: {meta['train']}; {meta['sweep']}; GPTQ calibration {meta['calibration']}",
        "",
        "| bits | G | stored bits/weight | (a) source | (b) RTN | (c) GPTQ | " + " | ".join(METHODS[m] for m in methods)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(methods),
    ]
    for r in rows:
        cells = []
        for m in methods:
            o = r["methods"].get(m)
            cells.append("" if o is None else f"{o['heldout_ppl']:.2f}")
        lines.append(f"| {r['bits']} | {r['group_size']} | {r['stored_bits_per_weight']:.3f} | {results['source']:.2f} "
                     f"| {r['rtn']:.2f} | {r['gptq']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Each trained row (its chosen setting; held-out and validation perplexity, trainable parameters, "
                  "training time, final loss, largest fraction lost to storage rounding at merge):", "",
              "| bits | G | method | lr | quant lr | start | validation | held-out | trainable params | train s | "
              "loss first -> last | lost |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for m, o in r["methods"].items():
            lost = f"{o['lost_fraction']:.1e}" if "lost_fraction" in o else "re-GPTQ"
            lines.append(f"| {r['bits']} | {r['group_size']} | {m} | {o['lr']:g} | "
                         f"{'' if o['quant_lr'] is None else format(o['quant_lr'], 'g')} | "
                         f"{'residual fit' if o['fit_start'] else 'zero (SPEC)'} | {o['val_ppl']:.2f} | "
                         f"{o['heldout_ppl']:.2f} | {o['trainable_parameters']:,} | {o['train_seconds']:.0f} | "
                         f"{o['loss_first']:.3f} -> {o['loss_last']:.3f} | {lost} |")
    if results.get("sweep"):
        lines += ["", "Learning-rate sweep (validation perplexity after merge; the lowest is chosen):", "",
                  "| method | lr | quant lr | start | validation | loss last |", "|---|---|---|---|---|---|"]
        for o in results["sweep"]:
            lines.append(f"| {o['method']} | {o['lr']:g} | {'' if o['quant_lr'] is None else format(o['quant_lr'], 'g')} "
                         f"| {'residual fit' if o['fit_start'] else 'zero'} | {o['val_ppl']:.3f} | {o['loss_last']:.3f} |")
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    plot(results, out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    series = [("(b) RTN", lambda r: r["rtn"]), ("(c) GPTQ", lambda r: r["gptq"])]
    for m, label in METHODS.items():
        if any(m in r["methods"] for r in rows):
            series.append((label, lambda r, m=m: r["methods"][m]["heldout_ppl"] if m in r["methods"] else float("nan")))
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / len(series)
    for i, (label, get) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [get(r) for r in rows], width, label=label)
    ax.axhline(results["source"], color="black", linestyle="--", linewidth=1, label="(a) source")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [f"INT{r['bits']} G{r['group_size']}" for r in rows])
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("SmolLM2-135M fine-tuned and stored at INT-b: LoRA + re-GPTQ vs exact merges")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

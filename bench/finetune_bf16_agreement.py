"""Do bf16 and float32 fine-tunes of SmolLM2 agree? (issue 18 item 2, on the real model)

The same INT3 G32 (RTN) model, data, seed and adapter init, fine-tuned twice: in float32 and under bfloat16
autocast; then each is merged into its zeros and evaluated (float32) on held-out windows of Python's pydoc
topics. The issue asks for the final training loss and the merged perplexity within 2%.

    python bench/finetune_bf16_agreement.py                 # 20 steps of 4 x 256 tokens, 8 windows of 512
    python bench/finetune_bf16_agreement.py --steps 40 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a float model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--out", default=str(RESULTS / "finetune_bf16_agreement.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from qalora_ext import loading
    from qalora_ext.model import add_adapters, merge_adapters
    from qalora_ext.training import data, finetune

    folder = loading.resolve_model(args.model)
    tokenizer = loading.load_tokenizer(folder)
    base = loading.quantize_pretrained(folder, 3, 32, "rtn", progress=False)
    dataset = data.load_training_data(None, tokenizer, args.seq_len)
    windows = data.heldout_windows(tokenizer, data.default_corpus_split()[1], num_windows=args.windows,
                                   window=args.window)
    out = {"command": "python bench/finetune_bf16_agreement.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": _timing.machine_info(), "model": folder.name,
           "settings": {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "rank", "alpha", "lr", "seed",
                                                      "windows", "window")},
           "quantized_perplexity": data.perplexity(base, windows, progress=False), "runs": {}}
    for name, amp in (("float32", None), ("bf16", torch.bfloat16)):
        model = copy.deepcopy(base)
        torch.manual_seed(args.seed)
        add_adapters(model, rank=args.rank, alpha=args.alpha)
        t0 = time.perf_counter()
        result = finetune.finetune(model, dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   seed=args.seed, autocast=amp, progress=True, loss_plot=False)
        seconds = time.perf_counter() - t0
        lost = max(merge_adapters(model).values())
        out["runs"][name] = {"losses": result.losses, "final_loss": result.losses[-1], "train_s": seconds,
                             "merged_perplexity": data.perplexity(model, windows, progress=False),
                             "merge_lost_fraction": lost}
        print(f"{name}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} in {seconds:.0f} s, merged "
              f"perplexity {out['runs'][name]['merged_perplexity']:.3f}", flush=True)
    a, b = out["runs"]["float32"], out["runs"]["bf16"]
    out["final_loss_rel_diff"] = abs(b["final_loss"] / a["final_loss"] - 1)
    out["merged_perplexity_rel_diff"] = abs(b["merged_perplexity"] / a["merged_perplexity"] - 1)
    ok = out["final_loss_rel_diff"] <= 0.02 and out["merged_perplexity_rel_diff"] <= 0.02
    print(f"quantized perplexity {out['quantized_perplexity']:.3f}; bf16 vs float32: final loss differs by "
          f"{100 * out['final_loss_rel_diff']:.2f}%, merged perplexity by "
          f"{100 * out['merged_perplexity_rel_diff']:.2f}% ({'within' if ok else 'NOT within'} 2%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

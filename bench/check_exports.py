"""Do the runtimes compute what we compute? A model's logits in llama.cpp (its GGUF export) and in mlx-lm (its
MLX export) against qalora_ext's own forward, on a few prompts.

For each export: the relative L2 distance of the logit vectors per position (mean and worst over positions) and
how often the top token agrees, against (a) our model with its adapter merged exactly (float32 zeros) and (b) the
same base without the adapter. When the export holds the adapter, (a) is much smaller than (b).

    python bench/check_exports.py --model runs/ft --gguf runs/ft.gguf --mlx runs/ft-mlx

``--model``: the qalora_ext folder the exports came from (adapters folded in here in float64, as the exports do).
Needs llama-cpp-python for --gguf and mlx-lm for --mlx.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

PROMPTS = (
    "<|im_start|>user\nWhat is a Python decorator?<|im_end|>\n<|im_start|>assistant\n",
    "The difference between a list and a tuple in Python is",
    "def fibonacci(n):\n    ",
)


def distances(ours: list[np.ndarray], theirs: list[np.ndarray]) -> dict:
    rel, same = [], []
    for a, b in zip(ours, theirs):
        rel.extend(np.linalg.norm(b - a, axis=-1) / np.linalg.norm(a, axis=-1))
        same.extend(a.argmax(-1) == b.argmax(-1))
    return {"mean": float(np.mean(rel)), "worst": float(np.max(rel)), "same_top": float(np.mean(same))}


def fmt(d: dict) -> str:
    return f"{100 * d['mean']:.2f}% mean, {100 * d['worst']:.2f}% worst position, same top token {100 * d['same_top']:.1f}%"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the qalora_ext folder the exports were made from")
    p.add_argument("--gguf", help="its GGUF export")
    p.add_argument("--mlx", help="its MLX export folder")
    args = p.parse_args(argv)

    import qalora_ext
    from qalora_ext.loading import load_tokenizer
    from qalora_ext.model import set_module
    from qalora_ext.nn import QALoRALinear

    model = qalora_ext.load_quantized(args.model).eval()
    tok = load_tokenizer(args.model)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    base = copy.deepcopy(model)
    for name, m in list(base.named_modules()):
        if isinstance(m, QALoRALinear):
            set_module(base, name, m.base)
    merged = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qalora_ext.merge_adapters(merged)
    with torch.no_grad():
        ours = [merged(torch.tensor([i])).logits[0].double().numpy() for i in ids]
        plain = [base(torch.tensor([i])).logits[0].double().numpy() for i in ids]
    print(f"model {args.model}: {sum(isinstance(m, QALoRALinear) for m in model.modules())} adapted layers; "
          f"{len(PROMPTS)} prompts, {sum(map(len, ids))} positions; ours with vs without the adapter: "
          f"{fmt(distances(ours, plain))}")
    if args.gguf:
        import llama_cpp

        # F32 KV cache: llama.cpp's default F16 cache would add its own rounding to attention.
        llm = llama_cpp.Llama(os.fspath(args.gguf), logits_all=True, n_ctx=512, type_k=0, type_v=0,
                              n_threads=os.cpu_count(), verbose=False)
        theirs = []
        for i in ids:
            llm.reset()
            llm.eval(i)
            theirs.append(np.array(llm.scores[: len(i)], dtype=np.float64))
        print(f"llama.cpp ({args.gguf}) vs ours with the adapter: {fmt(distances(ours, theirs))}; "
              f"vs ours without it: {fmt(distances(plain, theirs))}")
    if args.mlx:
        import mlx.core as mx
        import mlx_lm

        mlx_model, _ = mlx_lm.load(os.fspath(args.mlx))
        theirs = [np.array(mlx_model(mx.array([i]))[0].astype(mx.float32)).astype(np.float64) for i in ids]
        print(f"mlx-lm ({args.mlx}) vs ours with the adapter: {fmt(distances(ours, theirs))}; "
              f"vs ours without it: {fmt(distances(plain, theirs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quick start: quantize a layer to INT3, train its QA-LoRA adapter, merge, compare.

The toy task: a "pretrained" float layer W, and a fine-tuning target that
adds a low-rank change acting on group-averaged inputs (what a QA-LoRA
adapter can learn). We quantize W to 3 bits (group size 32), train only the
adapter, fold it into the zeros, and show that the merged layer, still
INT3, gives the trained layer's outputs.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

import qalora_ext
from qalora_ext import reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-features", type=int, default=1024)
    ap.add_argument("--out-features", type=int, default=1024)
    ap.add_argument("--bits", type=int, default=3, choices=(2, 3, 4))
    ap.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    K, N, G = args.in_features, args.out_features, args.group_size
    print(f"qalora_ext {qalora_ext.__version__}: CPU kernels '{qalora_ext.build_info()['cpu_isa_active']}'")

    # The pretrained layer and the task it should be fine-tuned to.
    pretrained = torch.nn.Linear(K, N)
    task_A = torch.randn(args.rank // 2, K // G) / (K // G) ** 0.5
    task_B = torch.randn(N, args.rank // 2)

    def target(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return pretrained(x) + (reference.pool(x, G).float() @ task_A.t()) @ task_B.t()

    x_eval = torch.randn(512, K)
    y_eval = target(x_eval)

    t0 = time.perf_counter()
    layer = qalora_ext.QALoRALinear.from_linear(pretrained, bits=args.bits, group_size=G, rank=args.rank, alpha=args.rank)
    print(f"quantized {N}x{K} to INT{args.bits}, G={G} in {time.perf_counter() - t0:.2f} s: "
          f"{layer.base.packed.numel() * 4 / 2**20:.2f} MiB of codes "
          f"(float32 weight: {N * K * 4 / 2**20:.2f} MiB)")
    with torch.no_grad():
        print(f"  weight error of quantization   ||W~ - W|| / ||W|| = "
              f"{rel_err(layer.dequantize(), pretrained.weight):.4f}")
        print(f"  task error before fine-tuning  ||y - target|| / ||target|| = {rel_err(layer(x_eval), y_eval):.4f}")

    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for step in tqdm(range(args.steps), desc="train adapter", unit="step"):
        x = torch.randn(64, K)
        loss = torch.nn.functional.mse_loss(layer(x), target(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    with torch.no_grad():
        y_trained = layer(x_eval)
        print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s")
        print(f"  task error after fine-tuning   {rel_err(y_trained, y_eval):.4f}  (adapter unmerged)")

        merged = layer.merge()
        y_merged = merged(x_eval)
        same_codes = torch.equal(merged.packed, layer.base.packed) and torch.equal(merged.scale, layer.base.scale)
        print(f"merged into the zeros: still INT{merged.bits} (codes and scales unchanged: {same_codes}), "
              f"adapter lost to zero rounding: {merged.merge_lost_fraction:.2e}")
        print(f"  task error after merge         {rel_err(y_merged, y_eval):.4f}")
        print(f"  merged vs unmerged outputs     {rel_err(y_merged, y_trained):.2e}")


if __name__ == "__main__":
    main()

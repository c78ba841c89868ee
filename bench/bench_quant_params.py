"""What training the scales and zeros costs: one packed layer's forward + backward, side by side.

Configurations of one ``QALoRALinear`` (INT-b, group G), in one process,
interleaved round by round so load drifts hit all alike:
  adapter          QA-LoRA as before (lora_A, lora_B)
  adapter+dzero    plus the per-group zero shift (grad = gy^T xsum: M x N x K/G)
  adapter+dscale   plus learned scales (grad = sum_g q (gy^T x): one M x N x K GEMM)
  dscale+dzero     rank 0: scales and zeros alone
Reports the median of each (forward + backward of x and every parameter) and
the ratio to ``adapter``. SPEC says the scales' gradient is a GEMM as large
as the forward's, so about +50% of the backward.

    python bench/bench_quant_params.py                  # 4096 x 4096, INT3 G32, M 128 and 512
    python bench/bench_quant_params.py --quick          # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine_info, machine_line, markdown_table  # noqa: E402

from qalora_ext.nn import QALoRALinear, QuantLinear  # noqa: E402

CONFIGS = {
    "adapter": dict(rank=16),
    "adapter+dzero": dict(rank=16, train_zero=True),
    "adapter+dscale": dict(rank=16, train_scale=True),
    "dscale+dzero": dict(rank=0, train_scale=True, train_zero=True),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--m", default="128,512")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.k, args.m, args.rounds = 256, 512, "64", 2
    torch.manual_seed(0)
    linear = torch.nn.Linear(args.k, args.n, bias=False)
    base = QuantLinear.from_linear(linear, args.bits, args.group_size)
    layers = {}
    for name, kw in CONFIGS.items():
        layer = QALoRALinear(base, alpha=16, **kw)
        with torch.no_grad():
            for p in layer.trainable_parameters().values():
                p.normal_(0, 1e-3)
        layers[name] = layer
    rows = []
    for m in [int(v) for v in args.m.split(",")]:
        x = torch.randn(m, args.k, requires_grad=True)
        gy = torch.randn(m, args.n)

        def step(layer):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(gy)

        times = {name: [] for name in layers}
        for name, layer in layers.items():  # warm-up
            step(layer)
        for _ in range(args.rounds):
            for name, layer in layers.items():
                t0 = time.perf_counter()
                step(layer)
                times[name].append(time.perf_counter() - t0)
        ref = statistics.median(times["adapter"])
        for name in layers:
            med = statistics.median(times[name])
            rows.append([m, name, f"{1e3 * med:.1f}", f"{med / ref:.2f}x"])
            print(f"M={m} {name:16s} {1e3 * med:8.1f} ms  {med / ref:.2f}x", flush=True)
    print()
    print(f"{args.n} x {args.k} INT{args.bits} G{args.group_size}, float32 x; forward + backward, median of "
          f"{args.rounds} interleaved rounds; {machine_line(machine_info())}")
    print(markdown_table(["M", "trains", "fwd+bwd ms", "vs adapter"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""GPU time of ``qalora_ext.ops.qlinear`` beside cuBLAS float16 and torch's tinygemm int4 kernel.

For shapes N x K (default 4096x4096, 8192x8192, 11008x4096) and M rows of x
(default 1, 4, 16, 64, 256, 4096): our INT4 G32 op (float16 scales, float32
zeros, float16 x), ``F.linear`` float16 (cuBLAS) and
``torch.ops.aten._weight_int4pack_mm`` (tinygemm, bfloat16 x) in the same run;
INT3 and INT2 at M = 1 and 16 on 8192x8192; the adapter epilogue's cost at
M = 1. At M = 1 the share of HBM bandwidth, measured in the same run by a
large device-to-device copy (bytes read + written); our bytes are codes +
scales + zeros + x + y (+ adapter).

Each timing captures a CUDA graph that calls the op once on each of R weight
sets (R sets > 100 MB together, twice the H100's 50 MB L2), replays it, and
reports the median replay time over R (CUDA events). Tables on stdout,
progress on stderr; the end checks issue 5's targets (PASS / MISS).

    python bench/bench_gpu.py                 # the full table (well under 2 minutes on an H100)
    python bench/bench_gpu.py --quick         # 8192x8192, M = 1 and 16, INT4: a smoke run
    python bench/bench_gpu.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import qalora_ext
from qalora_ext import ops

ROTATE_BYTES = 100 << 20  # > 2x the H100's 50 MB L2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x4096,8192x8192,11008x4096", help="NxK,...")
    p.add_argument("--m", default="1,4,16,64,256,4096", help="rows of x")
    p.add_argument("--replays", type=int, default=20, help="timed graph replays per case (median)")
    p.add_argument("--quick", action="store_true", help="8192x8192, M = 1 and 16, INT4 only, few replays")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    a.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")]
    a.m = [int(v) for v in a.m.split(",")]
    if a.quick:
        a.shapes, a.m, a.replays = [(8192, 8192)], [1, 16], 5
    return a


def time_graph(calls, replays: int) -> float:
    """Median seconds of one call: a CUDA graph runs every call in `calls` once per replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside the graph: cuBLAS handles, workspaces, allocator pools
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    del g
    return statistics.median(times)


def hbm_bandwidth() -> float:
    """Bytes per second of a 2 GB device-to-device copy (1 GB read + 1 GB written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = time_graph([lambda: dst.copy_(src)], 10)
    del src, dst
    return 2 * (1 << 30) / t


def copies_for(bytes_per_set: int) -> int:
    return max(1, -(-ROTATE_BYTES // bytes_per_set))


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def our_sets(w: torch.Tensor, bits: int, G: int = 32):
    q = ops.quantize_rtn(w, bits, G)  # float16 scales, float32 zeros
    n = copies_for(nbytes(*q))
    return [q] + [tuple(t.clone() for t in q) for _ in range(n - 1)], nbytes(*q)


def tinygemm_sets(w: torch.Tensor, G: int = 32):
    """torch's tinygemm int4 weight for w (its own RTN), or (None, reason)."""
    n, k = w.shape
    g = w.float().reshape(n, k // G, G)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = ((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).reshape(n, k).to(torch.int32)
    sz = torch.stack([scale.t(), (lo + 8 * scale).t()], -1).to(torch.bfloat16).contiguous()
    try:
        # torch >= 2.5: uint8 (N, K/2), two codes per byte, high nibble first
        u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
        torch.ops.aten._weight_int4pack_mm(torch.randn(1, k, device=w.device, dtype=torch.bfloat16), packed, G, sz)
    except Exception as e:  # noqa: BLE001  (a baseline that fails is reported, not fatal)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    per = nbytes(packed, sz)
    return [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(copies_for(per) - 1)], None


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() or not qalora_ext.build_info()["cuda_kernels"]:
        print("bench_gpu: needs a CUDA device and a CUDA build of qalora_ext", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t_start = time.perf_counter()
    bw = hbm_bandwidth()
    name = torch.cuda.get_device_name()
    print(f"device {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); qalora_ext "
          f"{qalora_ext.__version__}; measured HBM copy bandwidth {bw / 1e9:.0f} GB/s (read + written)")
    rows, bit_rows, adapter_rows = [], [], []
    for n, k in args.shapes:
        w = torch.randn(n, k, device=dev) * 0.02
        wf = [w.half()]
        wf += [wf[0].clone() for _ in range(copies_for(nbytes(wf[0])) - 1)]
        ours4, bytes4 = our_sets(w, 4)
        tiny, why = tinygemm_sets(w)
        if tiny is None:
            print(f"[bench_gpu] tinygemm unavailable at {n}x{k}: {why}", file=sys.stderr)
        for m in args.m:
            print(f"[bench_gpu] {n}x{k} M={m}", file=sys.stderr)
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            xb = x.bfloat16()
            t_ours = time_graph([lambda q=q: ops.qlinear(x, *q, bits=4, group_size=32) for q in ours4],
                                args.replays)
            t_cublas = time_graph([lambda W=W: F.linear(x, W) for W in wf], args.replays)
            t_tiny = None
            if tiny is not None:
                try:
                    t_tiny = time_graph([lambda p=p, sz=sz: torch.ops.aten._weight_int4pack_mm(xb, p, 32, sz)
                                         for p, sz in tiny], args.replays)
                except Exception as e:  # noqa: BLE001
                    print(f"[bench_gpu] tinygemm failed at {n}x{k} M={m}: {e}", file=sys.stderr)
            moved = bytes4 + 2 * m * (k + n)
            rows.append({"N": n, "K": k, "M": m, "ours_s": t_ours, "cublas_s": t_cublas, "tinygemm_s": t_tiny,
                         "hbm_pct": 100 * moved / t_ours / bw if m == 1 else None})
        if (n, k) == (8192, 8192):
            for bits in (4, 3, 2) if not args.quick else (4,):
                sets, b = (ours4, bytes4) if bits == 4 else our_sets(w, bits)
                for m in (1, 16):
                    x = torch.randn(m, k, device=dev, dtype=torch.float16)
                    t = time_graph([lambda q=q: ops.qlinear(x, *q, bits=bits, group_size=32) for q in sets],
                                   args.replays)
                    bit_rows.append({"bits": bits, "M": m, "s": t,
                                     "hbm_pct": 100 * (b + 2 * m * (k + n)) / t / bw})
            x = torch.randn(1, k, device=dev, dtype=torch.float16)
            base = time_graph([lambda q=q: ops.qlinear(x, *q, bits=4, group_size=32) for q in ours4], args.replays)
            for r in (16, 64):
                ads = [(torch.randn(r, k // 32, device=dev) * 0.1, torch.randn(n, r, device=dev) * 0.1)
                       for _ in ours4]
                t = time_graph([lambda q=q, a=a: ops.qlinear(x, *q, lora_A=a[0], lora_B=a[1], bits=4,
                                                             group_size=32) for q, a in zip(ours4, ads)],
                               args.replays)
                adapter_rows.append({"r": r, "base_s": base, "adapter_s": t, "overhead_pct": 100 * (t / base - 1)})
        del w, wf, ours4, tiny
        torch.cuda.empty_cache()

    us = lambda s: "" if s is None else f"{s * 1e6:.1f}"  # noqa: E731
    print("\n## INT4 G32 (float16 x) vs cuBLAS float16 and tinygemm (bfloat16 x); times in us\n")
    print("| N x K | M | ours | cuBLAS fp16 | tinygemm | cuBLAS/ours | tinygemm/ours | % HBM (M=1) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        tg = f"{r['tinygemm_s'] / r['ours_s']:.2f}" if r["tinygemm_s"] else ""
        hbm = f"{r['hbm_pct']:.0f}%" if r["hbm_pct"] is not None else ""
        print(f"| {r['N']}x{r['K']} | {r['M']} | {us(r['ours_s'])} | {us(r['cublas_s'])} | {us(r['tinygemm_s'])} | "
              f"{r['cublas_s'] / r['ours_s']:.2f} | {tg} | {hbm} |")
    if bit_rows:
        print("\n## bits at 8192x8192 G32\n\n| bits | M | us | % HBM |\n|---:|---:|---:|---:|")
        for r in bit_rows:
            print(f"| {r['bits']} | {r['M']} | {us(r['s'])} | {r['hbm_pct']:.0f}% |")
    if adapter_rows:
        print("\n## adapter epilogue, M=1, 8192x8192 INT4\n\n| r | without us | with us | overhead |\n|---:|---:|---:|---:|")
        for r in adapter_rows:
            print(f"| {r['r']} | {us(r['base_s'])} | {us(r['adapter_s'])} | {r['overhead_pct']:+.1f}% |")

    # Issue 5's targets
    lines = []

    def check(label, value, target, higher=True, unit="x"):
        ok = value >= target if higher else value <= target
        lines.append(f"- {label}: {value:.2f}{unit} (target {'>=' if higher else '<='} {target:g}{unit}) "
                     f"{'PASS' if ok else 'MISS'}")

    at = {(r["N"], r["K"], r["M"]): r for r in rows}
    b = {(r["bits"], r["M"]): r for r in bit_rows}
    for bits in (4, 3, 2):
        if (bits, 1) in b:
            check(f"M=1 8192x8192 INT{bits} share of HBM", b[(bits, 1)]["hbm_pct"], 60, unit="%")
    r = at.get((8192, 8192, 1))
    if r:
        check("M=1 8192x8192 INT4 vs cuBLAS fp16", r["cublas_s"] / r["ours_s"], 2.5)
    if (3, 1) in b and (4, 1) in b:
        check("M=1 INT3 speed-up over our INT4", b[(4, 1)]["s"] / b[(3, 1)]["s"], 1.15)
    if (2, 1) in b and (4, 1) in b:
        check("M=1 INT2 speed-up over our INT4", b[(4, 1)]["s"] / b[(2, 1)]["s"], 1.45)
    r = at.get((8192, 8192, 16))
    if r:
        check("M=16 8192x8192 INT4 vs cuBLAS fp16", r["cublas_s"] / r["ours_s"], 2.5)
    for r in rows:
        if r["tinygemm_s"]:
            check(f"{r['N']}x{r['K']} M={r['M']} vs tinygemm", r["tinygemm_s"] / r["ours_s"], 1.0)
        if r["M"] == 4096:
            check(f"{r['N']}x{r['K']} M=4096 throughput vs cuBLAS fp16", r["cublas_s"] / r["ours_s"], 0.9)
    for r in adapter_rows:
        check(f"adapter r={r['r']} overhead at M=1", r["overhead_pct"], 5 if r["r"] == 16 else 10, higher=False,
              unit="%")
    print("\n## issue 5 targets\n")
    print("\n".join(lines))
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": name, "hbm_copy_Bps": bw, "rows": rows, "bits": bit_rows,
                       "adapter": adapter_rows, "targets": lines}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

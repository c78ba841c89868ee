#!/usr/bin/env python
"""CPU forward time of ``qalora_ext.ops.qlinear`` beside float32 ``torch.nn.functional.linear``.

Tables on stdout (progress goes to stderr):

* **ceilings**, measured first in the same process: the memory read
  bandwidth (sum of a 256 MB float32 tensor) and the float32 GEMM rate
  (F.linear at M=128 on the first shape, multiply-adds per second).
* **forward**: for every shape N x K, bits and M, the median time of our op
  (no bias, no adapter), of ``F.linear(x, W)`` in float32 on the same x and,
  at INT4, of torch's ``_weight_int4pack_mm_for_cpu`` (bfloat16 x, the same
  group size); the ratios (> 1: ours is faster); the bandwidth our op reaches
  on its weight bytes (packed + scale + zero) and its share of the measured
  read bandwidth; below 64 rows also the opt-in int8-activation op
  (``ops.qlinear_int8``). At M=1 the two floors: weight bytes / bandwidth and
  M*N*K / GEMM rate.
* **backward**: ``qlinear_grad_input`` against the dense ``grad_y @ W``.
* **adapter**: INT4 time with a random float32 (lora_A, lora_B) of rank r
  against the same call without, as an overhead percentage.
* **bf16** (issue 18): INT4, for every shape and --bf16-m: our op with
  float32 x, with bfloat16 x (the bf16 GEMM at M >= the small-M threshold
  where the CPU has one: ``build_info()['cpu_bf16_gemm']``), with bfloat16 x
  and that GEMM turned off (``_C.set_cpu_bf16_gemm(False)``: the float32
  computation bf16 x ran before), F.linear in float32 and in bfloat16, and
  torch's ``_weight_int4pack_mm_for_cpu`` (bfloat16 x), interleaved.
* **bf16_backward**: ``qlinear_grad_input`` with bfloat16 grad_y (bf16 GEMM
  on and off) against the dense bfloat16 ``grad_y @ W``, every shape.
* **crossover**: time of the op (INT4 unless --crossover-bits) at M rows
  around the small-M threshold (``kSmallMThreshold`` in csrc/checks.h:
  below it the packed small-M kernel runs; at or above it blocks of W are
  dequantized and BLAS does the GEMM), beside a Python stand-in for the
  large-M path that runs at any M (an upper bound of its cost). Where the
  stand-in beats the small-M kernel, the threshold is too high.

Every timed call reads its weight from memory, not from cache: each series
cycles through enough copies of its operands (> 64 MB, twice this machine's
L3), and the series of a row are interleaved call by call. Each row is
timed in --rounds visits spread over the run and its samples pooled: the
tables give medians (min, p90 and per-round medians in --json) and the
"spread" of the per-round medians, which shows a slow spell of a shared
machine. A visit during which other processes used the CPUs is redone (see
--retries); "others' cores" says how much they used.

    python bench/bench_cpu.py                      # the default tables
    python bench/bench_cpu.py --threads 1 --json bench/results/cpu_t1.json
    python bench/bench_cpu.py --quick              # smoke run, few repeats

The summary at the end checks each target of issue 4 (PASS / MISS).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402  (bench/ is not a package)

import qalora_ext  # noqa: E402
from qalora_ext import ops  # noqa: E402

# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def _int_list(s: str) -> list[int]:
    try:
        out = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {s!r}") from None
    if not out or any(v <= 0 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive integers; got {s!r}")
    return out


def _shapes(s: str) -> list[tuple[int, int]]:
    out = []
    for item in s.split(","):
        try:
            n, k = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shapes are NxK (out x in features), e.g. 4096x4096; got {item!r}") \
                from None
        out.append((n, k))
    return out


TABLES = ("forward", "backward", "adapter", "crossover", "bf16", "bf16_backward")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=_shapes, default=[(4096, 4096), (11008, 4096), (4096, 11008)],
                   help="NxK,... (default 4096x4096,11008x4096,4096x11008: Llama's square and MLP shapes)")
    p.add_argument("--m", type=_int_list, default=[1, 16, 128, 512], help="rows of x (default 1,16,128,512)")
    p.add_argument("--backward-m", type=_int_list, default=[1, 16, 128, 512],
                   help="rows of grad_y in the backward table, first shape, INT4 (default 1,16,128,512)")
    p.add_argument("--bits", type=_int_list, default=[2, 3, 4], help="default 2,3,4")
    p.add_argument("--group-size", type=int, default=32, help="default 32")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch intra-op threads (default {torch.get_num_threads()})")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per row, all rounds together (default: 50 at M=1, 10-50 elsewhere to fit "
                        "--budget)")
    p.add_argument("--budget", type=float, default=1.5,
                   help="seconds of timed calls per row (all rounds) when choosing repeats (default 1.5)")
    p.add_argument("--rounds", type=int, default=None,
                   help="times every row is visited, its repeats split among them (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="3 repeats, 1 warm-up call, 1 round, no retries: a smoke run, not a measurement")
    p.add_argument("--tables", default=",".join(TABLES), help=f"which tables (default {','.join(TABLES)})")
    p.add_argument("--adapter-m", type=_int_list, default=[1, 128], help="default 1,128")
    p.add_argument("--adapter-r", type=_int_list, default=[16, 64], help="default 16,64")
    p.add_argument("--crossover-m", type=_int_list, default=None,
                   help="on the first shape (default 1,2,4,8,12,16,24,32,48,64 and T-1, T for the built "
                        "threshold T)")
    p.add_argument("--crossover-bits", type=_int_list, default=[4], help="default 4")
    p.add_argument("--bf16-m", type=_int_list, default=[16, 64, 128, 512],
                   help="rows of x of the bf16 tables (default 16,64,128,512)")
    p.add_argument("--retries", type=int, default=None,
                   help="times a series is repeated when other processes used the CPUs meanwhile (default 3; "
                        "0 with --quick)")
    p.add_argument("--max-foreign", type=float, default=0.1,
                   help="CPU cores other processes may use during a series before it counts as unclean "
                        "(default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write every result as JSON")
    a = p.parse_args(argv)
    a.tables = [t.strip() for t in a.tables.split(",") if t.strip()]
    for t in a.tables:
        if t not in TABLES:
            p.error(f"--tables: unknown table {t!r} (known: {', '.join(TABLES)})")
    for b in a.bits + a.crossover_bits:
        if b not in (2, 3, 4):
            p.error(f"--bits/--crossover-bits: bits must be 2, 3 or 4; got {b}")
    if a.group_size not in (32, 64, 128):
        p.error(f"--group-size must be 32, 64 or 128; got {a.group_size}")
    for n, k in a.shapes:
        if k % a.group_size or n <= 0 or k <= 0:
            p.error(f"--shapes: {n}x{k}: K must be a positive multiple of the group size {a.group_size}")
    if a.crossover_m is None:
        t = int(qalora_ext._C.SMALL_M_THRESHOLD)
        a.crossover_m = sorted({1, 2, 4, 8, 12, 16, 24, 32, 48, 64, max(1, t - 1), t})
    if a.retries is None:
        a.retries = 0 if a.quick else 3
    if a.rounds is None:
        a.rounds = 1 if a.quick else 3
    if a.rounds < 1:
        p.error(f"--rounds must be >= 1; got {a.rounds}")
    if a.threads < 1:
        p.error(f"--threads must be >= 1; got {a.threads}")
    if a.repeats is not None and a.repeats < 1:
        p.error(f"--repeats must be >= 1; got {a.repeats}")
    return a


# ---------------------------------------------------------------------------
# Operands
# ---------------------------------------------------------------------------


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def quantized_copies(w: torch.Tensor, bits: int, group_size: int) -> tuple[list[tuple], int]:
    """(packed, scale, zero) copies of w's RTN quantization, together > 64 MB; and bytes per copy."""
    q = ops.quantize_rtn(w, bits, group_size)  # float16 scales, float32 zeros (the defaults)
    per_copy = nbytes(*q)
    n = _timing.rotation_copies(per_copy)
    return [q] + [tuple(t.clone() for t in q) for _ in range(n - 1)], per_copy


def float_copies(w: torch.Tensor) -> list[torch.Tensor]:
    return [w] + [w.clone() for _ in range(_timing.rotation_copies(nbytes(w)) - 1)]


# ---------------------------------------------------------------------------
# Cases and the runner
# ---------------------------------------------------------------------------


@dataclass
class Case:
    """One row of a table: series timed interleaved, and how to turn their stats into the row."""

    table: str
    label: str
    m: int
    series: list[tuple[Callable[[int], object], int]]  # (call(copy index), number of copies)
    finish: Callable[[list[_timing.Stats]], dict]
    samples: list[list[float]] = field(default_factory=list)
    round_medians: list[list[float]] = field(default_factory=list)
    envs: list[dict] = field(default_factory=list)


class Runner:
    """Times every case once per round, so that a slow spell of the machine spoils one round, not a row.

    Each case's samples of all rounds are pooled; its row reports their
    median (and min, p90) and the spread of its per-round medians.
    """

    def __init__(self, args: argparse.Namespace, bar: tqdm):
        self.args = args
        self.bar = bar
        self.warmup = 1 if args.quick else 3
        self.unclean = 0

    def repeats(self, m: int, estimate_s: float) -> int:
        """Timed calls of one round."""
        a = self.args
        if a.repeats is not None:
            total = a.repeats
        elif a.quick:
            total = 3
        elif m == 1:
            total = 50
        else:
            total = _timing.auto_repeats(estimate_s, a.budget, lo=10, hi=50)
        return max(1, -(-total // a.rounds))

    def time_case(self, case: Case, round_: int) -> None:
        """One round of a case. A round during which other processes took more than --max-foreign cores
        is thrown away and repeated (after waiting for a quiet second), up to --retries times; the last is
        kept and the row is marked."""
        a = self.args
        waited = 0.0
        for attempt in range(1, a.retries + 2):
            retry = "" if attempt == 1 else f" (retry {attempt - 1}: machine busy)"
            self.bar.set_postfix_str(f"round {round_ + 1}/{a.rounds}: {case.label}{retry}")
            if attempt > 1:
                waited += _timing.wait_until_quiet(max_cores=a.max_foreign)
            mon = _timing.CpuMonitor()
            est = sum(_timing.estimate_call_s(c, n) for c, n in case.series)
            samples = _timing.time_rotating(case.series, self.repeats(case.m, est), self.warmup)
            env = mon.result()
            clean = not _timing.CpuMonitor.busy(env, a.max_foreign)
            if clean:
                break
        env.update(clean=clean, attempts=attempt, waited_s=round(waited, 1))
        if not case.samples:
            case.samples = [[] for _ in case.series]
        for pooled, s in zip(case.samples, samples):
            pooled.extend(s)
        case.round_medians.append([_timing.Stats.of(s).median_s for s in samples])
        case.envs.append(env)
        self.bar.update(1)

    def run(self, cases: list[Case]) -> list[dict]:
        for r in range(self.args.rounds):
            for case in cases:
                self.time_case(case, r)
        rows = []
        for case in cases:
            row = case.finish([_timing.Stats.of(s) for s in case.samples])
            first = [rm[0] for rm in case.round_medians]
            clean = all(e["clean"] for e in case.envs)
            self.unclean += not clean
            row.update(table=case.table, rounds=len(case.round_medians), round_medians_s=case.round_medians,
                       spread=max(first) / min(first), repeats=len(case.samples[0]), clean=clean,
                       foreign_cores=max((e["foreign_cores"] or 0.0) for e in case.envs), envs=case.envs)
            rows.append(row)
        return rows


def ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


# ---------------------------------------------------------------------------
# The cases of each table
# ---------------------------------------------------------------------------


def int4pack_copies(w: torch.Tensor, group_size: int, copies: int):
    """torch's own CPU int4 weight (``_convert_weight_to_int4pack_for_cpu``): its RTN codes of w with
    bfloat16 scales and zeros, ``copies`` copies; None (and the reason) where torch refuses the shape."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    codes = ((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).reshape(n, k).to(torch.int32)
    # torch's int4 format: W = (q - 8) * scale + zero, so zero = lo + 8 * scale
    sz = torch.stack([scale.t(), (lo + 8 * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        x = torch.randn(1, k, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)
    except (RuntimeError, AttributeError) as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(copies - 1)], None


def forward_cases(args, gen: torch.Generator) -> list[Case]:
    G = args.group_size
    threshold = int(qalora_ext._C.SMALL_M_THRESHOLD)
    cases = []
    for n, k in args.shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        wf = float_copies(w)
        xs = {m: torch.randn(m, k, generator=gen) for m in args.m}
        tiny = None
        if 4 in args.bits:
            tiny, why = int4pack_copies(w, G, _timing.rotation_copies(n * k // 2 + n * (k // G) * 4))
            if tiny is None:
                print(f"[bench_cpu] {n}x{k} G{G}: torch's int4pack baseline unavailable ({why})", file=sys.stderr)
        for bits in args.bits:
            qs, q_bytes = quantized_copies(w, bits, G)
            for m in args.m:
                x = xs[m]
                xb = x.to(torch.bfloat16)

                def ours(i, x=x, qs=qs, bits=bits):
                    p, s, z = qs[i]
                    return ops.qlinear(x, p, s, z, bias=None, bits=bits, group_size=G)

                def ref(i, x=x, wf=wf):
                    return F.linear(x, wf[i])

                def int8(i, x=x, qs=qs, bits=bits):
                    p, s, z = qs[i]
                    return ops.qlinear_int8(x, p, s, z, bits=bits, group_size=G)

                def int4pack(i, xb=xb, tiny=tiny):
                    packed, sz = tiny[i]
                    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, G, sz)

                series = [(ours, len(qs)), (ref, len(wf))]
                has_i8 = m < threshold
                has_tiny = bits == 4 and tiny is not None
                if has_i8:
                    series.append((int8, len(qs)))
                if has_tiny:
                    series.append((int4pack, len(tiny)))

                def finish(st, n=n, k=k, bits=bits, m=m, q_bytes=q_bytes, w_bytes=nbytes(w),
                           copies=(len(qs), len(wf)), has_i8=has_i8, has_tiny=has_tiny):
                    so, sr = st[0], st[1]
                    extra = list(st[2:])
                    si8 = extra.pop(0) if has_i8 else None
                    stiny = extra.pop(0) if has_tiny else None
                    io_bytes = 4 * m * (n + k)  # x read, y written
                    return {"N": n, "K": k, "bits": bits, "group_size": G, "M": m,
                            "ours": so.as_dict(), "f_linear": sr.as_dict(), "ratio": sr.median_s / so.median_s,
                            "int8": si8.as_dict() if si8 else None,
                            "int8_ratio": sr.median_s / si8.median_s if si8 else None,
                            "int4pack": stiny.as_dict() if stiny else None,
                            "int4pack_ratio": stiny.median_s / so.median_s if stiny else None,
                            "ours_weight_bytes": q_bytes, "ours_gbps": (q_bytes + io_bytes) / so.median_s / 1e9,
                            "f_linear_weight_bytes": w_bytes, "f_linear_gbps": w_bytes / sr.median_s / 1e9,
                            "copies_ours": copies[0], "copies_f_linear": copies[1]}

                cases.append(Case("forward", f"{n}x{k} int{bits} M={m}", m, series, finish))
    return cases


def backward_cases(args, gen: torch.Generator) -> list[Case]:
    G, bits = args.group_size, 4
    n, k = args.shapes[0]
    w = torch.randn(n, k, generator=gen) * 0.02
    wf = float_copies(w)
    qs, _ = quantized_copies(w, bits, G)
    cases = []
    for m in args.backward_m:
        gy = torch.randn(m, n, generator=gen)

        def ours(i, gy=gy):
            p, s, z = qs[i]
            return ops.qlinear_grad_input(gy, p, s, z, bits=bits, group_size=G)

        def dense(i, gy=gy):
            return gy @ wf[i]

        def finish(st, m=m):
            so, sd = st
            return {"N": n, "K": k, "bits": bits, "group_size": G, "M": m, "ours": so.as_dict(),
                    "dense": sd.as_dict(), "ours_over_dense": so.median_s / sd.median_s}

        cases.append(Case("backward", f"grad_x int{bits} M={m}", m, [(ours, len(qs)), (dense, len(wf))], finish))
    return cases


def _bf16_gemm_off(fn):
    """fn run with the bf16 GEMM turned off (bf16 x takes the float32 computation), then turned back on."""
    def call(i):
        qalora_ext._C.set_cpu_bf16_gemm(False)
        try:
            return fn(i)
        finally:
            qalora_ext._C.set_cpu_bf16_gemm(True)
    return call


def bf16_cases(args, gen: torch.Generator) -> list[Case]:
    """Issue 18's table: INT4 G, float32 vs bfloat16 x, ours vs F.linear (both dtypes) vs torch's int4pack."""
    G, bits = args.group_size, 4
    cases = []
    for n, k in args.shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        wf = float_copies(w)
        wb = [t.to(torch.bfloat16) for t in float_copies(w.to(torch.bfloat16))]
        qs, _ = quantized_copies(w, bits, G)
        tiny, why = int4pack_copies(w, G, _timing.rotation_copies(n * k // 2 + n * (k // G) * 4))
        if tiny is None:
            print(f"[bench_cpu] {n}x{k} G{G}: torch's int4pack baseline unavailable ({why})", file=sys.stderr)
        for m in args.bf16_m:
            x = torch.randn(m, k, generator=gen)
            xb = x.to(torch.bfloat16)

            def ours32(i, x=x, qs=qs):
                p, s, z = qs[i]
                return ops.qlinear(x, p, s, z, bits=bits, group_size=G)

            def ours16(i, xb=xb, qs=qs):
                p, s, z = qs[i]
                return ops.qlinear(xb, p, s, z, bits=bits, group_size=G)

            def lin32(i, x=x, wf=wf):
                return F.linear(x, wf[i])

            def lin16(i, xb=xb, wb=wb):
                return F.linear(xb, wb[i])

            def int4pack(i, xb=xb, tiny=tiny):
                packed, sz = tiny[i]
                return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, G, sz)

            series = [(ours32, len(qs)), (ours16, len(qs)), (_bf16_gemm_off(ours16), len(qs)), (lin32, len(wf)),
                      (lin16, len(wb))]
            if tiny is not None:
                series.append((int4pack, len(tiny)))

            def finish(st, n=n, k=k, m=m):
                names = ["ours_f32", "ours_bf16", "ours_bf16_gemm_off", "f_linear_f32", "f_linear_bf16", "int4pack"]
                row = {"N": n, "K": k, "bits": bits, "group_size": G, "M": m}
                row.update({name: s.as_dict() for name, s in zip(names, st)})
                row.setdefault("int4pack", None)
                return row

            cases.append(Case("bf16", f"bf16 {n}x{k} int{bits} M={m}", m, series, finish))
    return cases


def bf16_backward_cases(args, gen: torch.Generator) -> list[Case]:
    G, bits = args.group_size, 4
    cases = []
    for n, k in args.shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        wb = [t.to(torch.bfloat16) for t in float_copies(w.to(torch.bfloat16))]
        qs, _ = quantized_copies(w, bits, G)
        for m in args.bf16_m:
            gy = torch.randn(m, n, generator=gen).to(torch.bfloat16)

            def ours(i, gy=gy, qs=qs):
                p, s, z = qs[i]
                return ops.qlinear_grad_input(gy, p, s, z, bits=bits, group_size=G)

            def dense(i, gy=gy, wb=wb):
                return gy @ wb[i]

            def finish(st, n=n, k=k, m=m):
                so, soff, sd = st
                return {"N": n, "K": k, "bits": bits, "group_size": G, "M": m, "ours": so.as_dict(),
                        "ours_gemm_off": soff.as_dict(), "dense": sd.as_dict()}

            cases.append(Case("bf16_backward", f"bf16 grad_x {n}x{k} M={m}", m,
                              [(ours, len(qs)), (_bf16_gemm_off(ours), len(qs)), (dense, len(wb))], finish))
    return cases


def measure_ceilings(args, gen: torch.Generator) -> dict:
    """Memory read bandwidth (sum of a 256 MB float32 tensor: 256 MB read per call) and the float32 GEMM
    rate (F.linear at M=128 on the first shape, weights rotated), medians of repeated calls."""
    big = torch.randn(64 << 20, generator=gen)  # 256 MB, 8x this machine's L3
    big.sum()
    reps = 3 if args.quick else 15
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        big.sum()
        ts.append(time.perf_counter() - t)
    read_gbps = big.numel() * 4 / _timing.Stats.of(ts).median_s / 1e9
    del big
    n, k = args.shapes[0]
    wf = float_copies(torch.randn(n, k, generator=gen))
    x = torch.randn(128, k, generator=gen)
    samples = _timing.time_rotating([(lambda i: F.linear(x, wf[i]), len(wf))], 4 if args.quick else 20, 2)[0]
    gemm_macs = 128 * n * k / _timing.Stats.of(samples).median_s
    return {"read_gbps": read_gbps, "gemm_macs_per_s": gemm_macs, "gemm_shape": f"128x{k} @ {k}x{n}"}


def adapter_cases(args, gen: torch.Generator) -> list[Case]:
    G, bits = args.group_size, 4
    n, k = args.shapes[0]
    L = k // G
    w = torch.randn(n, k, generator=gen) * 0.02
    qs, _ = quantized_copies(w, bits, G)
    cases = []
    for r in args.adapter_r:
        ads = [(torch.randn(r, L, generator=gen) * 0.1, torch.randn(n, r, generator=gen) * 0.1) for _ in qs]
        for m in args.adapter_m:
            x = torch.randn(m, k, generator=gen)

            def base(i, x=x):
                p, s, z = qs[i]
                return ops.qlinear(x, p, s, z, bits=bits, group_size=G)

            def with_adapter(i, x=x, ads=ads):
                p, s, z = qs[i]
                a, b = ads[i]
                return ops.qlinear(x, p, s, z, lora_A=a, lora_B=b, scaling=2.0, bits=bits, group_size=G)

            def finish(st, m=m, r=r):
                sb, sa = st
                return {"N": n, "K": k, "bits": bits, "group_size": G, "M": m, "r": r,
                        "base": sb.as_dict(), "adapter": sa.as_dict(),
                        "overhead_pct": (sa.median_s / sb.median_s - 1) * 100}

            cases.append(Case("adapter", f"adapter r={r} M={m}", m, [(base, len(qs)), (with_adapter, len(qs))],
                              finish))
    return cases


def dequant_block_rows(k: int) -> int:
    """The block height of the op's large-M path (csrc/cpu/ops_cpu.cpp, dequant_block_rows)."""
    rows = (4 << 20) // (4 * k)
    return max(64, min(1024, rows // 16 * 16))


def large_path_replica(x, p, s, z, bits: int, G: int, dequant_only: bool = False) -> torch.Tensor:
    """A Python stand-in for the op's large-M path, runnable at any M: dequantize blocks of
    rows, then y[:, block] = x @ W_blk^T, each step a separate parallel call. The op itself
    does both inside one parallel region (csrc/cpu/ops_cpu.cpp) and is faster, so this is an upper
    bound of the large path's cost."""
    n = p.shape[0]
    rows = dequant_block_rows(s.shape[1] * G)
    y = torch.empty(x.shape[0], n)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        wb = ops.dequantize(p[n0:n1], s[n0:n1], z[n0:n1], bits, G)
        if not dequant_only:
            torch.mm(x, wb.t(), out=y[:, n0:n1])
    return y


def crossover_cases(args, gen: torch.Generator, bits: int) -> list[Case]:
    G = args.group_size
    n, k = args.shapes[0]
    threshold = int(qalora_ext._C.SMALL_M_THRESHOLD)
    w = torch.randn(n, k, generator=gen) * 0.02
    qs, _ = quantized_copies(w, bits, G)

    # The replica must compute what the op's large path computes.
    x16 = torch.randn(max(threshold, 1), k, generator=gen)
    torch.testing.assert_close(large_path_replica(x16, *qs[0], bits, G),
                               ops.qlinear(x16, *qs[0], bits=bits, group_size=G), rtol=1e-4, atol=1e-4)

    def dq(i):
        return large_path_replica(x16[:1], *qs[i], bits, G, dequant_only=True)

    cases = [Case(f"crossover{bits}", f"crossover int{bits} dequant only", 2, [(dq, len(qs))],
                  lambda st: {"bits": bits, "M": None, "dequant_only": st[0].as_dict()})]
    for m in args.crossover_m:
        x = torch.randn(m, k, generator=gen)

        def op(i, x=x):
            p, s, z = qs[i]
            return ops.qlinear(x, p, s, z, bits=bits, group_size=G)

        def replica(i, x=x):
            return large_path_replica(x, *qs[i], bits, G)

        def finish(st, m=m):
            so, sr = st
            return {"N": n, "K": k, "bits": bits, "group_size": G, "M": m, "threshold_built": threshold,
                    "op_path": "small-M kernel" if m < threshold else "dequant+BLAS",
                    "op": so.as_dict(), "large_path_replica": sr.as_dict()}

        cases.append(Case(f"crossover{bits}", f"crossover int{bits} M={m}", m, [(op, len(qs)), (replica, len(qs))],
                          finish))
    return cases


def crossover_summary(rows: list[dict]) -> dict:
    """One bits' crossover rows -> the table's data and the smallest M at which the large path wins."""
    dq = next(r for r in rows if r["M"] is None)
    body = [r for r in rows if r["M"] is not None]
    threshold = body[0]["threshold_built"]
    best = None
    for r in body:
        if r["M"] >= threshold or r["large_path_replica"]["median_s"] <= r["op"]["median_s"]:
            best = r["M"]
            break
    return {"N": body[0]["N"], "K": body[0]["K"], "bits": dq["bits"], "threshold_built": threshold,
            "dequant_block_rows": dequant_block_rows(body[0]["K"]), "dequant_only": dq["dequant_only"],
            "rows": body, "suggested_threshold": best}


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

BUSY = "others' cores"


def busy(r: dict) -> str:
    """Cores other processes used while the row was timed (the worst round); '!' marks a row kept busy."""
    return f"{r['foreign_cores']:.2f}" + ("" if r["clean"] else "!")


def _opt(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def forward_table(rows: list[dict], ceil: dict) -> str:
    return _timing.markdown_table(
        ["N x K", "bits", "M", "ours ms", "F.linear ms", "F.linear/ours", "int4pack ms", "int4pack/ours",
         "i8 act ms", "F.linear/i8", "ours GB/s", "% of read BW", "bytes floor ms", "MAC floor ms", "spread",
         BUSY],
        [[f"{r['N']}x{r['K']}", r["bits"], r["M"], ms(r["ours"]["median_s"]), ms(r["f_linear"]["median_s"]),
          f"{r['ratio']:.2f}", ms(r["int4pack"]["median_s"]) if r["int4pack"] else "",
          _opt(r["int4pack_ratio"], ".2f"), ms(r["int8"]["median_s"]) if r["int8"] else "",
          _opt(r["int8_ratio"], ".2f"), f"{r['ours_gbps']:.1f}", f"{100 * r['ours_gbps'] / ceil['read_gbps']:.0f}%",
          ms(r["ours_weight_bytes"] / (ceil["read_gbps"] * 1e9)) if r["M"] == 1 else "",
          ms(r["M"] * r["N"] * r["K"] / ceil["gemm_macs_per_s"]) if r["M"] == 1 else "",
          f"{r['spread']:.2f}x", busy(r)] for r in rows])


def backward_table(rows: list[dict]) -> str:
    return _timing.markdown_table(
        ["N x K", "bits", "M", "grad_input ms", "grad_y @ W ms", "ours/dense", "spread", BUSY],
        [[f"{r['N']}x{r['K']}", r["bits"], r["M"], ms(r["ours"]["median_s"]), ms(r["dense"]["median_s"]),
          f"{r['ours_over_dense']:.2f}", f"{r['spread']:.2f}x", busy(r)] for r in rows])


def bf16_table(rows: list[dict]) -> str:
    def t(r, key):
        return ms(r[key]["median_s"]) if r.get(key) else ""

    def ratio(r, num, den):
        return f"{r[num]['median_s'] / r[den]['median_s']:.2f}" if r.get(num) and r.get(den) else ""

    return _timing.markdown_table(
        ["N x K", "M", "ours f32 x ms", "ours bf16 x ms", "ours bf16 x, bf16 GEMM off ms", "F.linear f32 ms",
         "F.linear bf16 ms", "int4pack ms", "F.linear bf16 / ours bf16", "ours f32 / ours bf16",
         "int4pack / ours bf16", "spread", BUSY],
        [[f"{r['N']}x{r['K']}", r["M"], t(r, "ours_f32"), t(r, "ours_bf16"), t(r, "ours_bf16_gemm_off"),
          t(r, "f_linear_f32"), t(r, "f_linear_bf16"), t(r, "int4pack"), ratio(r, "f_linear_bf16", "ours_bf16"),
          ratio(r, "ours_f32", "ours_bf16"), ratio(r, "int4pack", "ours_bf16"), f"{r['spread']:.2f}x", busy(r)]
         for r in rows])


def bf16_backward_table(rows: list[dict]) -> str:
    return _timing.markdown_table(
        ["N x K", "M", "grad_input bf16 ms", "bf16 GEMM off ms", "grad_y @ W bf16 ms", "dense / ours", "spread",
         BUSY],
        [[f"{r['N']}x{r['K']}", r["M"], ms(r["ours"]["median_s"]), ms(r["ours_gemm_off"]["median_s"]),
          ms(r["dense"]["median_s"]), f"{r['dense']['median_s'] / r['ours']['median_s']:.2f}",
          f"{r['spread']:.2f}x", busy(r)] for r in rows])


def bf16_target_summary(results: dict) -> list[str]:
    """Issue 18's targets: speeds as ratios (> target: PASS)."""
    lines = []

    def check(name, value, target):
        lines.append(f"- {name}: {value:.2f}x (target >= {target:g}x) {'PASS' if value >= target else 'MISS'}")

    for r in results.get("bf16", []):
        shape = f"{r['N']}x{r['K']} M={r['M']}"
        speed = r["f_linear_bf16"]["median_s"] / r["ours_bf16"]["median_s"]
        if r["M"] == 128:
            check(f"{shape} bf16 x: ours vs F.linear bf16", speed, 0.7)
        if r["M"] == 512:
            check(f"{shape} bf16 x: ours vs F.linear bf16", speed, 0.8)
            check(f"{shape} bf16 x: ours vs our float32 path", r["ours_f32"]["median_s"] / r["ours_bf16"]["median_s"],
                  2.0)
    for r in results.get("bf16_backward", []):
        if r["M"] == 512:
            check(f"{r['N']}x{r['K']} M=512 grad_input bf16 vs dense bf16 grad_y @ W",
                  r["dense"]["median_s"] / r["ours"]["median_s"], 0.8)
    return lines


def target_summary(results: dict) -> list[str]:
    """Issue 4's targets against this run: one line each, PASS or MISS (only those this run measured)."""
    G = results["config"]["group_size"]
    fw = {(r["N"], r["K"], r["bits"], r["M"]): r for r in results["forward"]}
    lines = []

    def check(name: str, value: float, target: float, higher_is_better: bool, unit: str = "x") -> None:
        ok = value >= target if higher_is_better else value <= target
        rel = ">=" if higher_is_better else "<="
        lines.append(f"- {name}: {value:.2f}{unit} (target {rel} {target:g}{unit}) {'PASS' if ok else 'MISS'}")

    for (n, k) in {(r["N"], r["K"]) for r in results["forward"]}:
        shape = f"{n}x{k} G{G}"
        r1 = fw.get((n, k, 4, 1))
        if r1:
            check(f"{shape} M=1 INT4 vs F.linear", r1["ratio"], 4.5, True)
            if r1["int4pack_ratio"] is not None:
                check(f"{shape} M=1 INT4 vs int4pack", r1["int4pack_ratio"], 2.0, True)
            if r1["int8_ratio"] is not None:
                check(f"{shape} M=1 INT4 int8-activations vs F.linear", r1["int8_ratio"], 6.0, True)
            for b in (3, 2):
                rb = fw.get((n, k, b, 1))
                if rb:
                    check(f"{shape} M=1 INT{b} time / INT4 time", rb["ours"]["median_s"] / r1["ours"]["median_s"],
                          1.0, False)
        r2 = fw.get((n, k, 2, 1))
        if r2 and r2["int8_ratio"] is not None:
            check(f"{shape} M=1 INT2 int8-activations vs F.linear", r2["int8_ratio"], 8.0, True)
        r16 = fw.get((n, k, 4, 16))
        if r16:
            check(f"{shape} M=16 INT4 vs F.linear", r16["ratio"], 1.5, True)
        for m in (128, 512):
            for b in (2, 3, 4):
                r = fw.get((n, k, b, m))
                if r:
                    check(f"{shape} M={m} INT{b} time / F.linear time", 1 / r["ratio"], 1.25, False)
    for r in results["adapter"]:
        check(f"adapter r={r['r']} M={r['M']} overhead", r["overhead_pct"], 10.0 if r["r"] <= 16 else 20.0, False,
              "%")
    for r in results["backward"]:
        if r["M"] == 512:
            check(f"grad_x M=512 time / dense grad_y @ W", r["ours_over_dense"], 1.3, False)
    return lines


def adapter_table(rows: list[dict]) -> str:
    return _timing.markdown_table(
        ["N x K", "bits", "M", "r", "no adapter ms", "with adapter ms", "overhead", "spread", BUSY],
        [[f"{r['N']}x{r['K']}", r["bits"], r["M"], r["r"], ms(r["base"]["median_s"]), ms(r["adapter"]["median_s"]),
          f"{r['overhead_pct']:+.1f}%", f"{r['spread']:.2f}x", busy(r)] for r in rows])


def crossover_table(c: dict) -> str:
    return _timing.markdown_table(
        ["M", "op path", "op ms", "op ms/row", "large-path replica ms", "replica ms/row", "replica/op", "spread",
         BUSY],
        [[r["M"], r["op_path"], ms(r["op"]["median_s"]), ms(r["op"]["median_s"] / r["M"]),
          ms(r["large_path_replica"]["median_s"]), ms(r["large_path_replica"]["median_s"] / r["M"]),
          f"{r['large_path_replica']['median_s'] / r['op']['median_s']:.2f}", f"{r['spread']:.2f}x", busy(r)]
         for r in c["rows"]])


def build_id() -> dict:
    """Which build of the extension ran: its file's hash and time, and the git state of its sources.

    Kernels change often; a table means little without the build it measured.
    """
    so = qalora_ext._C.__file__
    with open(so, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    out = {"_C_sha256": digest,
           "_C_mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(so)))}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "csrc", "CMakeLists.txt"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")
        out["git_head"] = head
        out["sources_modified"] = ";".join(line[3:] for line in dirty if line.strip()) or "none"
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    info = _timing.machine_info(qalora_ext=qalora_ext.__version__,
                                cpu_isa=qalora_ext.build_info()["cpu_isa_active"],
                                cpu_bf16_gemm=qalora_ext.build_info()["cpu_bf16_gemm"],
                                small_m_threshold=int(qalora_ext._C.SMALL_M_THRESHOLD))
    info.update(build_id())

    load0, monitor = _timing.load_average(), _timing.CpuMonitor()
    t0 = time.perf_counter()
    print("[bench_cpu] measuring the read-bandwidth and GEMM ceilings", file=sys.stderr)
    ceil = measure_ceilings(args, gen)
    cases: list[Case] = []
    if "forward" in args.tables:
        cases += forward_cases(args, gen)
    if "backward" in args.tables:
        cases += backward_cases(args, gen)
    if "adapter" in args.tables:
        cases += adapter_cases(args, gen)
    if "bf16" in args.tables:
        cases += bf16_cases(args, gen)
    if "bf16_backward" in args.tables:
        cases += bf16_backward_cases(args, gen)
    if "crossover" in args.tables:
        for b in args.crossover_bits:
            cases += crossover_cases(args, gen, b)
    with tqdm(total=len(cases) * args.rounds, file=sys.stderr, desc="bench_cpu", dynamic_ncols=True) as bar:
        run = Runner(args, bar)
        rows = run.run(cases)

    results = {"machine": info, "config": {k: v for k, v in vars(args).items() if k != "json"}}
    results["ceilings"] = ceil
    results["forward"] = [r for r in rows if r["table"] == "forward"]
    results["backward"] = [r for r in rows if r["table"] == "backward"]
    results["adapter"] = [r for r in rows if r["table"] == "adapter"]
    results["bf16"] = [r for r in rows if r["table"] == "bf16"]
    results["bf16_backward"] = [r for r in rows if r["table"] == "bf16_backward"]
    results["crossover"] = [crossover_summary([r for r in rows if r["table"] == f"crossover{b}"])
                            for b in args.crossover_bits if "crossover" in args.tables]
    results["wall_s"] = time.perf_counter() - t0
    whole = results["whole_run"] = monitor.result()
    results["load_avg_at_start"] = load0
    results["unclean_rows"] = run.unclean

    out = [f"machine: {_timing.machine_line(info)}",
           f"group size {args.group_size}; x float32; ours: qalora_ext.ops.qlinear (RTN weights, float16 scales, "
           f"float32 zeros, no bias); reference: torch.nn.functional.linear float32; weights rotated through "
           f"> 64 MB of copies; times: medians of {args.rounds} round(s) pooled; spread: slowest / fastest "
           f"round's median of the first column" + ("; --quick: NOT a measurement" if args.quick else ""),
           "", f"ceilings: memory read {ceil['read_gbps']:.1f} GB/s (sum of 256 MB); float32 GEMM "
           f"{ceil['gemm_macs_per_s'] / 1e9:.1f} G multiply-adds/s ({ceil['gemm_shape']})"]
    if results["forward"]:
        out += ["", "## forward (ratios > 1: ours faster; GB/s = (weight + x + y bytes) / median time; int4pack: "
                    "torch's _weight_int4pack_mm_for_cpu, bfloat16 x; i8 act: ops.qlinear_int8; floors at M=1: "
                    "weight bytes / read bandwidth and M*N*K / GEMM rate)", "",
                forward_table(results["forward"], ceil)]
    if results["backward"]:
        out += ["", "## backward: grad_x = qlinear_grad_input vs dense grad_y @ W (float32)", "",
                backward_table(results["backward"])]
    if results["adapter"]:
        out += ["", "## adapter overhead (INT4; lora_A (r, K/G), lora_B (N, r) float32)", "",
                adapter_table(results["adapter"])]
    if results["bf16"]:
        out += ["", f"## bfloat16 x (issue 18; INT4 G{args.group_size}; bf16 GEMM: "
                    f"{qalora_ext.build_info()['cpu_bf16_gemm']}; ratios > 1: ours bf16 faster)", "",
                bf16_table(results["bf16"])]
    if results["bf16_backward"]:
        out += ["", "## bfloat16 grad_input (issue 18; INT4) vs dense bfloat16 grad_y @ W", "",
                bf16_backward_table(results["bf16_backward"])]
    for c in results["crossover"]:
        out += ["", f"## small-M / large-M crossover (INT{c['bits']} {c['N']}x{c['K']}; built threshold "
                    f"{c['threshold_built']}: the op runs the small-M kernel for M < {c['threshold_built']})", "",
                crossover_table(c), "",
                f"dequantize alone ({c['dequant_block_rows']}-row blocks, no GEMM): "
                f"{ms(c['dequant_only']['median_s'])} ms; "
                f"smallest measured M where the large path is no slower: {c['suggested_threshold']}"]
    summary = target_summary(results)
    if summary:
        out += ["", "## issue 4 targets in this run", ""] + summary
    summary18 = bf16_target_summary(results)
    if summary18:
        out += ["", "## issue 18 targets in this run", ""] + summary18
    load = "?" if load0 is None else f"{load0:.2f}"
    out += ["", f"wall time {results['wall_s']:.0f} s; load average at start {load}; CPU time of other processes "
                f"during the run {whole['foreign_cpu_s']} s (retries and waits included), stolen by the host "
                f"{whole['steal_s']} s; \"{BUSY}\": their share while the row was timed (worst round)"]
    if run.unclean:
        msg = (f"WARNING: {run.unclean} row(s) marked '!' were timed while other processes used more than "
               f"{args.max_foreign} cores even after {args.retries} retries; their times are inflated. "
               "Repeat on a quiet machine.")
        out.append(msg)
        print(msg, file=sys.stderr)
    print("\n".join(out))

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

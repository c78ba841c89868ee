#!/usr/bin/env python
"""GPU time of ``qalora_ext.ops.qlinear`` beside cuBLAS float16 and torch's tinygemm int4 kernel.

Issue 5's table. For shapes N x K (default 4096x4096, 8192x8192, 11008x4096)
and M rows of x (default 1, 4, 16, 64, 256, 4096): our INT4 G32 op (float16
scales, float32 zeros: the defaults of ``ops.quantize_rtn``; float16 x),
``F.linear`` in float16 (cuBLAS) and ``torch.ops.aten._weight_int4pack_mm``
(tinygemm, bfloat16 x, its own INT4 G32 weight) in the same run. INT3 and INT2
beside INT4 at M = 1 and 16 on 8192x8192, and the adapter epilogue's cost at
M = 1 (8192x8192 INT4, rank 16 and 64, against the same call without it).

At M = 1 the share of HBM bandwidth: the card's bandwidth is measured in the
same run by a 1 GiB device-to-device copy (bytes read + written); our bytes
are codes + scales + zeros + x + y (+ adapter), cuBLAS's the float16 weight +
x + y.

Each timing captures a CUDA graph that calls the op once on each of R weight
sets (R sets together > max(100 MB, 2 x L2), so every call streams its
weight from HBM), replays it a few times to warm up, then times replays with
CUDA events: the median replay divided by R. Where capture fails the calls
are timed eagerly instead (marked ``eager``). A baseline or case that fails
prints ``n/a`` and the reason on stderr; the run goes on. Tables on stdout
(markdown), progress on stderr; the end checks issue 5's targets (PASS /
MISS / n/a).

    python bench/bench_gpu.py                       # the full table (well under 2 minutes on an H100)
    python bench/bench_gpu.py --quick               # 8192x8192, M = 1 and 16: a smoke run
    python bench/bench_gpu.py --json out.json --out-dir results/
    python bench/bench_gpu.py --dry-run             # no GPU: made-up timings, to check the report code
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from typing import Callable, Optional, Sequence

import torch

G = 32  # group size of every table
MIN_ROTATE_BYTES = 100 << 20  # > 2x the H100's 50 MB L2
BIT_SHAPE = (8192, 8192)  # the shape of the bits and adapter tables
BIT_ROWS = (1, 16)
ADAPTER_RANKS = (16, 64)
PATH_ROWS = (1, 4, 8, 16, 32, 64, 128, 256, 512)  # the path-by-M table (8192x8192 INT4, float16 x)
PATHS = ("gemv", "mma", "dequant+cublas")
GRAD_ROWS = (16, 256, 1024, 4096)  # qlinear_grad_input by path (8192x8192 INT4, bfloat16 grad_out)

# Issue 5's targets: (key, label, comparison, threshold, unit)
TARGETS_DOC = """\
M=1 8192x8192 G32: INT4 / INT3 / INT2 >= 60% of the measured HBM bandwidth; INT4 >= 2.5x faster than cuBLAS fp16;
INT3 >= 1.15x and INT2 >= 1.45x faster than our INT4. M=16 8192x8192 INT4: >= 2.5x faster than cuBLAS fp16 and
faster than tinygemm. M=4096: >= 0.9x of cuBLAS fp16's throughput. Adapter epilogue at M=1 8192x8192 INT4:
<= 5% (r=16), <= 10% (r=64)."""


def log(msg: str) -> None:
    print(f"[bench_gpu] {msg}", file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for s in text.split(","):
        s = s.strip().lower()
        if not s:
            continue
        n, k = s.split("x")
        out.append((int(n), int(k)))
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TARGETS_DOC)
    p.add_argument("--shapes", default="4096x4096,8192x8192,11008x4096",
                   help="N x K of the main table, comma-separated")
    p.add_argument("--m", default="1,4,16,64,256,4096", help="rows of x of the main table, comma-separated")
    p.add_argument("--replays", type=int, default=20, help="timed graph replays per case (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed graph replays before timing")
    p.add_argument("--quick", action="store_true",
                   help="8192x8192, M = 1 and 16, bits at M = 1, adapter r = 16, 10 replays: a smoke run")
    p.add_argument("--json", metavar="PATH", help="write every number (and the targets) as JSON")
    p.add_argument("--out-dir", metavar="DIR", help="also write the markdown report to DIR/gpu_bench.md")
    p.add_argument("--dry-run", action="store_true", help="no GPU: made-up timings, to check the report code")
    a = p.parse_args(argv)
    try:
        a.shapes = _shapes(a.shapes)
        a.m = _ints(a.m)
    except ValueError as e:
        p.error(f"bad --shapes / --m: {e}")
    a.bit_rows, a.adapter_ranks, a.adapter_rounds = list(BIT_ROWS), list(ADAPTER_RANKS), 3
    a.path_rows = list(PATH_ROWS)
    a.grad_rows = list(GRAD_ROWS)
    if a.quick:
        a.shapes, a.m, a.replays = [BIT_SHAPE], [1, 16], min(a.replays, 10)
        a.bit_rows, a.adapter_ranks, a.adapter_rounds = [1], [16], 1
        a.path_rows = [8, 16, 64]
        a.grad_rows = [256]
    if a.replays < 1 or a.warmup < 0:
        p.error("--replays must be >= 1 and --warmup >= 0")
    for n, k in a.shapes:
        if n < 1 or k < G or k % 128:
            p.error(f"shape {n}x{k}: K must be a positive multiple of 128 (G = {G}, tinygemm's k-tiles)")
    return a


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def copies_for(bytes_per_set: int, rotate_bytes: int) -> int:
    """Weight sets needed so that together they exceed `rotate_bytes` (at least 1, at most 64)."""
    return max(1, min(64, -(-rotate_bytes // max(1, bytes_per_set))))


def _event_times(launch: Callable[[], None], replays: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for s, e in zip(starts, ends):
        s.record()
        launch()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]


def time_calls(calls: Sequence[Callable[[], object]], replays: int, warmup: int) -> tuple[float, str]:
    """(median seconds per call, "graph" or "eager"): a CUDA graph calls each of `calls` once per replay."""

    def run_all():
        for c in calls:
            c()

    # Warm-up outside the graph, on a side stream (cuBLAS handles and workspaces, allocator pools).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_all()
        run_all()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = None
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_all()
        launch, mode = graph.replay, "graph"
    except Exception as e:  # noqa: BLE001  (capture refused: time the calls eagerly instead)
        log(f"graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); timing eagerly")
        graph = None
        torch.cuda.synchronize()
        launch, mode = run_all, "eager"
    for _ in range(warmup):
        launch()
    torch.cuda.synchronize()
    times = _event_times(launch, replays)
    del graph
    return statistics.median(times) / len(calls), mode


def measure(label: str, calls: Sequence[Callable[[], object]], args) -> tuple[Optional[float], Optional[str]]:
    """(seconds per call or None, note): a failure is reported, never fatal."""
    try:
        t, mode = time_calls(calls, args.replays, args.warmup)
        return t, (None if mode == "graph" else mode)
    except Exception as e:  # noqa: BLE001
        log(f"{label} failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            pass
        return None, f"{type(e).__name__}"


def hbm_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read + written."""
    size = 1 << 30
    src = torch.empty(size, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    t, _ = time_calls([lambda: dst.copy_(src)], 10, 2)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * size / t


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def our_sets(w: torch.Tensor, bits: int, rotate_bytes: int):
    """R copies of (packed, scale, zero) for w, and the bytes of one."""
    from qalora_ext import ops

    q = ops.quantize_rtn(w, bits, G)  # float16 scales, float32 zeros
    per = nbytes(*q)
    return [q] + [tuple(t.clone() for t in q) for _ in range(copies_for(per, rotate_bytes) - 1)], per


def tinygemm_sets(w: torch.Tensor, rotate_bytes: int):
    """torch's tinygemm INT4 G32 weight for w (its own min-max RTN): (sets, bytes of one, note) or (None, 0, reason).

    torch >= 2.5 (2.11 included): ``_convert_weight_to_int4pack(uint8 (N, K/2), innerKTiles)``, two codes per
    byte, even k in the high nibble; ``_weight_int4pack_mm(x bf16 (M, K), packed, groupSize,
    scalesAndZeros bf16 (K/G, N, 2))`` with ``w = (q - 8) * scale + (min + 8 * scale)``. Older torch took int32
    codes (N, K); tried second.
    """
    n, k = w.shape
    g = w.float().reshape(n, k // G, G)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = ((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).reshape(n, k).to(torch.int32)
    sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/G, N, 2)
    w_dq = (q.reshape(n, k // G, G).float() * scale.unsqueeze(-1) + lo.unsqueeze(-1)).reshape(n, k)
    errors = []
    for form in ("uint8", "int32"):
        try:
            if form == "uint8":
                src = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
            else:
                src = q.contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack(src, 8)
            x = torch.randn(4, k, device=w.device, dtype=torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm(x, packed, G, sz)
            ref = x.float() @ w_dq.t()
            err = ((y.float() - ref).norm() / ref.norm()).item()
        except Exception as e:  # noqa: BLE001
            errors.append(f"{form} codes: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
            continue
        note = None if err < 0.02 else f"tinygemm output off by {err:.2g} (layout?): timed anyway"
        if note:
            log(note)
        per = nbytes(packed, sz)
        sets = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(copies_for(per, rotate_bytes) - 1)]
        return sets, per, note
    return None, 0, "; ".join(errors)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def collect(args) -> dict:
    import qalora_ext
    from qalora_ext import _C, ops

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = int(getattr(props, "L2_cache_size", 0) or (50 << 20))
    rotate = max(MIN_ROTATE_BYTES, 2 * l2 + (l2 >> 1))
    args.rotate_bytes = rotate
    torch.manual_seed(0)
    log("measuring HBM bandwidth (1 GiB copy)")
    bw = hbm_bandwidth()
    res = {
        "device": torch.cuda.get_device_name(dev), "sms": props.multi_processor_count, "l2_bytes": l2,
        "torch": torch.__version__, "cuda": torch.version.cuda, "qalora_ext": qalora_ext.__version__,
        "build_info": qalora_ext.build_info(), "hbm_copy_Bps": bw, "rotate_bytes": rotate,
        "replays": args.replays, "group_size": G, "main": [], "bits": [], "adapter": [], "tinygemm": {},
        "paths": [], "path_limits": dict(_C.cuda_path_limits()),
    }

    def ours_calls(sets, x, bits, adapters=None):
        if adapters is None:
            return [lambda q=q: ops.qlinear(x, *q, bits=bits, group_size=G) for q in sets]
        return [lambda q=q, a=a: ops.qlinear(x, *q, lora_A=a[0], lora_B=a[1], bits=bits, group_size=G)
                for q, a in zip(sets, adapters)]

    for n, k in args.shapes:
        log(f"{n}x{k}: preparing weights")
        w = torch.randn(n, k, device=dev) * 0.02
        ours4, bytes4 = our_sets(w, 4, rotate)
        w16 = w.half()
        fp16_sets = [w16] + [w16.clone() for _ in range(copies_for(nbytes(w16), rotate) - 1)]
        tiny, tiny_bytes, tiny_note = tinygemm_sets(w, rotate)
        res["tinygemm"][f"{n}x{k}"] = "ok" if tiny is not None and tiny_note is None else (tiny_note or "")
        if tiny is None:
            log(f"tinygemm n/a at {n}x{k}: {tiny_note}")
        for m in args.m:
            log(f"{n}x{k} M={m}")
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            xb = x.bfloat16()
            io = 2 * m * (k + n)  # x and y, 16-bit
            row = {"N": n, "K": k, "M": m, "R_ours": len(ours4), "R_cublas": len(fp16_sets),
                   "ours_bytes": bytes4 + io, "cublas_bytes": nbytes(w16) + io, "notes": []}
            row["ours_s"], note = measure(f"ours {n}x{k} M={m}", ours_calls(ours4, x, 4), args)
            if note:
                row["notes"].append(f"ours: {note}")
            row["cublas_s"], note = measure(f"cuBLAS {n}x{k} M={m}",
                                            [lambda W=W: torch.nn.functional.linear(x, W) for W in fp16_sets], args)
            if note:
                row["notes"].append(f"cuBLAS: {note}")
            row["tinygemm_s"] = None
            if tiny is not None:
                row["tinygemm_s"], note = measure(
                    f"tinygemm {n}x{k} M={m}",
                    [lambda p=p, sz=sz: torch.ops.aten._weight_int4pack_mm(xb, p, G, sz) for p, sz in tiny], args)
                if note:
                    row["notes"].append(f"tinygemm: {note}")
            res["main"].append(row)
        del w, w16, ours4, fp16_sets, tiny
        torch.cuda.empty_cache()

    n, k = BIT_SHAPE
    log(f"bits table at {n}x{k}")
    w = torch.randn(n, k, device=dev) * 0.02
    sets_by_bits = {}
    for bits in (4, 3, 2):
        try:
            sets_by_bits[bits] = our_sets(w, bits, rotate)
        except Exception as e:  # noqa: BLE001
            log(f"quantize_rtn INT{bits} failed: {type(e).__name__}: {e}")
            continue
        sets, per = sets_by_bits[bits]
        for m in args.bit_rows:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            t, note = measure(f"INT{bits} {n}x{k} M={m}", ours_calls(sets, x, bits), args)
            res["bits"].append({"bits": bits, "M": m, "s": t, "bytes": per + 2 * m * (k + n), "R": len(sets),
                                "note": note})
        if bits != 4:
            del sets_by_bits[bits]
            torch.cuda.empty_cache()
    if 4 in sets_by_bits:
        sets, per = sets_by_bits[4]
        x = torch.randn(1, k, device=dev, dtype=torch.float16)
        # A few % is the target: alternate the runs with and without the adapter (3 rounds, 1 with --quick) and
        # report the median of the per-round ratios, so a drift of the clock between runs cancels.
        ads = {r: [(torch.randn(r, k // G, device=dev) * 0.1, torch.randn(n, r, device=dev) * 0.1) for _ in sets]
               for r in args.adapter_ranks}
        base_t, with_t, notes = [], {r: [] for r in ads}, {}
        for i in range(args.adapter_rounds):
            log(f"adapter epilogue, round {i + 1} of {args.adapter_rounds}")
            base_t.append(measure(f"INT4 {n}x{k} M=1 (adapter base)", ours_calls(sets, x, 4), args)[0])
            for r, a in ads.items():
                t, note = measure(f"adapter r={r}", ours_calls(sets, x, 4, a), args)
                with_t[r].append(t)
                if note:
                    notes[r] = note
        for r in ads:
            pairs = [(b, t) for b, t in zip(base_t, with_t[r]) if b and t]
            res["adapter"].append({
                "r": r, "note": notes.get(r), "rounds": len(pairs),
                "base_s": statistics.median([b for b, _ in pairs]) if pairs else None,
                "adapter_s": statistics.median([t for _, t in pairs]) if pairs else None,
                "overhead_pct": statistics.median([100 * (t / b - 1) for b, t in pairs]) if pairs else None})
        del ads
        res["paths"] = time_paths(args, sets, n, k, ours_calls)
        res["grad_paths"] = time_grad_paths(args, sets, n, k)
    del w, sets_by_bits
    torch.cuda.empty_cache()
    return res


def path_limits_for(path: str, m: int) -> Optional[tuple[int, int]]:
    """(gemv_max_m, mma_max_m) that send M rows down `path`, or None where the path cannot take M."""
    from qalora_ext import _C

    if path == "gemv":
        return (m, m) if m <= _C.CUDA_GEMV_MAX_M else None
    if path == "mma":
        return (0, m)
    return (0, 0)


def time_paths(args, sets, n, k, ours_calls) -> list[dict]:
    """Every CUDA path of qlinear at every M of the path table (forced with _C.set_cuda_path_limits): the
    measured table the default limits come from."""
    from qalora_ext import _C

    saved = _C.cuda_path_limits()
    rows = []
    try:
        for m in args.path_rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            row = {"M": m, "N": n, "K": k}
            for path in PATHS:
                lim = path_limits_for(path, m)
                if lim is None:
                    row[path] = None
                    continue
                _C.set_cuda_path_limits(*lim)
                row[path], note = measure(f"path {path} {n}x{k} M={m}", ours_calls(sets, x, 4), args)
                if note:
                    row.setdefault("notes", []).append(f"{path}: {note}")
            rows.append(row)
    finally:
        _C.set_cuda_path_limits(saved["gemv_max_m"], saved["mma_max_m"])
    return rows


def time_grad_paths(args, sets, n, k) -> list[dict]:
    """qlinear_grad_input at the rows of the grad table, by tensor cores from the packed codes and by dequantize +
    cuBLAS (forced with grad_mma_max_m), beside the dense product gy @ W in bfloat16."""
    from qalora_ext import _C, ops

    saved = _C.cuda_path_limits()
    w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    dense_sets = [w16] + [w16.clone() for _ in range(copies_for(nbytes(w16), getattr(args, "rotate_bytes", MIN_ROTATE_BYTES)) - 1)]
    rows = []
    try:
        for m in args.grad_rows:
            gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            row = {"M": m, "N": n, "K": k}
            for label, lim in (("mma", 1 << 30), ("dequant+cublas", 0)):
                _C.set_cuda_path_limits(saved["gemv_max_m"], saved["mma_max_m"], lim)
                row[label], _ = measure(f"grad_input {label} M={m}", [
                    lambda q=q: ops.qlinear_grad_input(gy, *q, bits=4, group_size=G) for q in sets], args)
            row["dense"], _ = measure(f"dense gy @ W M={m}", [lambda W=W: gy @ W for W in dense_sets], args)
            rows.append(row)
    finally:
        _C.set_cuda_path_limits(saved["gemv_max_m"], saved["mma_max_m"], saved["grad_mma_max_m"])
    del dense_sets
    return rows


def recommended_limits(paths: list[dict], grad_paths: Optional[list[dict]] = None) -> Optional[dict]:
    """The limits the path table measured: gemv up to the largest M where it is the fastest path, the tensor-core
    kernel up to the largest M where it beats dequantize + cuBLAS."""
    if not paths:
        return None
    gemv_max, mma_max = 0, 0
    for r in paths:
        times = {p: r.get(p) for p in PATHS if r.get(p)}
        if not times:
            continue
        best = min(times, key=times.get)
        if best == "gemv":
            gemv_max = max(gemv_max, r["M"])
        if r.get("mma") and r.get("dequant+cublas") and r["mma"] < r["dequant+cublas"]:
            mma_max = max(mma_max, r["M"])
    rec = {"gemv_max_m": gemv_max, "mma_max_m": max(mma_max, gemv_max)}
    if grad_paths:
        wins = [r["M"] for r in grad_paths if r.get("mma") and r.get("dequant+cublas")
                and r["mma"] < r["dequant+cublas"]]
        rec["grad_mma_max_m"] = max(wins, default=0)
    return rec


def fake_results(args) -> dict:
    """Made-up timings from a bandwidth / compute model: for --dry-run (checks the report, not the GPU)."""
    bw, flops = 4.0e12, 6.0e14
    res = {"device": "dry run (no GPU)", "sms": 132, "l2_bytes": 50 << 20, "torch": torch.__version__,
           "cuda": None, "qalora_ext": None, "build_info": {}, "hbm_copy_Bps": bw, "rotate_bytes": MIN_ROTATE_BYTES,
           "replays": args.replays, "group_size": G, "main": [], "bits": [], "adapter": [],
           "tinygemm": {f"{n}x{k}": "ok" for n, k in args.shapes}, "paths": []}

    def model(bytes_, m, n, k, eff=0.8):
        return bytes_ / (bw * eff) + 2 * m * n * k / flops + 3e-6

    def wbytes(n, k, bits):
        return n * k * bits // 8 + n * (k // G) * 6

    for n, k in args.shapes:
        for m in args.m:
            io = 2 * m * (k + n)
            ob, cb = wbytes(n, k, 4) + io, 2 * n * k + io
            res["main"].append({"N": n, "K": k, "M": m, "R_ours": 3, "R_cublas": 1, "ours_bytes": ob,
                                "cublas_bytes": cb, "ours_s": model(ob, m, n, k, 0.75 if m < 64 else 0.5),
                                "cublas_s": model(cb, m, n, k, 0.9),
                                "tinygemm_s": None if m == 4096 else model(wbytes(n, k, 4) + io, m, n, k, 0.6),
                                "notes": ["tinygemm: RuntimeError"] if m == 4096 else []})
    n, k = BIT_SHAPE
    for bits in (4, 3, 2):
        for m in args.bit_rows:
            b = wbytes(n, k, bits) + 2 * m * (k + n)
            res["bits"].append({"bits": bits, "M": m, "s": model(b, m, n, k, 0.7), "bytes": b, "R": 3, "note": None})
    res["path_limits"] = {"gemv_max_m": 8, "mma_max_m": 128, "grad_mma_max_m": 256}
    res["grad_paths"] = [{"M": m, "N": n, "K": k, "mma": model(wbytes(n, k, 4) + 4 * m * (n + k), m, n, k, 0.5),
                          "dequant+cublas": model(2 * n * k + wbytes(n, k, 4) * 3 + 4 * m * (n + k), m, n, k, 0.9),
                          "dense": model(2 * n * k + 4 * m * (n + k), m, n, k, 0.9)} for m in args.grad_rows]
    for m in args.path_rows:
        io = 2 * m * (k + n)
        res["paths"].append({"M": m, "N": n, "K": k,
                             "gemv": model(wbytes(n, k, 4) + io, m, n, k, 0.75 / (1 + m / 8)) if m <= 8 else None,
                             "mma": model(wbytes(n, k, 4) + io, m, n, k, 0.6),
                             "dequant+cublas": model(2 * n * k + wbytes(n, k, 4) * 3 + io, m, n, k, 0.9)})
    base = model(wbytes(n, k, 4), 1, n, k, 0.75)
    for r in args.adapter_ranks:
        t = base * (1.03 if r == 16 else 1.12)
        res["adapter"].append({"r": r, "base_s": base, "adapter_s": t, "overhead_pct": 100 * (t / base - 1),
                               "note": None})
    return res


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _us(s: Optional[float]) -> str:
    return "n/a" if s is None else f"{s * 1e6:.1f}"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if (a is not None and b) else None


def _fmt(v: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def _pct(bytes_: int, s: Optional[float], bw: float) -> Optional[float]:
    return 100 * bytes_ / s / bw if (s and bw) else None


def targets(res: dict) -> list[dict]:
    """Issue 5's targets: each {label, value, target, op, unit, status} with status PASS / MISS / n/a."""
    out = []

    def check(label, value, target, op=">=", unit="x"):
        if value is None:
            status = "n/a"
        else:
            status = "PASS" if (value >= target if op == ">=" else value <= target) else "MISS"
        out.append({"label": label, "value": value, "target": target, "op": op, "unit": unit, "status": status})

    bw = res["hbm_copy_Bps"]
    bits = {(r["bits"], r["M"]): r for r in res["bits"]}
    main = {(r["N"], r["K"], r["M"]): r for r in res["main"]}
    n, k = BIT_SHAPE
    for b in (4, 3, 2):
        r = bits.get((b, 1))
        check(f"M=1 {n}x{k} INT{b}: share of measured HBM bandwidth",
              _pct(r["bytes"], r["s"], bw) if r else None, 60, unit="%")
    r = main.get((n, k, 1))
    check(f"M=1 {n}x{k} INT4: speed-up over cuBLAS fp16", _ratio(r["cublas_s"], r["ours_s"]) if r else None, 2.5)
    i4 = bits.get((4, 1))
    for b, want in ((3, 1.15), (2, 1.45)):
        rb = bits.get((b, 1))
        check(f"M=1 {n}x{k} INT{b}: speed-up over our INT4",
              _ratio(i4["s"], rb["s"]) if (i4 and rb) else None, want)
    r = main.get((n, k, 16))
    check(f"M=16 {n}x{k} INT4: speed-up over cuBLAS fp16", _ratio(r["cublas_s"], r["ours_s"]) if r else None, 2.5)
    check(f"M=16 {n}x{k} INT4: speed-up over tinygemm", _ratio(r["tinygemm_s"], r["ours_s"]) if r else None, 1.0)
    for r in res["main"]:
        if r["M"] == 4096:
            check(f"M=4096 {r['N']}x{r['K']}: throughput vs cuBLAS fp16", _ratio(r["cublas_s"], r["ours_s"]), 0.9)
    for r in res["adapter"]:
        check(f"M=1 {n}x{k} INT4: adapter epilogue r={r['r']}", r["overhead_pct"], 5 if r["r"] <= 16 else 10,
              op="<=", unit="%")
    return out


def render(res: dict, tgts: list[dict]) -> list[str]:
    bw = res["hbm_copy_Bps"]
    L = [f"# qalora_ext GPU benchmark: {res['device']}", ""]
    L.append(f"torch {res['torch']} (CUDA {res['cuda']}), qalora_ext {res['qalora_ext']}; {res['sms']} SMs, "
             f"L2 {res['l2_bytes'] / 2**20:.0f} MiB. Measured HBM bandwidth (1 GiB device copy, read + written): "
             f"**{bw / 1e9:.0f} GB/s**. Weights rotated over sets of > {res['rotate_bytes'] / 2**20:.0f} MiB; "
             f"CUDA graphs, median of {res['replays']} replays. Group size {res['group_size']}; ours: float16 "
             "scales, float32 zeros, float16 x; tinygemm: bfloat16 x. Times in microseconds per call.")
    L += ["", "## INT4 vs cuBLAS float16 and tinygemm", "",
          "| N x K | M | ours | cuBLAS fp16 | tinygemm | cuBLAS / ours | tinygemm / ours | ours % HBM | "
          "cuBLAS % HBM | notes |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["main"]:
        one = r["M"] == 1
        L.append(f"| {r['N']}x{r['K']} | {r['M']} | {_us(r['ours_s'])} | {_us(r['cublas_s'])} | "
                 f"{_us(r['tinygemm_s'])} | {_fmt(_ratio(r['cublas_s'], r['ours_s']))} | "
                 f"{_fmt(_ratio(r['tinygemm_s'], r['ours_s']))} | "
                 f"{_fmt(_pct(r['ours_bytes'], r['ours_s'], bw), '.0f', '%') if one else ''} | "
                 f"{_fmt(_pct(r['cublas_bytes'], r['cublas_s'], bw), '.0f', '%') if one else ''} | "
                 f"{'; '.join(r.get('notes') or [])} |")
    bad = {s: v for s, v in res.get("tinygemm", {}).items() if v != "ok"}
    if bad:
        L += [""] + [f"tinygemm at {s}: {v or 'n/a'}" for s, v in bad.items()]
    if res["bits"]:
        n, k = BIT_SHAPE
        i4 = {r["M"]: r["s"] for r in res["bits"] if r["bits"] == 4}
        L += ["", f"## Bits at {n}x{k}, G{res['group_size']}", "",
              "| bits | M | us | speed-up over INT4 | bytes moved | % HBM |", "|---:|---:|---:|---:|---:|---:|"]
        for r in res["bits"]:
            L.append(f"| {r['bits']} | {r['M']} | {_us(r['s'])} | {_fmt(_ratio(i4.get(r['M']), r['s']))} | "
                     f"{r['bytes'] / 2**20:.1f} MiB | {_fmt(_pct(r['bytes'], r['s'], bw), '.0f', '%')} |")
    if res["adapter"]:
        n, k = BIT_SHAPE
        L += ["", f"## Adapter epilogue, M=1, {n}x{k} INT4", "",
              "| rank | without (us) | with (us) | overhead |", "|---:|---:|---:|---:|"]
        for r in res["adapter"]:
            L.append(f"| {r['r']} | {_us(r['base_s'])} | {_us(r['adapter_s'])} | "
                     f"{_fmt(r['overhead_pct'], '+.1f', '%')} |")
    if res.get("paths"):
        r0 = res["paths"][0]
        L += ["", f"## Path by M, {r0['N']}x{r0['K']} INT4 G{res['group_size']}, float16 x (each path forced)", "",
              "| M | gemv (us) | mma (us) | dequant+cuBLAS (us) | fastest |", "|---:|---:|---:|---:|---|"]
        for r in res["paths"]:
            times = {p: r.get(p) for p in PATHS if r.get(p)}
            best = min(times, key=times.get) if times else "n/a"
            L.append(f"| {r['M']} | {_us(r.get('gemv'))} | {_us(r.get('mma'))} | {_us(r.get('dequant+cublas'))} | "
                     f"{best} |")
        rec = recommended_limits(res["paths"], res.get("grad_paths"))
        if res.get("grad_paths"):
            g0 = res["grad_paths"][0]
            L += ["", f"## qlinear_grad_input by path, {g0['N']}x{g0['K']} INT4 G{res['group_size']}, bfloat16 grad_out",
                  "", "| M | tensor cores (us) | dequant+cuBLAS (us) | dense gy @ W bf16 (us) | best time / dense |",
                  "|---:|---:|---:|---:|---:|"]
            for r in res["grad_paths"]:
                best = min([t for t in (r.get("mma"), r.get("dequant+cublas")) if t], default=None)
                L.append(f"| {r['M']} | {_us(r.get('mma'))} | {_us(r.get('dequant+cublas'))} | {_us(r.get('dense'))} | "
                         f"{_fmt(_ratio(best, r.get('dense')), '.2f', 'x')} |")
        L += ["", f"Limits in this build: {res.get('path_limits')}; measured here: {rec} "
              "(`_C.set_cuda_path_limits(gemv_max_m, mma_max_m, grad_mma_max_m)`; the defaults live in csrc/cuda/ops_cuda.cpp)."]
    L += ["", "## Issue 5 targets", ""]
    for t in tgts:
        v = _fmt(t["value"], ".1f" if t["unit"] == "%" else ".2f", t["unit"])
        L.append(f"- {t['label']}: {v} (target {t['op']} {t['target']:g}{t['unit']}): **{t['status']}**")
    counts = {s: sum(t["status"] == s for t in tgts) for s in ("PASS", "MISS", "n/a")}
    L += ["", f"{counts['PASS']} PASS, {counts['MISS']} MISS, {counts['n/a']} n/a"]
    return L


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.dry_run:
        res = fake_results(args)
    else:
        if not torch.cuda.is_available():
            log("needs a CUDA device (use --dry-run to check the report code without one)")
            return 2
        try:
            import qalora_ext
        except Exception as e:  # noqa: BLE001
            log(f"cannot import qalora_ext: {type(e).__name__}: {e}")
            return 2
        if not qalora_ext.build_info().get("cuda_kernels"):
            log("this build of qalora_ext has no CUDA kernels (rebuild with QALORA_CUDA=ON)")
            return 2
        try:
            res = collect(args)
        except Exception:  # noqa: BLE001  (print what broke; nothing to report)
            traceback.print_exc()
            return 1
    tgts = targets(res)
    lines = render(res, tgts)
    wall = time.perf_counter() - t0
    lines += ["", f"wall time {wall:.0f} s"]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    sys.stdout.flush()
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "gpu_bench.md"), "w") as f:
            f.write(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({**res, "targets": tgts, "wall_s": wall, "argv": list(argv) if argv else sys.argv[1:]}, f,
                      indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

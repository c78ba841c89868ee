"""One QA-LoRA training step of a Llama-7B-sized decoder block's seven projections, against the usual ways.

The block: q, k, v, o (4096x4096), gate, up (11008x4096), down (4096x11008); 4096 tokens per step, adapter
rank r = 64, bfloat16 activations, forward + backward (grad of the block's inputs and of the adapters; the
base weights are frozen). Variants, each timed alone in the same process, medians of CUDA-event times after
warm-up:

- ours:      ``QALoRALinear`` over INT4 G64 packed weights (float16 scales, float32 zeros): qalora_ext's CUDA
             forward and ``qlinear_grad_input`` backward, the pooled adapter (SPEC); once with the default paths
             and once with grad_x forced onto the tensor-core kernel that reads the packed codes.
- dense:     (a) a frozen bfloat16 ``nn.Linear`` with a float LoRA (``x A^T B^T``) under bfloat16 autocast: what
             full-precision LoRA costs.
- dequant:   (b) the same INT4 weights unpacked with torch ops (shifts and masks), dequantized to bfloat16 on
             every call and multiplied, with the same pooled adapter; eager, and under ``torch.compile``: what
             quantized-LoRA stacks built from torch ops do.

Also the peak memory of each variant's step (``torch.cuda.max_memory_allocated``) and the bytes of the base
weights. Targets (issue 6, on an H100): ours <= 1.15x the dense step; base weights >= 3.3x smaller than
bfloat16.

    python bench/bench_train_gpu.py                      # the table (about 30 s on an H100)
    python bench/bench_train_gpu.py --json out.json --out-dir results/
    python bench/bench_train_gpu.py --device cpu --scale 16 --no-compile --steps 2   # the code path, on a CPU
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
import torch.nn.functional as F

PROJECTIONS = (("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
               ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008))  # (name, N, K)
BITS, GROUP, RANK, ALPHA = 4, 64, 64, 16.0
TARGET_STEP_RATIO = 1.15
TARGET_MEMORY_RATIO = 3.3


def log(msg: str) -> None:
    print(f"[bench_train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (default 4096)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported; default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--scale", type=int, default=1,
                   help="divide every dimension by this (a multiple of 64 must remain): a small run of the same code")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of the code, not a benchmark)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--json", metavar="PATH", help="write every number as JSON")
    p.add_argument("--out-dir", metavar="DIR", help="also write the markdown table to DIR/train_bench.md")
    a = p.parse_args(argv)
    if a.tokens < 1 or a.steps < 1 or a.warmup < 0 or a.scale < 1:
        p.error("--tokens, --steps and --scale must be >= 1, --warmup >= 0")
    for _, n, k in PROJECTIONS:
        if (k // a.scale) % GROUP or (n // a.scale) < 1 or k % a.scale:
            p.error(f"--scale {a.scale}: {n}x{k} would not keep K a multiple of G = {GROUP}")
    return a


# ---- the three variants ------------------------------------------------------------------------------


def make_ours(weights, device):
    from qalora_ext.nn import QALoRALinear, QuantLinear

    layers = []
    for w in weights:
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w.cpu()
        q = QuantLinear.from_linear(lin, bits=BITS, group_size=GROUP, scale_dtype=torch.float16,
                                    zero_dtype=torch.float32)
        layer = QALoRALinear(q, rank=RANK, alpha=ALPHA).to(device)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)  # a trained adapter: every gradient term is live
        layers.append(layer)
    base_bytes = sum(t.numel() * t.element_size() for m in layers for t in (m.base.packed, m.base.scale, m.base.zero))

    def step(xs):
        return [layer(x) for layer, x in zip(layers, xs)]

    return step, base_bytes, [p for m in layers for p in (m.lora_A, m.lora_B)], layers


class DenseLoRA(torch.nn.Module):
    """A frozen bfloat16 linear plus a float32 LoRA (PEFT's formula), run under bfloat16 autocast."""

    def __init__(self, w):
        super().__init__()
        self.weight = torch.nn.Parameter(w.to(torch.bfloat16), requires_grad=False)
        self.lora_A = torch.nn.Parameter(torch.randn(RANK, w.shape[1], device=w.device) / w.shape[1] ** 0.5)
        self.lora_B = torch.nn.Parameter(torch.randn(w.shape[0], RANK, device=w.device) * 0.02)

    def forward(self, x):
        return F.linear(x, self.weight) + (ALPHA / RANK) * F.linear(F.linear(x, self.lora_A), self.lora_B)


def make_dense(weights, device):
    layers = [DenseLoRA(w.to(device)) for w in weights]

    def step(xs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return [layer(x) for layer, x in zip(layers, xs)]

    return step, sum(m.weight.numel() * 2 for m in layers), [p for m in layers for p in (m.lora_A, m.lora_B)], layers


def unpack_int4_torch(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Layout-1 INT4 codes with torch ops: word j of a row holds codes 8j .. 8j+7, lowest nibble first."""
    words = packed[:, : in_features // 8]
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], in_features)


class DequantLoRA(torch.nn.Module):
    """The packed INT4 weight dequantized to bfloat16 with torch ops on every call, plus the pooled adapter."""

    def __init__(self, q):
        super().__init__()
        self.k = q.in_features
        self.register_buffer("packed", q.packed)
        self.register_buffer("scale", q.scale)
        self.register_buffer("zero", q.zero)
        n, groups = q.scale.shape
        self.lora_A = torch.nn.Parameter(torch.randn(RANK, groups, device=q.packed.device) / groups ** 0.5)
        self.lora_B = torch.nn.Parameter(torch.randn(n, RANK, device=q.packed.device) * 0.02)

    def forward(self, x):
        codes = unpack_int4_torch(self.packed, self.k).view(self.packed.shape[0], -1, GROUP)
        w = (codes * self.scale.float().unsqueeze(-1) + self.zero.float().unsqueeze(-1)).to(torch.bfloat16)
        y = F.linear(x, w.reshape(self.packed.shape[0], self.k))
        pooled = x.float().unflatten(-1, (-1, GROUP)).mean(-1)
        return y + ((ALPHA / RANK) * F.linear(F.linear(pooled, self.lora_A), self.lora_B)).to(y.dtype)


def make_dequant(ours_layers, compiled: bool):
    layers = [DequantLoRA(m.base) for m in ours_layers]

    def run(xs):
        return [layer(x) for layer, x in zip(layers, xs)]

    step = torch.compile(run) if compiled else run
    return step, None, [p for m in layers for p in (m.lora_A, m.lora_B)], layers


# ---- timing ------------------------------------------------------------------------------------------


def time_steps(step: Callable, xs, grads, params, args, device) -> tuple[float, int]:
    """Median seconds of forward + backward, and the step's peak memory in bytes."""

    def one():
        for x in xs:
            x.grad = None
        for p in params:
            p.grad = None
        outs = step(xs)
        torch.autograd.backward(outs, grads)

    for _ in range(args.warmup):
        one()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            one()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        peak = torch.cuda.max_memory_allocated()
    else:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            one()
            times.append(time.perf_counter() - t0)
        peak = 0
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs), "missing or non-finite grad_x"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params), "missing adapter gradient"
    return statistics.median(times), peak


def collect(args) -> dict:
    import qalora_ext

    device = torch.device(args.device)
    torch.manual_seed(0)
    shapes = [(name, n // args.scale, k // args.scale) for name, n, k in PROJECTIONS]
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "qalora_ext": qalora_ext.__version__,
           "build_info": qalora_ext.build_info(), "tokens": args.tokens, "rank": RANK, "bits": BITS,
           "group_size": GROUP, "shapes": shapes, "steps": args.steps, "variants": []}
    weights = [torch.randn(n, k) * 0.02 for _, n, k in shapes]
    xs = [torch.randn(args.tokens, k, device=device, dtype=torch.bfloat16).requires_grad_() for _, _, k in shapes]
    grads = [torch.randn(args.tokens, n, device=device, dtype=torch.bfloat16) for _, n, _ in shapes]

    log("ours: quantizing the seven projections (INT4 G64)")
    ours = make_ours(weights, device)
    variants = [("ours (qalora_ext)", lambda: ours)]
    if device.type == "cuda":
        variants.append(("ours, grad_x by tensor cores (forced)", lambda: ours))
    variants += [("(a) dense bf16 + LoRA", lambda: make_dense(weights, device)),
                ("(b) dequant->bf16 matmul, eager", lambda: make_dequant(ours[3], False))]
    if not args.no_compile:
        variants.append(("(b) dequant->bf16 matmul, torch.compile", lambda: make_dequant(ours[3], True)))
    for label, make in variants:
        log(f"{label}: timing {args.warmup} + {args.steps} steps")
        try:
            step, base_bytes, params, layers = make()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            limits = qalora_ext._C.cuda_path_limits() if device.type == "cuda" else None
            if "forced" in label:
                qalora_ext._C.set_cuda_path_limits(limits["gemv_max_m"], limits["mma_max_m"], 1 << 30)
            try:
                t, peak = time_steps(step, xs, grads, params, args, device)
            finally:
                if limits:
                    qalora_ext._C.set_cuda_path_limits(*limits.values())
            res["variants"].append({"label": label, "step_s": t, "peak_bytes": peak, "base_bytes": base_bytes})
            log(f"{label}: {t * 1e3:.2f} ms, peak {peak / 2**30:.2f} GiB")
        except Exception as e:  # noqa: BLE001  (report it and go on with the others)
            traceback.print_exc()
            res["variants"].append({"label": label, "step_s": None, "peak_bytes": None, "base_bytes": None,
                                    "error": f"{type(e).__name__}: {e}"})
        finally:
            if not label.startswith("ours"):
                del step, params, layers
    return res


def report(res: dict) -> tuple[list[str], list[dict]]:
    v = {r["label"]: r for r in res["variants"]}
    ours, dense = v.get("ours (qalora_ext)"), v.get("(a) dense bf16 + LoRA")
    L = [f"# QA-LoRA training step, one Llama-7B block ({res['device']})", "",
         f"torch {res['torch']}, CUDA {res['cuda']}, qalora_ext {res['qalora_ext']}. {res['tokens']} tokens, "
         f"r = {res['rank']}, INT{res['bits']} G{res['group_size']} (float16 scales, float32 zeros), bfloat16 "
         f"activations; forward + backward of the seven projections "
         f"({', '.join(f'{n} {a}x{b}' for n, a, b in res['shapes'])}); median of {res['steps']} steps."
         + (" On a CPU this checks the code, it is not a benchmark (no GPU kernels, no peak memory)."
            if res["device"] == "cpu" else ""), "",
         "| variant | step (ms) | ours / variant | peak memory (GiB) | base weights (MiB) |",
         "|---|---:|---:|---:|---:|"]
    for r in res["variants"]:
        t = r["step_s"]
        ratio = (ours["step_s"] / t) if ours and ours["step_s"] and t else None
        step = "n/a" if t is None else f"{t * 1e3:.2f}"
        rel = "n/a" if ratio is None else f"{ratio:.2f}x"
        peak = "n/a" if not r["peak_bytes"] else f"{r['peak_bytes'] / 2**30:.2f}"
        base = "-" if not r["base_bytes"] else f"{r['base_bytes'] / 2**20:.1f}"
        err = f" {r['error']}" if r.get("error") else ""
        L.append(f"| {r['label']} | {step} | {rel} | {peak} | {base} |{err}")
    tgts = []

    def check(label, value, target, op):
        ok = None if value is None else (value <= target if op == "<=" else value >= target)
        tgts.append({"label": label, "value": value, "target": target, "op": op,
                     "status": "n/a" if ok is None else ("PASS" if ok else "MISS")})

    check("step time, ours / dense bf16 + LoRA", ours["step_s"] / dense["step_s"]
          if ours and dense and ours["step_s"] and dense["step_s"] else None, TARGET_STEP_RATIO, "<=")
    check("base-weight memory, bf16 / ours", dense["base_bytes"] / ours["base_bytes"]
          if ours and dense and ours["base_bytes"] and dense["base_bytes"] else None, TARGET_MEMORY_RATIO, ">=")
    L += ["", "## Issue 6 targets", ""]
    for t in tgts:
        val = "n/a" if t["value"] is None else f"{t['value']:.2f}x"
        L.append(f"- {t['label']}: {val} (target {t['op']} {t['target']}x): **{t['status']}**")
    return L, tgts


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("needs a CUDA device (--device cpu runs the same code small, as a check)")
        return 2
    t0 = time.perf_counter()
    try:
        res = collect(args)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    lines, tgts = report(res)
    wall = time.perf_counter() - t0
    lines += ["", f"wall time {wall:.0f} s; command: python bench/bench_train_gpu.py "
              + " ".join(argv if argv is not None else sys.argv[1:])]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "train_bench.md"), "w") as f:
            f.write(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({**res, "targets": tgts, "wall_s": wall}, f, indent=1, default=str)
    return 0 if all(r["step_s"] is not None for r in res["variants"]) else 1


if __name__ == "__main__":
    sys.exit(main())

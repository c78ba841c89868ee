"""SmolLM2 fine-tuning on the CPU: ours (INT3 G32 + QA-LoRA) in float32 and bf16 against PEFT LoRA on the float model.

Four configurations (issue 18 item 4), one run:

- ours fp32:  SmolLM2-135M-Instruct quantized to INT3, groups of 32 (RTN: speed does not depend on the base's
              quality), QA-LoRA adapters on all seven projections, float32 activations.
- ours bf16:  the same model under bfloat16 autocast (``finetune(autocast=torch.bfloat16)``: packed layers,
              attention and the tied head in bf16; adapters, gradients and AdamW state float32).
- PEFT fp32:  PEFT LoRA (``peft.get_peft_model``) on the float32 model, the same seven projections.
- PEFT bf16:  the same with the model loaded in bfloat16 (PEFT keeps its adapters float32).

All four: 4 x 256 tokens a step, r 16, alpha 16, dropout 0, AdamW lr 1e-3 with gradient clipping at 1.0, the same
training loop (``qalora_ext.training.finetune``: same loss, clipping and optimizer), the same data (the training part
of Python's pydoc topics) and seed.

How it measures:

- Each configuration runs in a fresh worker process of its own (this script with ``--worker NAME``), so the peak
  resident memory it reports is its own: ``training peak`` is VmHWM read after the last step, reset through
  ``/proc/self/clear_refs`` just before the first one (model, adapters, optimizer state, activations, allocator
  caches: what training holds); ``loading peak`` is VmHWM just before that reset (building and quantizing the
  model).
- The workers load first, then run in lockstep: one worker runs one optimizer step while the others wait, round
  after round, so the drift of a shared machine hits every configuration alike (the ratios of one process, the
  memory of separate ones).
- A step's time runs from its start (the model's forward pre-hook) to the start of the next step (or the end of
  training): forward, loss, backward, clipping, AdamW. Reported: the median over the steps after ``--warmup``,
  tokens/s = tokens per step / that median.
- ``--profile`` adds a breakdown of one more step of ours in float32 and in bf16 (torch.profiler; after the timed
  rounds, each alone, not part of the timing or the memory): packed layers (with their adapters) vs attention vs
  head vs loss vs optimizer, forward and backward, and the largest ops of each.

    python bench/bench_finetune_cpu.py                    # the table: bench/results/finetune_cpu.{md,json}
    python bench/bench_finetune_cpu.py --steps 12 --warmup 3 --profile
    python bench/bench_finetune_cpu.py --quick            # a smoke run on a tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = {
    "ours-fp32": "ours INT3 G32, float32",
    "ours-bf16": "ours INT3 G32, bf16 autocast",
    "peft-fp32": "PEFT LoRA, float32 model",
    "peft-bf16": "PEFT LoRA, bf16 model",
}
TARGET_BF16_SPEEDUP = 1.25  # ours bf16 tokens/s >= 1.25x ours float32
TARGET_VS_PEFT_BF16 = 0.95  # ours bf16 tokens/s >= 0.95x PEFT LoRA bf16, with a lower training peak
PROFILED = ("ours-fp32", "ours-bf16")  # --profile: one more step of each after the timed rounds, alone
PROTOCOL = "@@bench "  # prefix of the worker's messages on its stdout (anything else there is passed on)


def log(msg: str) -> None:
    print(f"[bench_finetune {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a float Hugging Face folder (default: SmolLM2-135M-Instruct, as the demo loads it)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's default)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one more step of ours in float32 and in bf16 (torch.profiler)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a tiny random Llama, 2 x 32 tokens, r 4, 1 warm-up + 2 steps "
                        "(the numbers mean nothing)")
    p.add_argument("--out", default=None, metavar="PREFIX",
                   help="output path without extension (default bench/results/finetune_cpu, _quick with --quick)")
    # Internal: the worker side.
    p.add_argument("--worker", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--data", default="text", choices=("text", "random"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.seq_len, args.rank, args.alpha = 2, 1, 2, 32, 4, 8.0
    for name in ("steps", "batch_size", "seq_len", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.warmup < 0 or args.threads < 0:
        p.error(f"--warmup and --threads must be >= 0; got {args.warmup}, {args.threads}")
    if args.worker is None:
        wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in CONFIGS]
        if unknown or not wanted:
            p.error(f"--configs: unknown {unknown or 'empty list'}; choose from {', '.join(CONFIGS)}")
        args.configs = wanted
    return args


# ---------------------------------------------------------------------------
# Worker: one configuration in its own process
# ---------------------------------------------------------------------------


def _emit(event: str, **payload) -> None:
    sys.stdout.write(PROTOCOL + json.dumps({"event": event, **payload}) + "\n")
    sys.stdout.flush()


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), flags=re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where it cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _dataset(args, folder: Path):
    from qalora_ext import loading
    from qalora_ext.training import data

    if args.data == "text":
        tokenizer = loading.load_tokenizer(folder)
        return data.load_training_data(None, tokenizer, args.seq_len), "training part of Python's pydoc topics"
    g = torch.Generator().manual_seed(args.seed)
    vocab = loading.read_model_config(folder)["vocab_size"]
    ids = torch.randint(0, vocab, (max(16, 4 * args.batch_size), args.seq_len), generator=g)
    return data.TokenDataset({"input_ids": ids}), "random tokens"


def _build(args, folder: Path):
    """``(model, autocast)`` of the worker's configuration, adapters initialised from ``--seed``."""
    name = args.worker
    if name.startswith("ours"):
        from qalora_ext import loading
        from qalora_ext.model import add_adapters

        model = loading.quantize_pretrained(folder, args.bits, args.group_size, "rtn", progress=False)
        torch.manual_seed(args.seed)
        add_adapters(model, rank=args.rank, alpha=args.alpha, dropout=0.0)
        return model, (torch.bfloat16 if name == "ours-bf16" else None)
    import peft
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if name == "peft-bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(os.fspath(folder), dtype=dtype)
    config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(PROJECTIONS),
                             bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)
    return peft.get_peft_model(model, config), None


def _model_facts(model) -> dict:
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    # Tied weights appear once in parameters(); buffers hold our packed codes, scales and zeros.
    weight_bytes = sum(t.numel() * t.element_size() for t in frozen) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    return {"trainable_params": sum(p.numel() for p in trainable),
            "adapter_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in trainable}),
            "adapter_modules": len(trainable) // 2,
            "frozen_weight_bytes": weight_bytes}


class _Pacer:
    """Times each optimizer step: from the model's forward pre-hook to the end of ``optimizer.step()``.

    Waits for "go" from the parent before each step and reports each step's time. With ``profile_step`` >= 0
    that step (the last) runs under torch.profiler; the training peak is read before it (the profiler's own
    memory is not training's).
    """

    def __init__(self, profile_step: int) -> None:
        self.profile_step = profile_step
        self.times: list[float] = []
        self.start: Optional[float] = None
        self.peak_reset = False
        self.load_peak_kb: Optional[int] = None
        self.peak_kb: Optional[int] = None
        self.profiler: Optional[_Profile] = None
        self.profiling = False
        self.index = 0

    def pre_hook(self, module, args) -> None:
        if self.index == 0:
            self.load_peak_kb = _status_kb("VmHWM")  # loading's peak, before the reset
            self.peak_reset = _reset_peak_rss()
        if sys.stdin.readline().strip() != "go":
            sys.exit(0)  # the parent is gone or gave up
        if self.index == self.profile_step:
            self.profiler = _Profile()
            self.profiler.__enter__()
            self.profiling = True
        self.index += 1
        self.start = time.perf_counter()

    def optimizer_post_hook(self, optimizer, args, kwargs) -> None:
        if self.start is None:
            return
        self.times.append(time.perf_counter() - self.start)
        self.start = None
        if self.profiling:
            self.profiler.__exit__(None, None, None)
            self.profiling = False
        elif self.peak_reset:
            self.peak_kb = _status_kb("VmHWM")
        _emit("step", index=self.index - 1, seconds=self.times[-1])


def run_worker(args) -> int:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from qalora_ext import loading
    from qalora_ext.training import finetune as train

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    folder = loading.resolve_model(args.model)
    model, autocast = _build(args, folder)
    dataset, data_name = _dataset(args, folder)
    facts = _model_facts(model)
    timed = args.warmup + args.steps
    pacer = _Pacer(profile_step=timed if args.profile else -1)
    model.register_forward_pre_hook(pacer.pre_hook)
    register_optimizer_step_post_hook(pacer.optimizer_post_hook)
    if args.profile:
        _label_modules(model, lambda: pacer.profiling)
    _emit("ready", load_s=time.perf_counter() - t0, rss_after_load_kb=_status_kb("VmRSS"), data=data_name,
          threads=torch.get_num_threads(), **facts)
    result = train.finetune(model, dataset, steps=timed + (1 if args.profile else 0), batch_size=args.batch_size,
                            lr=args.lr, seed=args.seed, autocast=autocast, progress=False, loss_plot=False)
    done = {"step_s": pacer.times[:timed], "losses": result.losses[:timed], "train_peak_kb": pacer.peak_kb,
            "load_peak_kb": pacer.load_peak_kb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    if pacer.profiler is not None:
        done["profile"] = pacer.profiler.breakdown()
    _emit("done", **done)
    return 0


# ---------------------------------------------------------------------------
# Profile of one step: where the time goes
# ---------------------------------------------------------------------------

_LABEL = "bench:"


def _label_modules(model, active) -> None:
    """record_function ranges around the modules that make up a step's forward (innermost wins), while ``active()``."""
    from torch import nn

    from qalora_ext.nn import QALoRALinear, QuantLinear

    head = model.get_output_embeddings()

    def label(name: str, mod) -> Optional[str]:
        if isinstance(mod, (QALoRALinear, QuantLinear)) or type(mod).__module__.startswith("peft.tuners.lora"):
            return "packed layers + adapters"
        if mod is head:
            return "head (lm_head)"
        if name.endswith("self_attn") or type(mod).__name__.endswith("RotaryEmbedding"):
            return "attention (SDPA, RoPE)"
        if name.endswith("mlp"):
            return "MLP activation"
        if type(mod).__name__.endswith("RMSNorm"):
            return "norms"
        if isinstance(mod, nn.Embedding):
            return "embedding"
        return None

    for name, mod in model.named_modules():
        lab = label(name, mod)
        if lab is None:
            continue
        stack = []

        def enter(m, a, lab=lab, stack=stack):
            rf = torch.profiler.record_function(_LABEL + lab) if active() else None
            if rf is not None:
                rf.__enter__()
            stack.append(rf)

        def leave(m, a, o, stack=stack):
            rf = stack.pop()
            if rf is not None:
                rf.__exit__(None, None, None)

        mod.register_forward_pre_hook(enter)
        mod.register_forward_hook(leave)
    # The loss and the gradient clipping happen in the training loop; wrap the two functions it calls.
    from qalora_ext.training import finetune as train

    def ranged(fn, lab):
        def wrapper(*a, **kw):
            if not active():
                return fn(*a, **kw)
            with torch.profiler.record_function(_LABEL + lab):
                return fn(*a, **kw)
        return wrapper

    train.token_nll_sum = ranged(train.token_nll_sum, "loss (float32 cross-entropy)")
    torch.nn.utils.clip_grad_norm_ = ranged(torch.nn.utils.clip_grad_norm_, "optimizer (clip + AdamW)")


class _Profile:
    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self.t0 = time.perf_counter()
        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(None, None, None)
        self.wall_s = time.perf_counter() - self.t0

    def breakdown(self) -> dict:
        """Self CPU time of the main thread by category, forward / backward / optimizer; and the top ops."""
        events = list(self.prof.events())

        def owner(e):
            p = e
            while p is not None:
                if p.name.startswith(_LABEL):
                    return "fwd", p.name[len(_LABEL):]
                if p.name.startswith("Optimizer."):
                    return "optimizer", "optimizer (clip + AdamW)"
                if p.name.startswith("autograd::engine::evaluate_function"):
                    return "bwd", p
                p = p.cpu_parent
            return "fwd", None

        # A backward node has the sequence number of the forward op that made it: it inherits that op's category.
        seq_category = {}
        for e in events:
            phase, lab = owner(e)
            if phase == "fwd" and isinstance(lab, str) and e.sequence_nr >= 0:
                seq_category.setdefault(e.sequence_nr, lab)
        table: dict[str, dict[str, float]] = {}
        ops: dict[str, float] = {}
        by_category: dict[str, dict[str, float]] = {}
        for e in events:
            phase, lab = owner(e)
            if phase == "bwd":
                node = lab
                lab = seq_category.get(node.sequence_nr)
                if lab is None:
                    lab = ("packed layers + adapters" if "AccumulateGrad" in node.name or "qlinear" in node.name
                           else None)
            if lab is None:
                lab = "other (residual adds, casts, data, engine)"
            if lab == "optimizer (clip + AdamW)":
                phase = "step"
            us = e.self_cpu_time_total
            row = table.setdefault(lab, {"fwd": 0.0, "bwd": 0.0, "step": 0.0})
            row[phase] += us / 1e3
            if not e.name.startswith((_LABEL, "autograd::engine")):
                ops[e.name] = ops.get(e.name, 0.0) + us / 1e3
                per_op = by_category.setdefault(lab, {})
                per_op[e.name] = per_op.get(e.name, 0.0) + us / 1e3
        total = sum(sum(r.values()) for r in table.values())
        rows = sorted(({"category": k, **{p: round(v, 2) for p, v in r.items()}, "ms": round(sum(r.values()), 2),
                        "share": round(sum(r.values()) / total, 4) if total else 0.0,
                        "top_ops": [[op, round(t, 2)] for op, t in sorted(by_category.get(k, {}).items(),
                                                                         key=lambda kv: -kv[1])[:4]]}
                       for k, r in table.items()), key=lambda r: -r["ms"])
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
        return {"wall_ms": round(self.wall_s * 1e3, 1), "self_cpu_ms": round(total, 1), "rows": rows,
                "top_ops": [{"op": k, "self_ms": round(v, 2)} for k, v in top]}


# ---------------------------------------------------------------------------
# Parent: start the workers, drive them in lockstep, write the report
# ---------------------------------------------------------------------------


class _Worker:
    def __init__(self, name: str, argv: list[str], extra: Sequence[str] = ()) -> None:
        self.name = name
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, *argv, *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def read(self, want: str) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                rc = self.proc.wait()
                raise RuntimeError(f"worker {self.name} ended (exit status {rc}) before sending {want!r}; "
                                   f"its errors are above")
            if line.startswith(PROTOCOL):
                msg = json.loads(line[len(PROTOCOL):])
                if msg["event"] != want:
                    raise RuntimeError(f"worker {self.name}: expected {want!r}, got {msg['event']!r}")
                return msg
            sys.stderr.write(f"[{self.name}] {line}")

    def go(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.read("step")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _worker_argv(args, folder: Path, data: str) -> list[str]:
    return ["--model", os.fspath(folder), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
            "--alpha", str(args.alpha), "--bits", str(args.bits), "--group-size", str(args.group_size),
            "--lr", str(args.lr), "--seed", str(args.seed), "--threads", str(args.threads), "--data", data]


def _tiny_model_folder(root: Path) -> Path:
    """A tiny random Llama (no tokenizer: the workers train on random tokens) for --quick."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    folder = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _median(xs: Sequence[float]) -> float:
    import statistics

    return statistics.median(xs)


def run(args) -> dict:
    from tqdm.auto import tqdm

    import qalora_ext
    from qalora_ext import loading

    configs = list(args.configs)
    skipped = {}
    try:
        import peft  # noqa: F401
    except ImportError:
        for c in [c for c in configs if c.startswith("peft")]:
            configs.remove(c)
            skipped[c] = "peft is not installed (pip install peft)"
    if not configs:
        raise SystemExit("bench_finetune_cpu: nothing to run (" + "; ".join(f"{k}: {v}" for k, v in skipped.items())
                         + ")")
    tmp = tempfile.TemporaryDirectory(prefix="bench_finetune_")
    try:
        if args.quick and args.model is None:
            folder, data = _tiny_model_folder(Path(tmp.name)), "random"
        else:
            folder = loading.resolve_model(args.model)
            data = "text"
        argv = _worker_argv(args, folder, data)
        machine = _timing.machine_info(qalora_ext=qalora_ext.__version__,
                                       cpu_isa=qalora_ext.build_info().get("cpu_isa_active"),
                                       bf16_gemm=qalora_ext.build_info().get("cpu_bf16_gemm"),
                                       bf16_units=_bf16_units())
        log(f"{folder.name}: {', '.join(configs)}; {args.warmup} warm-up + {args.steps} timed steps of "
            f"{args.batch_size} x {args.seq_len} tokens each, in lockstep")
        workers, ready = [], {}
        try:
            for name in configs:  # one at a time: loading is not what is measured
                workers.append(_Worker(name, argv, ["--profile"] if args.profile and name in PROFILED else []))
                ready[name] = workers[-1].read("ready")
                log(f"{name} ready in {ready[name]['load_s']:.1f} s ({ready[name]['adapter_modules']} adapters, "
                    f"{ready[name]['trainable_params']} trainable parameters)")
            rounds = args.warmup + args.steps
            monitor = _timing.CpuMonitor()
            workers_cpu0 = sum(_proc_cpu_s(w.proc.pid) for w in workers)
            with tqdm(total=rounds * len(workers), desc="steps", unit="step", file=sys.stderr) as bar:
                for _ in range(rounds):
                    for w in workers:
                        step = w.go()
                        bar.update(1)
                        bar.set_postfix_str(f"{w.name} {step['seconds']:.2f} s", refresh=False)
            busy = _minus_workers(monitor.result(), sum(_proc_cpu_s(w.proc.pid) for w in workers) - workers_cpu0)
            done, profile = {}, {}
            for w in workers:  # one at a time, so a profiled step runs alone
                if args.profile and w.name in PROFILED:
                    log(f"profiling one more step of {w.name}")
                    w.go()
                done[w.name] = w.read("done")
                if "profile" in done[w.name]:
                    profile[w.name] = done[w.name]["profile"]
        finally:
            for w in workers:
                w.close()
    finally:
        tmp.cleanup()

    tokens = args.batch_size * args.seq_len
    rows = []
    for name in configs:
        times = done[name]["step_s"]
        timed = times[args.warmup:]
        med = _median(timed)
        rows.append({"config": name, "label": CONFIGS[name], "median_step_s": med, "min_step_s": min(timed),
                     "max_step_s": max(timed), "tokens_per_s": tokens / med, "step_s": times,
                     "train_peak_mib": _mib(done[name]["train_peak_kb"]),
                     "load_peak_mib": _mib(done[name]["load_peak_kb"]),
                     "rss_after_load_mib": _mib(ready[name]["rss_after_load_kb"]),
                     "frozen_weight_mib": ready[name]["frozen_weight_bytes"] / 2**20,
                     "trainable_params": ready[name]["trainable_params"],
                     "adapter_dtypes": ready[name]["adapter_dtypes"],
                     "first_loss": done[name]["losses"][0], "last_loss": done[name]["losses"][-1],
                     "data": ready[name]["data"], "threads": ready[name]["threads"]})
    command = "python bench/bench_finetune_cpu.py " + " ".join(args.argv)
    results = {"command": command.strip(), "model": folder.name, "machine": machine, "date": time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime()), "tokens_per_step": tokens,
        "settings": {k: getattr(args, k) for k in ("steps", "warmup", "batch_size", "seq_len", "rank", "alpha",
                                                   "bits", "group_size", "lr", "seed", "quick")},
        "cpu_busy": busy, "rows": rows, "skipped": skipped, "targets": _targets(rows), "profile": profile}
    return results


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/PID/stat); 0 where unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _minus_workers(busy: dict, workers_cpu_s: float) -> dict:
    """The CPU monitor's result with the workers' CPU time taken out of "foreign" (they are this benchmark)."""
    if busy.get("foreign_cpu_s") is None:
        return busy
    foreign = max(0.0, busy["foreign_cpu_s"] - workers_cpu_s)
    return {**busy, "foreign_cpu_s": round(foreign, 3), "workers_cpu_s": round(workers_cpu_s, 3),
            "foreign_cores": round((foreign + busy["steal_s"]) / busy["wall_s"], 3) if busy["wall_s"] > 0 else None}


def _bf16_units() -> bool:
    from qalora_ext.training.precision import cpu_has_bf16

    return cpu_has_bf16()


def _mib(kb: Optional[int]) -> Optional[float]:
    return None if kb is None else kb / 1024


def _targets(rows: list[dict]) -> list[dict]:
    by = {r["config"]: r for r in rows}
    out = []
    if "ours-bf16" in by and "ours-fp32" in by:
        v = by["ours-bf16"]["tokens_per_s"] / by["ours-fp32"]["tokens_per_s"]
        out.append({"label": f"ours bf16 tokens/s >= {TARGET_BF16_SPEEDUP}x ours float32", "value": v,
                    "status": "PASS" if v >= TARGET_BF16_SPEEDUP else "MISS"})
    if "ours-bf16" in by and "peft-bf16" in by:
        v = by["ours-bf16"]["tokens_per_s"] / by["peft-bf16"]["tokens_per_s"]
        out.append({"label": f"ours bf16 tokens/s >= {TARGET_VS_PEFT_BF16}x PEFT LoRA bf16", "value": v,
                    "status": "PASS" if v >= TARGET_VS_PEFT_BF16 else "MISS"})
        a, b = by["ours-bf16"]["train_peak_mib"], by["peft-bf16"]["train_peak_mib"]
        if a is not None and b is not None:
            out.append({"label": "ours bf16 training peak < PEFT LoRA bf16's", "value": a / b,
                        "status": "PASS" if a < b else "MISS"})
    return out


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(results: dict) -> str:
    m = results["machine"]
    s = results["settings"]
    lines = [
        f"# Fine-tune on the CPU: {results['model']}, ours INT{s['bits']} G{s['group_size']} vs PEFT LoRA",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (threads per worker: {results['rows'][0]['threads']}"
        f"), qalora_ext {m['qalora_ext']} (CPU kernels {m['cpu_isa']}, bf16 GEMM {m.get('bf16_gemm')}), "
        f"bf16 units: {'yes' if m['bf16_units'] else 'no'}  ",
        f"Date: {results['date']}; {s['batch_size']} x {s['seq_len']} tokens a step, r {s['rank']}, alpha "
        f"{s['alpha']:g}, dropout 0, all 7 projections, AdamW lr {s['lr']:g}, {s['warmup']} warm-up + {s['steps']} "
        f"timed steps per configuration, the configurations in lockstep (one step each in turn); each configuration "
        f"in a fresh process (its own peak memory)",
        "",
    ]
    headers = ["configuration", "median step s", "min-max s", "tokens/s", "vs ours fp32", "training peak MiB",
               "loading peak MiB", "frozen weights MiB", "adapters", "loss first -> last"]
    base = next((r for r in results["rows"] if r["config"] == "ours-fp32"), None)
    rows = []
    for r in results["rows"]:
        rows.append([r["label"], f"{r['median_step_s']:.3f}", f"{r['min_step_s']:.2f}-{r['max_step_s']:.2f}",
                     f"{r['tokens_per_s']:.0f}",
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-",
                     _fmt(r["train_peak_mib"], ".0f"), _fmt(r["load_peak_mib"], ".0f"),
                     f"{r['frozen_weight_mib']:.1f}", "/".join(r["adapter_dtypes"]),
                     f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"])
    lines += [_timing.markdown_table(headers, rows), ""]
    for name, why in results["skipped"].items():
        lines.append(f"Not run: {CONFIGS[name]} ({why}).  ")
    busy = results["cpu_busy"]
    if busy.get("foreign_cores") is not None:
        lines.append(f"Other processes used {busy['foreign_cores']:.2f} cores on average while the steps ran "
                     f"(0 = a quiet machine).")
    lines.append("")
    if results["targets"]:
        lines += ["Targets (issue 18):", ""]
        lines += [f"- {t['label']}: {t['value']:.2f} ({t['status']})" for t in results["targets"]]
        lines.append("")
    prof = results.get("profile") or {}
    if prof:
        lines += _profile_report(prof)
    return "\n".join(lines)


def _profile_report(prof: dict) -> list[str]:
    """One table: each category's milliseconds in the profiled step of each configuration, and bf16's largest ops."""
    names = [n for n in PROFILED if n in prof]
    rows = {n: {r["category"]: r for r in prof[n]["rows"]} for n in names}
    last = names[-1]
    categories = sorted({c for n in names for c in rows[n]}, key=lambda c: -rows[last].get(c, {"ms": 0})["ms"])
    headers = ["category"] + [f"{CONFIGS[n].split(', ')[-1]} ms" for n in names]
    headers += [f"{CONFIGS[last].split(', ')[-1]}: share", "fwd / bwd / optimizer ms", "its largest ops (self ms)"]
    table = []
    for c in categories:
        r = rows[last].get(c)
        table.append([c] + [f"{rows[n][c]['ms']:.0f}" if c in rows[n] else "-" for n in names]
                     + ([f"{100 * r['share']:.1f}%", f"{r['fwd']:.0f} / {r['bwd']:.0f} / {r['step']:.0f}",
                         ", ".join(f"{op.replace('aten::', '')} {t:.0f}" for op, t in r["top_ops"][:3])]
                        if r else ["-", "-", "-"]))
    table.append(["profiled step (wall)"] + [f"{prof[n]['wall_ms']:.0f}" for n in names] + ["", "", ""])
    return [f"Profile: one step of ours each ({', '.join(CONFIGS[n] for n in names)}), torch.profiler, self CPU time "
            f"of the main thread by category (an op's worker threads work inside its time; the profiler adds "
            f"overhead, so the profiled step is slower than the timed ones):", "",
            _timing.markdown_table(headers, table), ""]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.worker is not None:
        return run_worker(args)
    results = run(args)
    text = report(results)
    out = Path(args.out) if args.out else RESULTS / ("finetune_cpu_quick" if args.quick else "finetune_cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    log(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

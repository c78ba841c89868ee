"""A real FSDP2 fine-tune of a full-size config on this machine, measured against bench/fsdp_memory_plan.py.

Run under torchrun (not in CI; minutes per step on a CPU):

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/fsdp_real_run.py --model "Llama-2 7B" --seq-len 64

Every rank builds the model on the meta device (packed layers and adapters
as quantize_model + add_adapters place them, float parts in bfloat16),
shards it with ``shard_model``, allocates only its own shards and fills them
with random packed codes (any int32 word is valid codes), small scales and
centred zeros; no float model and no full packed model ever exists. Then a
few steps of ``finetune(fsdp=True)`` with bf16 autocast and gradient
checkpointing on random tokens. Each rank reports its peak resident memory
(``ru_maxrss``) above what the process held before building the model, and
rank 0 prints the plan's figure for the same model, rank count, sequence
and micro-batch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

GIB = 1 << 30


def _plan_module():
    path = Path(__file__).resolve().parent / "fsdp_memory_plan.py"
    spec = importlib.util.spec_from_file_location("fsdp_memory_plan", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fsdp_memory_plan", mod)
    spec.loader.exec_module(sys.modules["fsdp_memory_plan"])
    return sys.modules["fsdp_memory_plan"]


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def _fill_random(model, seed: int) -> None:
    from torch.distributed.tensor import DTensor

    from qalora_ext.training.fsdp import init_adapters_sharded

    g = torch.Generator().manual_seed(seed + dist.get_rank())
    for name, p in model.named_parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        if name.endswith(".packed"):
            t.copy_(torch.randint(-(2 ** 31), 2 ** 31 - 1, t.shape, dtype=torch.int64, generator=g).to(torch.int32))
        elif name.endswith(".scale"):
            t.fill_(0.004)
        elif name.endswith(".zero"):
            t.fill_(-0.03)
        elif name.endswith(".bias"):
            t.zero_()
        elif ".lora_" in name:
            continue
        elif t.dim() == 1:
            t.fill_(1.0)
        else:
            t.normal_(0, 0.02, generator=g)
    for buf_name, b in model.named_buffers():
        if b.is_meta:
            raise RuntimeError(f"buffer {buf_name} left on meta")
    init_adapters_sharded(model, seed)


def main(argv=None) -> int:
    plan_mod = _plan_module()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="Llama-2 7B", choices=list(plan_mod.CONFIGS))
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)

    from qalora_ext.training import data
    from qalora_ext.training.finetune import finetune
    from qalora_ext.loading.transformers_model import _rebuild_non_persistent_buffers
    from qalora_ext.training.fsdp import materialize, resident_packed_bytes, shard_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    before = _rss_now_bytes()
    t0 = time.perf_counter()
    model, config = plan_mod.build_meta_model(plan_mod.CONFIGS[args.model], 4, 32, args.rank)
    model.to(torch.bfloat16)  # float parts only: packed layers keep their stored dtypes, adapters float32
    _rebuild_non_persistent_buffers(model, Path("."))  # rotary inv_freq, computed on the CPU
    shard_model(model, sync_module_states=False)
    materialize(model, "cpu")
    _fill_random(model, seed=0)
    built = time.perf_counter() - t0
    held, total = resident_packed_bytes(model)
    after_build = _rss_now_bytes()

    g = torch.Generator().manual_seed(1)
    n = args.micro_batch * world * args.steps
    ds = data.TokenDataset({"input_ids": torch.randint(0, config.vocab_size, (n, args.seq_len), generator=g)})
    t1 = time.perf_counter()
    result = finetune(model, ds, steps=args.steps, batch_size=args.micro_batch, lr=1e-4, autocast=torch.bfloat16,
                      gradient_checkpointing=True, fsdp=True, progress=False, loss_plot=False)
    train_s = time.perf_counter() - t1
    peak = _rss_peak_bytes()
    mine = {"rank": rank, "packed_held": held, "packed_total": total, "rss_before": before,
            "rss_after_build": after_build, "rss_peak": peak, "peak_above_start_gib": (peak - before) / GIB,
            "build_s": built, "train_s": train_s, "losses": result.losses}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        plan = plan_mod.plan_model(args.model, plan_mod.CONFIGS[args.model], rank=args.rank, seq_len=args.seq_len,
                                   micro_batch=args.micro_batch, ranks=(world,))[0]
        report = {"model": args.model, "ranks": world, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                  "steps": args.steps, "per_rank": everyone, "plan": plan.__dict__}
        print(json.dumps(report, indent=1))
        for r in everyone:
            print(f"rank {r['rank']}: packed {r['packed_held'] / GIB:.2f} of {r['packed_total'] / GIB:.2f} GiB; "
                  f"peak RSS above start {r['peak_above_start_gib']:.2f} GiB (plan total {plan.total:.2f} GiB: "
                  f"base {plan.base:.2f}, adapters+AdamW {plan.adapters_opt:.3f}, gather {plan.gather:.2f}, "
                  f"activations {plan.activations:.2f}); build {r['build_s']:.0f} s, "
                  f"{args.steps} steps {r['train_s']:.0f} s; losses {r['losses']}")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

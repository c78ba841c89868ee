"""Per-rank memory plan of QA-LoRA fine-tuning under FSDP2, against dense bf16 LoRA and QLoRA NF4 (issue 19).

Every model is built on the meta device from a config written below (no
hub access), its linear layers replaced by meta ``QuantLinear`` layers with
``QALoRALinear`` adapters exactly as ``quantize_model`` + ``add_adapters``
would place them, and the plan is computed from those real tensor shapes:

- **packed base per rank**: every tensor FSDP2 shards (packed codes, scales,
  zeros, biases of the packed layers; embeddings, norms, the head in bf16),
  each split by rows as FSDP2 does (``ceil(rows / W)`` rows per rank, so
  padding counts);
- **adapters + optimizer**: the adapters' float32 parameters, float32
  gradients and AdamW's two float32 moments (16 bytes per adapter element),
  sharded the same way;
- **gather + workspace**: FSDP2's transient full copies of the largest
  group (its all-gather output, the unsharded parameters it is copied into,
  and the next group prefetched: 3 copies, less this rank's shard), plus
  the kernels' workspace: the CPU backward dequantizes one packed layer to
  float32 (QLoRA's dequantizes one to bf16; dense LoRA needs none);
- **activations** (per rank, one micro-batch of ``--micro-batch`` x
  ``--seq-len``, gradient checkpointing per decoder layer, bf16 autocast,
  SDPA attention): the checkpointed layer inputs (``L x B x S x h x 2``
  bytes), one decoder layer recomputed during backward (norm inputs, q/k/v
  and the attention output, the MLP's gate, up and activation:
  ``(4h + 2 kv + 3 I) x 2`` bytes per token; a plain LoRA also keeps each
  adapted layer's input, ``+ (h + I) x 2``; the packed layers keep only the
  group-pooled input, ``K / G`` values) doubled for the gradients in
  flight, and the logits (bf16 logits, their float32 copy, log-softmax and
  its gradient: 14 bytes per vocabulary entry per token).

The alternatives use the same FSDP2 sharding and activations:

- **dense bf16 LoRA**: the linear weights in bf16 (16 bits per weight) and
  a LoRA of the same rank on the same layers (``r (in + out)`` per layer);
- **QLoRA NF4**: bitsandbytes' 4-bit NormalFloat with blocksize-64 absmax
  and double quantization, 4 + 0.127 bits per weight (Dettmers et al.,
  "QLoRA", 2023, section 3, Double Quantization: "reduces the memory
  footprint from 32/64 = 0.5 bits, to 8/64 + 32/(64 * 256) = 0.127 bits per
  parameter"), and the same LoRA as dense.

Not counted: the CUDA context / allocator slack, the tokenizer and data,
communication buffers of the NCCL/gloo backend, the optimizer's foreach
temporaries. ``bench/fsdp_memory_plan.py --markdown`` prints the README
table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

GIB = 1 << 30

# Configs as published with each model (config.json on the hub), written here so the plan needs no network.
CONFIGS = {
    "Llama-2 7B": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       tie_word_embeddings=False),
    "Llama-2 13B": dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                        tie_word_embeddings=False),
    "Llama-2 70B": dict(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        tie_word_embeddings=False),
    "Qwen2.5 72B": dict(model_type="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        tie_word_embeddings=False),
}
RANKS = (1, 2, 4, 8)
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # QLoRA paper, section 3 (double quantization)


def build_meta_model(cfg: dict, bits: int, group_size: int, rank: int):
    """The architecture on the meta device with packed layers and adapters where quantize_model would put them."""
    import torch
    import transformers

    from qalora_ext.model import quantization_targets, set_module
    from qalora_ext.nn import QALoRALinear, QuantLinear

    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
        targets, _ = quantization_targets(model, group_size)
        for name in targets:
            lin = model.get_submodule(name)
            base = QuantLinear(lin.in_features, lin.out_features, bits, group_size, lin.bias is not None,
                               device="meta")
            set_module(model, name, QALoRALinear(base, rank=rank, alpha=2 * rank))
    return model, config


def _shard_bytes(t, world: int, itemsize=None) -> int:
    rows = t.shape[0] if t.dim() else 1
    per_row = (t.numel() // rows if rows else 0) * (itemsize or t.element_size())
    return math.ceil(rows / world) * per_row


@dataclass
class Plan:
    model: str
    ranks: int
    base: float
    adapters_opt: float
    gather: float
    activations: float
    total: float
    lora_bf16_total: float
    qlora_nf4_total: float
    packed_full: float
    packed_rank_bytes: int
    """Bytes of the packed layers' codes, scales, zeros and biases one rank holds (exact, padding included)."""


def plan_model(name: str, cfg: dict, *, bits: int = 4, group_size: int = 32, rank: int = 16, seq_len: int = 2048,
               micro_batch: int = 1, ranks=RANKS) -> list[Plan]:
    import torch

    from qalora_ext.nn import QALoRALinear

    model, config = build_meta_model(cfg, bits, group_size, rank)
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    vocab = config.vocab_size
    tokens = seq_len * micro_batch

    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QALoRALinear)}
    packed_tensors, adapter_tensors = [], []
    dense_weights = []  # (rows, cols, has_bias) of each adapted linear
    for m in qlayers.values():
        b = m.base
        packed_tensors += [t for t in (b.packed, b.scale, b.zero, b.bias) if t is not None]
        adapter_tensors += [m.lora_A, m.lora_B]
        dense_weights.append((b.out_features, b.in_features, b.bias is not None))
    float_tensors = [p for n, p in model.named_parameters() if ".lora_" not in n]  # embeddings, norms, head

    # FSDP2 groups: each decoder layer, the embedding, the head, the root (final norm).
    def group_of(n: str) -> str:
        parts = n.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            return ".".join(parts[: i + 2])
        if "embed_tokens" in n:
            return "embed"
        if n.startswith("lm_head"):
            return "head"
        return "root"

    def full_group_bytes(kind: str) -> dict[str, float]:
        groups: dict[str, float] = {}
        for n, p in model.named_parameters():
            if ".lora_" in n:
                continue
            g = group_of(n)
            is_float = p.dtype.is_floating_point and not any(n.endswith(s) for s in (".scale", ".zero", ".bias"))
            bytes_ = p.numel() * (2 if is_float else p.element_size())
            groups[g] = groups.get(g, 0.0) + bytes_
        for n, b in model.named_buffers():
            if n.endswith((".packed", ".scale", ".zero", ".bias")):
                g = group_of(n)
                if kind == "qalora":
                    groups[g] = groups.get(g, 0.0) + b.numel() * b.element_size()
        if kind != "qalora":
            for n, m in qlayers.items():
                g = group_of(n)
                w = m.base.out_features * m.base.in_features
                groups[g] = groups.get(g, 0.0) + (w * 2 if kind == "lora" else w * NF4_BITS / 8)
        return groups

    packed_full = sum(t.numel() * t.element_size() for t in packed_tensors)
    per_layer_tok = (4 * h + 2 * kv + 3 * inter) * 2
    lora_extra_tok = (h + inter) * 2
    ckpt = layers * tokens * h * 2
    logits = tokens * vocab * 14
    act_qalora = ckpt + 2 * per_layer_tok * tokens + logits
    act_lora = ckpt + 2 * (per_layer_tok + lora_extra_tok) * tokens + logits
    lora_elems = sum(rank * (i + o) for o, i, _ in dense_weights)

    plans = []
    for world in ranks:
        packed_rank = sum(_shard_bytes(t, world) for t in packed_tensors)
        base = packed_rank + sum(_shard_bytes(t, world, 2) for t in float_tensors)
        adapters = sum(_shard_bytes(t, world) for t in adapter_tensors) * 4  # param, grad, 2 Adam moments

        largest = max(o * i for o, i, _ in dense_weights)
        workspace = {"qalora": 4 * largest, "lora": 0, "nf4": 2 * largest}

        def gather(kind):
            if world == 1:
                return float(workspace[kind])
            g = max(full_group_bytes(kind).values())
            return 3 * g - g / world + workspace[kind]

        dense_lin = sum(math.ceil(o / world) * i * 2 + (o * 2 if bias else 0) // world for o, i, bias in dense_weights)
        nf4_lin = sum(o * i * NF4_BITS / 8 / world for o, i, _ in dense_weights)
        other = sum(_shard_bytes(t, world, 2) for t in float_tensors)
        lora_opt = lora_elems * 16 / world
        total = base + adapters + gather("qalora") + act_qalora
        lora_total = dense_lin + other + lora_opt + gather("lora") + act_lora
        nf4_total = nf4_lin + other + lora_opt + gather("nf4") + act_lora
        plans.append(Plan(name, world, base / GIB, adapters / GIB, gather("qalora") / GIB, act_qalora / GIB,
                          total / GIB, lora_total / GIB, nf4_total / GIB, packed_full / GIB, packed_rank))
    del torch
    return plans


def markdown(plans: list[Plan], args) -> str:
    lines = [f"INT{args.bits} G{args.group_size} (float16 scales, float32 zeros), adapter rank {args.rank} on every "
             f"linear layer but the head, sequence {args.seq_len} x micro-batch {args.micro_batch}, gradient "
             f"checkpointing, bf16 autocast; GiB per rank.", "",
             "| model | ranks | packed base | adapters + AdamW | gather + workspace | activations | **QA-LoRA total** "
             "| dense bf16 LoRA | QLoRA NF4 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in plans:
        lines.append(f"| {p.model} | {p.ranks} | {p.base:.2f} | {p.adapters_opt:.3f} | {p.gather:.2f} | "
                     f"{p.activations:.2f} | **{p.total:.2f}** | {p.lora_bf16_total:.2f} | {p.qlora_nf4_total:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16, help="adapter rank (QA-LoRA and the LoRA baselines)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--models", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--markdown", action="store_true", help="print the README table")
    ap.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    args = ap.parse_args(argv)
    plans = []
    for name in args.models:
        plans += plan_model(name, CONFIGS[name], bits=args.bits, group_size=args.group_size, rank=args.rank,
                            seq_len=args.seq_len, micro_batch=args.micro_batch)
    if args.markdown:
        print(markdown(plans, args))
    else:
        print(f"FSDP2 memory plan (GiB per rank), INT{args.bits} G{args.group_size}, rank {args.rank}, "
              f"seq {args.seq_len} x {args.micro_batch}; QLoRA NF4 at {NF4_BITS:.3f} bits/weight")
        print(f"{'model':<13}{'W':>3}{'base':>8}{'adapt':>8}{'gather':>8}{'act':>8}{'QA-LoRA':>9}"
              f"{'LoRA16':>9}{'NF4':>8}")
        for p in plans:
            print(f"{p.model:<13}{p.ranks:>3}{p.base:>8.2f}{p.adapters_opt:>8.3f}{p.gather:>8.2f}"
                  f"{p.activations:>8.2f}{p.total:>9.2f}{p.lora_bf16_total:>9.2f}{p.qlora_nf4_total:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(p) for p in plans], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

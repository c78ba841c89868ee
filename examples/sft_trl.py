"""Fine-tune an INT3 model with TRL's SFTTrainer and PEFT's QA-LoRA, merge exactly, save, reload, generate.

Everything below is transformers / PEFT / TRL code; qalora_ext contributes
``import qalora_ext`` (which teaches ``from_pretrained`` the qalora_ext
format) and ``qalora_ext.prepare_lora_config`` (which puts its QA-LoRA layer
on the packed layers). The merged model is still INT3: ``merge_and_unload``
folds the adapter into the quantization zeros, the codes do not change.

    python examples/sft_trl.py --out runs/sft_trl                  # default model, INT3 G32, 40 steps (~5 min on 2 CPU cores)
    python examples/sft_trl.py --quantized DIR --steps 10 --out OUT  # an existing qalora_ext folder

Without ``--quantized`` the default model (SmolLM2-135M-Instruct) is
quantized to INT3 with group size 32 into ``OUT/int3`` first (a few seconds).
Prints one JSON summary (losses, logit differences, timings, the generated
text) and writes it to ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (the merged INT3 model goes to OUT/merged)")
    p.add_argument("--quantized", help="a qalora_ext folder to fine-tune (default: quantize SmolLM2 INT3 G32)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt", default="What is a Python decorator?")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def quantize_default(out: Path) -> Path:
    """SmolLM2-135M-Instruct, round-to-nearest INT3 G32 (`qalora quantize --bits 3 --group-size 32`)."""
    from qalora_ext import save_quantized
    from qalora_ext.loading import quantize

    model, tokenizer, _ = quantize(bits=3, group_size=32, progress=False)
    save_quantized(model, out)
    tokenizer.save_pretrained(out)
    return out


def training_texts(n: int) -> list[str]:
    """Short documentation passages (the project's default corpus: Python's pydoc topics)."""
    from qalora_ext.training.data import default_corpus_split

    text, _ = default_corpus_split()
    words = text.split()
    chunk = 90
    return [" ".join(words[i:i + chunk]) for i in range(0, min(len(words), n * chunk), chunk)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    import qalora_ext  # noqa: F401  (registers quant_method "qalora_ext" with transformers)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(args.quantized) if args.quantized else quantize_default(out / "int3")
    t0 = time.perf_counter()

    # 1. Load with transformers (QuantLinear layers built on meta, the packed tensors read once).
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=args.device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    group_size = model.config.quantization_config.group_size

    # 2. PEFT's QA-LoRA config, prepared for qalora_ext layers.
    peft_config = qalora_ext.prepare_lora_config(LoraConfig(
        r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
        use_qalora=True, qalora_group_size=group_size,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))

    # 3. TRL's SFTTrainer (it calls get_peft_model itself).
    dataset = Dataset.from_dict({"text": training_texts(args.steps * args.batch_size)})
    sft_args = SFTConfig(output_dir=str(out / "trainer"), max_steps=args.steps,
                         per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                         lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                         max_length=args.max_length, seed=args.seed, use_cpu=args.device == "cpu",
                         dataloader_num_workers=0, disable_tqdm=True, bf16=False, fp16=False)
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    # 4. Merge exactly into the INT3 zeros, save with save_pretrained, reload with from_pretrained.
    peft_model = trainer.model.eval()
    probe = tokenizer(training_texts(2)[1], return_tensors="pt", truncation=True,
                      max_length=args.max_length).input_ids.to(args.device)
    with torch.no_grad():
        unmerged = peft_model(probe).logits.double()
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(probe).logits.double()
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32, device_map=args.device)
    with torch.no_grad():
        reloaded_logits = reloaded(probe).logits.double()

    # 5. Generate with the reloaded INT3 model.
    messages = [{"role": "user", "content": args.prompt}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(args.device)
    with torch.no_grad():
        gen = reloaded.generate(**prompt, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(gen[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    layer = next(m for m in reloaded.modules() if type(m).__name__ == "QuantLinear")
    summary = {
        "folder": os.fspath(folder),
        "merged": os.fspath(out / "merged"),
        "device": args.device,
        "steps": len(losses),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses": losses,
        "train_seconds": round(train_s, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "merged_vs_unmerged_rel": rel(merged_logits, unmerged),
        "reloaded_vs_merged_max_abs": (reloaded_logits - merged_logits).abs().max().item(),
        "merged_bits": layer.bits,
        "generated": text,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

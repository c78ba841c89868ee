"""Fine-tuning QA-LoRA adapters.

``data``      the default corpus and its split, text / JSONL datasets,
              held-out windows and perplexity
``finetune``  the training loop: resumable checkpoints, DDP or FSDP2, loss plot
``fsdp``      FSDP2 for quantized models: packed state sharded by rows, per-rank loading
``precision`` the default precision: bf16 autocast where the hardware has bf16 units
"""

"""Fine-tuning QA-LoRA adapters.

``data``      the default corpus and its split, text / JSONL datasets,
              held-out windows and perplexity
``finetune``  the training loop: resumable checkpoints, DDP, loss plot
"""

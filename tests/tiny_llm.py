"""A tiny random Llama with a real (tiny) tokenizer, saved as a Hugging Face folder.

Built offline in well under a second: the tokenizer is a byte-level BPE
trained on a slice of Python's pydoc topics, with a chat template, so every
path the real model takes (tokenize, chat template, save, load, generate)
runs for real.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(vocab_size: int = 320):
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = [topics[k] for k in sorted(topics)[:40]]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(vocab_size: int, hidden: int = 64, intermediate: int = 128, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=2,
                         pad_token_id=0)
    model = LlamaForCausalLM(config)
    # Random init is tiny (std 0.02); widen it so quantization error is visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def save_tiny_llama(folder: os.PathLike, max_shard_size: str = "5GB", **kw) -> Path:
    """Write tokenizer + model to ``folder`` (sharded when the model exceeds ``max_shard_size``)."""
    folder = Path(folder)
    tok = make_tokenizer()
    model = make_tiny_llama(len(tok), **kw)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tok.save_pretrained(folder)
    return folder


def save_tiny_family(folder: os.PathLike, family: str) -> Path:
    """A tiny random model of another tested family (Qwen2 has q/k/v biases), with the tiny tokenizer."""
    import transformers

    folder = Path(folder)
    tok = make_tokenizer()
    config_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    config = config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=False)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder

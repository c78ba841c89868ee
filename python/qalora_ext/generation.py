"""Generating text with a (quantized) causal LM, and timing it.

``generate`` answers one prompt through the tokenizer's chat template;
``time_prefill_decode`` measures prefill and per-token decode time with the
KV cache (median of repeats after a warm-up), as ``qalora bench`` reports.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

__all__ = ["chat_prompt_ids", "generate", "time_prefill_decode", "bench_model", "ModelBench"]


def chat_prompt_ids(tokenizer, prompt: str, use_chat_template: bool = True) -> torch.Tensor:
    """Input ids (1, T) of a user prompt, through the tokenizer's chat template when it has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")
        ids = out if torch.is_tensor(out) else out["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             use_chat_template: bool = True, seed: int = 0) -> str:
    """The model's reply to a prompt (greedy when temperature is 0), through the packed kernels."""
    ids = chat_prompt_ids(tokenizer, prompt, use_chat_template)
    if ids.numel() == 0:
        raise ValueError("the prompt is empty (no tokens to continue); give the model some text")
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if temperature > 0:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=0.95)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    model.eval()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()



def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations, lazy initialisation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def time_prefill_decode(model, prompt_ids: torch.Tensor, new_tokens: int, repeats: int = 3) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) for one sequence, greedy, with the KV cache.

    Prefill is the time to the first new token; decode is the difference
    between generating ``new_tokens`` and one token, per extra token.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time decoding; got {new_tokens}")
    model.eval()

    def generate(n):
        return lambda: model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                                      pad_token_id=0)

    t_first = _median_time(generate(1), repeats)
    t_all = _median_time(generate(new_tokens), repeats)
    return t_first, max(t_all - t_first, 1e-9) / (new_tokens - 1)


@dataclass
class ModelBench:
    """What :func:`bench_model` measured; ``rows``: ``(weights, prefill s, decode s per token)``, float first."""

    model_name: str
    threads: int
    prompt_len: int
    new_tokens: int
    repeats: int
    rows: list = field(default_factory=list)

    def table(self) -> str:
        """The table and the packed / float ratios, as ``qalora bench`` prints them."""
        lines = [f"model {self.model_name}, {self.threads} threads, prompt {self.prompt_len} tokens, "
                 f"{self.new_tokens} decoded tokens, median of {self.repeats}",
                 f"{'weights':<12} {'prefill ms':>11} {'decode ms/token':>16} {'decode tokens/s':>16}"]
        for name, tp, td in self.rows:
            lines.append(f"{name:<12} {1e3 * tp:11.1f} {1e3 * td:16.2f} {1 / max(td, 1e-9):16.1f}")
        (_, fp, fd), (_, qp, qd) = self.rows[:2]
        lines.append(f"packed / float time: prefill {qp / fp:.2f}x, decode {qd / fd:.2f}x")
        if len(self.rows) > 2:
            _, ip, idd = self.rows[2]
            lines.append(f"int8-activation packed / float time: prefill {ip / fp:.2f}x, decode {idd / fd:.2f}x")
        return "\n".join(lines)


def bench_model(model: Optional[str] = None, *, bits: int = 4, group_size: int = 32, prompt_len: int = 256,
                new_tokens: int = 32, repeats: int = 3, int8_activations: bool = False) -> ModelBench:
    """Time a FLOAT model (default: SmolLM2) and its packed RTN copy on the same random prompt.

    With ``int8_activations`` the packed copy is timed a second time with
    int8 activations. Raises ValueError for a model that is already quantized.
    """
    import copy

    import torch

    from . import loading
    from .model import quantize_model, set_int8_activations

    folder = loading.resolve_model(model)
    if loading.is_quantized_checkpoint(folder):
        raise ValueError(f"{folder} is already quantized; `qalora bench` compares a FLOAT model with its packed copy")
    source, tokenizer, _ = loading.load_model(folder)
    packed = quantize_model(copy.deepcopy(source), bits=bits, group_size=group_size, progress=False)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, tokenizer.vocab_size, (1, prompt_len), generator=g)
    result = ModelBench(folder.name, torch.get_num_threads(), prompt_len, new_tokens, repeats)
    for name, lm in (("float32", source), (f"INT{bits} G{group_size}", packed)):
        result.rows.append((name, *time_prefill_decode(lm, prompt, new_tokens, repeats)))
    if int8_activations:
        set_int8_activations(packed)
        result.rows.append((f"INT{bits} i8act", *time_prefill_decode(packed, prompt, new_tokens, repeats)))
    return result

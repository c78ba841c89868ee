"""The main job as functions: quantize, fine-tune, merge, evaluate, generate.

The command line (:mod:`qalora_ext.cli`), the demo and the paper benchmark
all go through these, so each step behaves the same wherever it is called
from. Library users can call them too; the lower-level pieces are
:mod:`qalora_ext.hf` (loading), :mod:`qalora_ext.gptq`, :mod:`qalora_ext.data`
and :mod:`qalora_ext.train`.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import nn

from . import hf
from .checkpoint import save_quantized

__all__ = [
    "Phases",
    "calibration_batches",
    "quantize",
    "save_model",
    "heldout_perplexity",
    "generate",
    "chat_prompt_ids",
]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class Phases:
    """Prints each phase as it starts and ends, and keeps its wall time."""

    times: dict = field(default_factory=dict)
    verbose: bool = True

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.verbose:
            print(f"[qalora] {name} ...", flush=True)
        t0 = time.perf_counter()
        yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        if self.verbose:
            print(f"[qalora] {name}: done in {self.times[name]:.1f} s", flush=True)

    def table(self) -> str:
        width = max((len(k) for k in self.times), default=5)
        rows = [f"  {k:<{width}}  {v:7.1f} s" for k, v in self.times.items()]
        rows.append(f"  {'total':<{width}}  {sum(self.times.values()):7.1f} s")
        return "\n".join(rows)


def _token_ids(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(tokenizer, text: Optional[str] = None, num_samples: int = 128, seq_len: int = 256,
                        batch_size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """GPTQ calibration: ``num_samples`` windows of ``seq_len`` tokens at random offsets of the training text.

    ``text=None`` takes the default corpus's training part, never its held-out
    part, so a GPTQ base is not calibrated on the text it is evaluated on.
    """
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"calibration needs num_samples >= 1 and seq_len >= 2; got {num_samples}, {seq_len}")
    if text is None:
        from .data import default_corpus_split

        text = default_corpus_split()[0]
    ids = _token_ids(tokenizer, text)
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than calib seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=g)
    windows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    return list(windows.split(batch_size))


def quantize(model: Optional[PathLike] = None, bits: int = 3, group_size: int = 32, method: str = "rtn",
             scale_dtype: torch.dtype = torch.float16, zero_dtype: torch.dtype = torch.float32,
             calib_samples: int = 128, calib_seq_len: int = 256, calib_text: Optional[str] = None,
             seed: int = 0, progress: bool = True):
    """Quantize a float model (default: SmolLM2) while reading it; returns ``(model, tokenizer, source folder)``."""
    folder = hf.resolve_model(model)
    tokenizer = hf.load_tokenizer(folder)
    calibration = None
    if method == "gptq":
        calibration = calibration_batches(tokenizer, calib_text, calib_samples, calib_seq_len, seed=seed)
    lm = hf.quantize_pretrained(folder, bits, group_size, method, scale_dtype, zero_dtype,
                                calibration=calibration, progress=progress)
    return lm, tokenizer, folder


def save_model(model: nn.Module, tokenizer, out: PathLike) -> Path:
    """Save a quantized model (adapters included, if any) with its tokenizer; loads with load_quantized.

    The tokenizer goes in first: the weights are then written atomically with
    config.json last, so a folder interrupted before the end never loads.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.fspath(out))
    return save_quantized(model, out)


def heldout_perplexity(model: nn.Module, tokenizer, text: Optional[str] = None, num_windows: int = 16,
                       window: int = 512, batch_size: int = 4, progress: bool = True) -> float:
    """Perplexity on evaluation windows of a text (default: the held-out part of the default corpus)."""
    from .data import default_corpus_split, heldout_windows, perplexity

    if text is None:
        text = default_corpus_split()[1]
    windows = heldout_windows(tokenizer, text, num_windows=num_windows, window=window)
    return perplexity(model, windows, batch_size=batch_size, progress=progress)


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
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if temperature > 0:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=0.95)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    model.eval()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


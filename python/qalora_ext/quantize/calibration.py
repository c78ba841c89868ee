"""Calibration text for GPTQ: token windows drawn from the training text, never the held-out part."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["calibration_batches"]


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
        from ..training.data import default_corpus_split

        text = default_corpus_split()[0]
    ids = _token_ids(tokenizer, text)
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than calib seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=g)
    windows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    return list(windows.split(batch_size))



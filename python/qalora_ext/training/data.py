"""Training and evaluation data: the default corpus, text blocks, instruction pairs, perplexity.

The default corpus is the English text of Python's documentation that ships
with every Python (``pydoc_data.topics``), so a fine-tune and its evaluation
run anywhere without a download. :func:`default_corpus_split` documents the
fixed train / held-out rule; :func:`corpus_sha256` identifies the exact text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch.utils.data import Dataset

from ..model import model_device

__all__ = [
    "HELDOUT_FRACTION",
    "IGNORE_INDEX",
    "TokenDataset",
    "default_corpus_text",
    "default_corpus_split",
    "split_topics",
    "corpus_sha256",
    "tokenize_text_blocks",
    "load_jsonl_pairs",
    "load_training_data",
    "heldout_windows",
    "heldout_perplexity",
    "perplexity",
]

HELDOUT_FRACTION = 0.15
"""Share of the default corpus's characters (rounded up to whole topics) held out for evaluation."""

IGNORE_INDEX = -100
"""Label of a position that carries no loss (transformers' and PyTorch's convention)."""

_TOPIC_SEPARATOR = "\n\n"

# (prompt key, response key) pairs accepted in JSONL files, in order of preference.
_PAIR_KEYS = (("instruction", "response"), ("prompt", "completion"), ("input", "output"))
# Alpaca-style files name the response "output" next to an "instruction".
_RESPONSE_KEYS = ("response", "completion", "output")

PathLike = Union[str, os.PathLike]


class TokenDataset(Dataset):
    """Rows of equally long tensors, one dict ``{name: row}`` per item.

    ``tensors`` maps a name (``input_ids``, ``labels``, ``attention_mask``) to
    a tensor whose first dimension indexes the examples.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if "input_ids" not in tensors:
            raise ValueError(f"TokenDataset needs an 'input_ids' tensor; got keys {sorted(tensors)}")
        n = tensors["input_ids"].shape[0]
        for name, t in tensors.items():
            if t.shape[0] != n:
                raise ValueError(f"TokenDataset: {name!r} has {t.shape[0]} rows but input_ids has {n}")
        self.tensors = dict(tensors)

    def __len__(self) -> int:
        return self.tensors["input_ids"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}


# ---------------------------------------------------------------------------
# The default corpus
# ---------------------------------------------------------------------------


def _pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def default_corpus_text() -> str:
    """The whole default corpus: ``pydoc_data.topics`` joined in sorted key order with blank lines."""
    topics = _pydoc_topics()
    return _TOPIC_SEPARATOR.join(topics[k] for k in sorted(topics))


def split_topics(topics: Mapping[str, str], heldout_fraction: float = HELDOUT_FRACTION) -> tuple[str, str]:
    """Split named texts into ``(train_text, heldout_text)`` along whole texts.

    The texts are joined in sorted key order, separated by ``"\\n\\n"``. The
    cut is the start of the first text that begins at or after
    ``(1 - heldout_fraction)`` of the joined characters; when no text begins
    there (the last one is very long), the last text is held out.
    ``train_text + heldout_text`` is the joined text, so the training part
    ends with the separator.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1); got {heldout_fraction!r}")
    if len(topics) < 2:
        raise ValueError(f"split_topics needs at least 2 texts to hold some out; got {len(topics)}")
    keys = sorted(topics)
    starts, pos = [], 0
    for k in keys:
        starts.append(pos)
        pos += len(topics[k]) + len(_TOPIC_SEPARATOR)
    joined = _TOPIC_SEPARATOR.join(topics[k] for k in keys)
    threshold = (1.0 - heldout_fraction) * len(joined)
    cut = next((s for s in starts[1:] if s >= threshold), starts[-1])
    return joined[:cut], joined[cut:]


def default_corpus_split() -> tuple[str, str]:
    """``(train_text, heldout_text)`` of the default corpus, by a fixed rule.

    The corpus is the English text of Python's documentation shipped with
    every Python, ``pydoc_data.topics`` (a dict name -> text). Rule: join the
    topics in sorted key order separated by ``"\\n\\n"``; the held-out part
    is the last whole topics, starting at the first topic boundary at or
    after 85% of the characters (so about the final 15%); training is
    everything before it. The two parts are disjoint and concatenate to the
    joined text (see :func:`split_topics`). The text differs between Python
    versions; report :func:`corpus_sha256` of the parts used.
    """
    return split_topics(_pydoc_topics(), HELDOUT_FRACTION)


VALIDATION_FRACTION = 0.1


def default_validation_split(fraction: float = VALIDATION_FRACTION) -> tuple[str, str]:
    """``(train_text, validation_text)``: the default corpus's TRAINING part split again along whole topics.

    For choices made while tuning (learning rates, methods): the validation
    text is the last ``fraction`` of the training part's topics (same rule as
    :func:`split_topics`), so a choice never looks at the held-out part, and
    training on ``train_text`` never sees the validation text.
    ``train_text + validation_text`` is :func:`default_corpus_split`'s training part.
    """
    topics = _pydoc_topics()
    train_part, _ = default_corpus_split()
    kept, pos = {}, 0
    for k in sorted(topics):
        if pos >= len(train_part):
            break
        kept[k] = topics[k]
        pos += len(topics[k]) + len(_TOPIC_SEPARATOR)
    train_text, validation_text = split_topics(kept, fraction)
    # split_topics joins without a trailing separator; the training part ends with one.
    validation_text += train_part[len(train_text) + len(validation_text):]
    if train_text + validation_text != train_part:
        raise RuntimeError("default_validation_split: the parts do not add up to the training part")
    return train_text, validation_text


def corpus_sha256(text: str) -> str:
    """Hex SHA-256 of ``text`` encoded as UTF-8: identifies the exact text a run used."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: a whole corpus is longer than model_max_length on purpose
    # (it is chopped into blocks afterwards); the length warning would mislead.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (a loss needs a next token); got {seq_len!r}")


def _check_limit(name: str, value: Optional[int]) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an integer >= 1; got {value!r}")


def tokenize_text_blocks(text: str, tokenizer, seq_len: int, max_blocks: Optional[int] = None,
                         name: str = "text") -> dict[str, torch.Tensor]:
    """Tokenize ``text`` once and chop it into non-overlapping blocks of ``seq_len`` tokens.

    No special tokens are added. The remainder shorter than ``seq_len`` is
    dropped; ``max_blocks`` keeps only the first blocks. Returns
    ``{"input_ids": LongTensor (n, seq_len)}``; there are no ``labels``: the
    loss is on every token (labels = input_ids, the model's shift predicts
    each next token). ``name`` is used in error messages.
    """
    _check_seq_len(seq_len)
    _check_limit("max_blocks", max_blocks)
    ids = _encode(tokenizer, text)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"dataset {name} has {len(ids)} tokens, fewer than seq_len={seq_len}; "
                         f"use more text or a smaller seq_len")
    if max_blocks is not None:
        n = min(n, max_blocks)
    return {"input_ids": torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)}


def _pair_from_record(record, path: Path, line_no: int) -> tuple[str, str]:
    """(user text, assistant text) of one JSONL record."""
    accepted = ", ".join(f"{p!r}/{r!r}" for p, r in _PAIR_KEYS)
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_no}: expected a JSON object with keys {accepted}; "
                         f"got a {type(record).__name__}")
    response_key = next((k for k in _RESPONSE_KEYS if k in record), None)
    prompt_key = next((k for k in ("instruction", "prompt", "input") if k in record and k != response_key), None)
    if prompt_key is None or response_key is None:
        raise ValueError(f"{path}:{line_no}: expected one of the key pairs {accepted} "
                         f"(an Alpaca 'instruction' may come with 'input' and 'output'); got keys {sorted(record)}")
    prompt, response = record[prompt_key], record[response_key]
    # Alpaca: the optional "input" is context that belongs to the instruction.
    context = record.get("input") if prompt_key == "instruction" else None
    for key, value in ((prompt_key, prompt), (response_key, response), ("input", context)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}:{line_no}: {key!r} must be a string; got {type(value).__name__}")
    if context:
        prompt = f"{prompt}\n\n{context}"
    if not response:
        raise ValueError(f"{path}:{line_no}: {response_key!r} is empty; there would be nothing to learn")
    return prompt, response


def _chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool, path: Path) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except ValueError as e:
        if getattr(tokenizer, "chat_template", "missing") is None:
            raise ValueError(f"{path}: instruction/response data is formatted with the tokenizer's chat template, "
                             f"but this tokenizer has none; set tokenizer.chat_template or train on a text "
                             f"file") from e
        raise


def load_jsonl_pairs(path: PathLike, tokenizer, seq_len: int, max_examples: Optional[int] = None
                     ) -> dict[str, torch.Tensor]:
    """Instruction/response pairs from a JSONL file, formatted with the tokenizer's chat template.

    Each non-blank line is a JSON object with one of the key pairs
    ``instruction``/``response``, ``prompt``/``completion`` or
    ``input``/``output`` (Alpaca's ``instruction`` + optional ``input`` +
    ``output`` also works: the input is appended to the instruction). The
    conversation is ``[user: instruction, assistant: response]``.

    The prompt is the template applied to the user turn with the generation
    prompt; the response tokens are the rest of the full conversation's
    template text (both tokenized without adding special tokens: the
    template writes its own). ``labels`` are ``-100`` on the prompt tokens
    and on padding, so the loss is on the response only. Sequences are cut
    to ``seq_len`` and right-padded with the pad id (else eos, else 0; padded
    positions are masked, so the id does not matter). An example whose
    prompt fills ``seq_len`` has no response token left and is dropped with
    a warning. Returns ``input_ids``, ``labels``, ``attention_mask``, each
    ``(n, seq_len)``.
    """
    _check_seq_len(seq_len)
    _check_limit("max_examples", max_examples)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such training data file")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else pad_id
    rows_ids, rows_labels, dropped = [], [], 0
    last_line = 0
    with open(path, encoding="utf-8", errors="strict") as f:
        for line_no, line in enumerate(_text_lines(f, path), start=1):
            last_line = line_no
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
            prompt, response = _pair_from_record(record, path, line_no)
            user = [{"role": "user", "content": prompt}]
            prompt_text = _chat_template(tokenizer, user, True, path)
            full_text = _chat_template(tokenizer, user + [{"role": "assistant", "content": response}], False, path)
            # Templates normally render the prompt as a prefix of the whole
            # conversation; if one does not, only the shared prefix is masked.
            shared = os.path.commonprefix([prompt_text, full_text])
            prompt_ids = _encode(tokenizer, shared)
            response_ids = _encode(tokenizer, full_text[len(shared):])
            ids = (prompt_ids + response_ids)[:seq_len]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:seq_len]
            if all(t == IGNORE_INDEX for t in labels[1:]):
                dropped += 1
                continue
            rows_ids.append(ids)
            rows_labels.append(labels)
            if max_examples is not None and len(rows_ids) == max_examples:
                break
    if last_line == 0:
        raise ValueError(f"{path}: the file is empty; expected one JSON object per line")
    if not rows_ids:
        reason = (f"all {dropped} examples have prompts of seq_len={seq_len} tokens or more" if dropped
                  else "every line is blank")
        raise ValueError(f"{path}: no usable example up to line {last_line}: {reason}")
    if dropped:
        warnings.warn(f"{path}: dropped {dropped} example(s) whose prompt fills seq_len={seq_len} "
                      f"(no response token left to learn)", stacklevel=2)
    n = len(rows_ids)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, seq_len), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows_ids, rows_labels)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _text_lines(f, path: Path):
    """The lines of a text file; a binary file is a ValueError naming it (not a UnicodeDecodeError)."""
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not text (not UTF-8: {e.reason} at byte {e.start})") from None


def load_training_data(path: Optional[PathLike], tokenizer, seq_len: int,
                       max_examples: Optional[int] = None) -> TokenDataset:
    """The training set of a fine-tune, as a :class:`TokenDataset`.

    ``path=None``: the training part of the default corpus
    (:func:`default_corpus_split`) in blocks of ``seq_len`` tokens. A
    ``.jsonl`` file: instruction/response pairs (:func:`load_jsonl_pairs`).
    Any other file: UTF-8 text in blocks (:func:`tokenize_text_blocks`).
    ``max_examples`` keeps only the first examples.
    """
    if path is None:
        train_text, _ = default_corpus_split()
        return TokenDataset(tokenize_text_blocks(train_text, tokenizer, seq_len, max_examples,
                                                  name="default corpus (pydoc_data, training part)"))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such training data file")
    if path.suffix.lower() == ".jsonl":
        return TokenDataset(load_jsonl_pairs(path, tokenizer, seq_len, max_examples))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the training data is not text (not UTF-8: {e.reason} at byte {e.start}); "
                         f"give a text file or a .jsonl file") from None
    return TokenDataset(tokenize_text_blocks(text, tokenizer, seq_len, max_examples, name=str(path)))


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def heldout_windows(tokenizer, text: Optional[str] = None, num_windows: int = 16, window: int = 512
                    ) -> torch.Tensor:
    """Evaluation windows of held-out tokens, ``LongTensor (num_windows, window)``.

    ``text`` (default: the held-out part of :func:`default_corpus_split`) is
    tokenized once without special tokens. The region is its last
    ``num_windows * window * 5`` tokens, or the whole text if it is shorter.
    Window starts are spaced evenly over the region, the first at its start
    and the last ending at the text's end (rounded down to whole tokens), so
    the windows never overlap. If the text has fewer than ``num_windows *
    window`` tokens, the windows are the last ``len // window`` whole
    windows laid back to back up to its end, with a warning (an error if not
    even one fits).
    """
    for name, value in (("num_windows", num_windows), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens (a window predicts its own next tokens); got {window}")
    name = "the held-out text"
    if text is None:
        _, text = default_corpus_split()
        name = "the default corpus's held-out part"
    ids = torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    n = ids.numel()
    if n < window:
        raise ValueError(f"{name} has {n} tokens, fewer than one window of {window}")
    if n < num_windows * window:
        fit = n // window
        warnings.warn(f"{name} has {n} tokens, room for {fit} of the {num_windows} windows of {window} asked for; "
                      f"evaluating on {fit}", stacklevel=2)
        return ids[n - fit * window:].view(fit, window).clone()
    span = min(n, num_windows * window * 5)
    region = ids[n - span:]
    if num_windows == 1:
        starts = [span - window]
    else:
        # floor(i * stride) with stride >= window: consecutive starts are >= window apart.
        starts = [(i * (span - window)) // (num_windows - 1) for i in range(num_windows)]
    return torch.stack([region[s: s + window] for s in starts])


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """``exp`` of the mean next-token negative log-likelihood over all windows.

    Each window (a row of ``windows``, ``(n, T)``) is evaluated on its own,
    without context from the others; its ``T - 1`` next tokens are predicted
    and all ``n * (T - 1)`` predictions weigh the same. The model is called
    as ``model(input_ids=...)`` and the loss computed from ``.logits`` with a
    float32 log-softmax (summed in float64), so any transformers causal LM
    works. Runs in eval mode under ``torch.inference_mode``; the model's
    training mode is restored afterwards.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"windows must be a LongTensor (n >= 1, window >= 2); got {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    from tqdm.auto import tqdm

    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", leave=False,
                              disable=not progress or None):
                batch = windows[start: start + batch_size].to(device)
                logits = model(input_ids=batch).logits[:, :-1].float()
                logp = torch.log_softmax(logits, dim=-1)
                nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
                total_nll += nll.double().sum().cpu()
    finally:
        model.train(was_training)
    count = windows.shape[0] * (windows.shape[1] - 1)
    return math.exp(total_nll.item() / count)


def heldout_perplexity(model: torch.nn.Module, tokenizer, text: Optional[str] = None, num_windows: int = 16,
                       window: int = 512, batch_size: int = 4, progress: bool = True) -> float:
    """Perplexity on evaluation windows of a text (default: the held-out part of the default corpus)."""
    if text is None:
        text = default_corpus_split()[1]
    windows = heldout_windows(tokenizer, text, num_windows=num_windows, window=window)
    return perplexity(model, windows, batch_size=batch_size, progress=progress)



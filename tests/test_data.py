"""qalora_ext.training.data: the default corpus split, text blocks, instruction pairs, held-out windows, perplexity.

A character-level fake tokenizer stands in for a real one (nothing is
downloaded); a tiny random Llama stands in for a real model.
"""

import json
import random

import pytest
import torch

from qalora_ext.training import data
from qalora_ext.training.data import (
    IGNORE_INDEX,
    corpus_sha256,
    default_corpus_split,
    default_corpus_text,
    heldout_windows,
    load_jsonl_pairs,
    load_training_data,
    perplexity,
    split_topics,
    tokenize_text_blocks,
)


class CharTokenizer:
    """One token per character (ids 2..255; 0 is pad, 1 is eos) and a tag-style chat template."""

    pad_token_id = 0
    eos_token_id = 1
    chat_template = "<user>...</user><assistant>...</assistant>"

    def encode(self, text):
        return [2 + ord(c) % 254 for c in text]

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": self.encode(text)}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert not tokenize
        if self.chat_template is None:
            raise ValueError("no chat template")
        out = ""
        for m in messages:
            out += f"<{m['role']}>{m['content']}</{m['role']}>"
        return out + ("<assistant>" if add_generation_prompt else "")


pytestmark = pytest.mark.usefixtures("one_thread")

def random_text(n):
    return "".join(random.choice("abcdefghij klmnopq\nrstuvwxyzXYZ.,") for _ in range(n))


def random_word(lo=1, hi=12):
    return "".join(random.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(random.randint(lo, hi)))


@pytest.fixture(autouse=True)
def python_seed(fresh_seed):
    random.seed(fresh_seed)


# ---------------------------------------------------------------------------
# Default corpus
# ---------------------------------------------------------------------------


def test_default_corpus_split_rule():
    from pydoc_data.topics import topics

    keys = sorted(topics)
    joined = default_corpus_text()
    assert joined == "\n\n".join(topics[k] for k in keys)
    train, heldout = default_corpus_split()
    assert train and heldout
    assert train + heldout == joined
    # The held-out part is whole topics: the last ones, starting at the first
    # topic boundary at or after 85% of the characters.
    starts, pos = [], 0
    for k in keys:
        starts.append(pos)
        pos += len(topics[k]) + 2
    j = starts.index(len(train))
    assert heldout == "\n\n".join(topics[k] for k in keys[j:])
    assert starts[j] >= 0.85 * len(joined) > starts[j - 1]
    assert not set(keys[:j]) & set(keys[j:])
    assert 0.05 < len(heldout) / len(joined) <= 0.15
    assert default_corpus_split() == (train, heldout)


def test_split_topics_synthetic():
    topics = {f"t{i:03d}": random_word(1, 200) for i in range(random.randint(5, 40))}
    train, heldout = split_topics(topics, 0.3)
    keys = sorted(topics)
    joined = "\n\n".join(topics[k] for k in keys)
    assert train + heldout == joined
    cut = len(train)
    boundaries = [sum(len(topics[k]) + 2 for k in keys[:i]) for i in range(1, len(keys))]
    assert cut in boundaries
    later = [b for b in boundaries if b >= 0.7 * len(joined)]
    assert cut == (later[0] if later else boundaries[-1])


def test_split_topics_last_topic_too_long_is_held_out():
    topics = {"a": "x" * 10, "b": "y" * 10, "c": "z" * 1000}
    train, heldout = split_topics(topics, 0.15)
    assert heldout == "z" * 1000 and train == "x" * 10 + "\n\n" + "y" * 10 + "\n\n"


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_split_topics_rejects_fraction(bad):
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_topics({"a": "x", "b": "y"}, bad)


def test_split_topics_needs_two():
    with pytest.raises(ValueError, match="at least 2"):
        split_topics({"a": "x"})


def test_corpus_sha256():
    import hashlib

    text = random_text(100) + "é✓"
    assert corpus_sha256(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert corpus_sha256(text) != corpus_sha256(text + " ")


# ---------------------------------------------------------------------------
# Text blocks
# ---------------------------------------------------------------------------


def test_tokenize_text_blocks():
    tok = CharTokenizer()
    seq_len = random.randint(4, 16)
    text = random_text(random.randint(5 * seq_len, 9 * seq_len))
    ids = torch.tensor(tok.encode(text))
    out = tokenize_text_blocks(text, tok, seq_len)
    n = len(ids) // seq_len
    assert set(out) == {"input_ids"}
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape == (n, seq_len)
    assert torch.equal(out["input_ids"], ids[: n * seq_len].view(n, seq_len))
    limited = tokenize_text_blocks(text, tok, seq_len, max_blocks=2)["input_ids"]
    assert torch.equal(limited, out["input_ids"][:2])


def test_tokenize_text_blocks_too_short():
    with pytest.raises(ValueError, match=r"has 7 tokens, fewer than seq_len=8"):
        tokenize_text_blocks("abcdefg", CharTokenizer(), 8)


@pytest.mark.parametrize("bad", [0, 1, 2.0, True])
def test_tokenize_text_blocks_bad_seq_len(bad):
    with pytest.raises(ValueError, match="seq_len"):
        tokenize_text_blocks("abcdefg", CharTokenizer(), bad)


def test_load_training_data_text_and_default(tmp_path):
    tok = CharTokenizer()
    text = random_text(300)
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    ds = load_training_data(path, tok, 32)
    assert len(ds) == 300 // 32
    assert torch.equal(ds[1]["input_ids"], torch.tensor(tok.encode(text[32:64])))
    train, _ = default_corpus_split()
    default = load_training_data(None, tok, 64, max_examples=5)
    assert len(default) == 5
    assert torch.equal(default.tensors["input_ids"].flatten(), torch.tensor(tok.encode(train[: 5 * 64])))


def test_load_training_data_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_training_data(missing, CharTokenizer(), 16)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl_pairs(missing, CharTokenizer(), 16)


# ---------------------------------------------------------------------------
# JSONL instruction pairs
# ---------------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_jsonl_label_masking(tmp_path):
    tok = CharTokenizer()
    pairs = [(random_word(1, 10), random_word(1, 10)) for _ in range(random.randint(3, 8))]
    path = tmp_path / "pairs.jsonl"
    keys = [("instruction", "response"), ("prompt", "completion"), ("input", "output")]
    write_jsonl(path, [{keys[i % 3][0]: p, keys[i % 3][1]: r} for i, (p, r) in enumerate(pairs)])
    seq_len = 64
    out = load_jsonl_pairs(path, tok, seq_len)
    assert set(out) == {"input_ids", "labels", "attention_mask"}
    for t in out.values():
        assert t.shape == (len(pairs), seq_len) and t.dtype == torch.long
    for i, (p, r) in enumerate(pairs):
        prompt = tok.encode(f"<user>{p}</user><assistant>")
        full = tok.encode(f"<user>{p}</user><assistant>{r}</assistant>")
        assert len(full) <= seq_len
        ids, labels, mask = out["input_ids"][i], out["labels"][i], out["attention_mask"][i]
        assert ids[: len(full)].tolist() == full
        assert (ids[len(full):] == tok.pad_token_id).all()
        expect_masked = torch.zeros(seq_len, dtype=torch.bool)
        expect_masked[: len(prompt)] = True
        expect_masked[len(full):] = True
        assert torch.equal(labels == IGNORE_INDEX, expect_masked)
        assert torch.equal(labels[~expect_masked], ids[~expect_masked])
        assert mask.tolist() == [1] * len(full) + [0] * (seq_len - len(full))


def test_jsonl_alpaca_input_joins_instruction(tmp_path):
    tok = CharTokenizer()
    path = tmp_path / "alpaca.jsonl"
    write_jsonl(path, [{"instruction": "do", "input": "ctx", "output": "ok"},
                       {"instruction": "go", "input": "", "output": "no"}])
    out = load_jsonl_pairs(path, tok, 48)
    first = tok.encode("<user>do\n\nctx</user><assistant>ok</assistant>")
    second = tok.encode("<user>go</user><assistant>no</assistant>")
    assert out["input_ids"][0, : len(first)].tolist() == first
    assert out["input_ids"][1, : len(second)].tolist() == second


def test_jsonl_truncation_and_dropped_prompts(tmp_path):
    tok = CharTokenizer()
    path = tmp_path / "long.jsonl"
    long_prompt = "p" * 40
    write_jsonl(path, [{"prompt": "hi", "completion": "a long answer"}, {"prompt": long_prompt, "completion": "x"}])
    seq_len = len("<user>hi</user><assistant>") + 3
    with pytest.warns(UserWarning, match="dropped 1 example"):
        out = load_jsonl_pairs(path, tok, seq_len)
    assert out["input_ids"].shape == (1, seq_len)
    assert out["attention_mask"].all()
    assert (out["labels"][0, -3:] == out["input_ids"][0, -3:]).all()
    assert out["input_ids"][0, -3:].tolist() == tok.encode("a l")
    with pytest.raises(ValueError, match=r"long\.jsonl: no usable example .*all 2 examples have prompts"):
        load_jsonl_pairs(path, tok, 10)


def test_jsonl_max_examples(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"instruction": random_word(), "response": random_word()} for _ in range(6)])
    assert len(load_training_data(path, CharTokenizer(), 64, max_examples=4)) == 4


def test_jsonl_errors(tmp_path):
    tok = CharTokenizer()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*empty"):
        load_jsonl_pairs(empty, tok, 16)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"blank\.jsonl.*line 2"):
        load_jsonl_pairs(blank, tok, 16)
    bad_keys = tmp_path / "keys.jsonl"
    write_jsonl(bad_keys, [{"instruction": "a", "response": "b"}, {"question": "a", "answer": "b"}])
    with pytest.raises(ValueError, match=r"keys\.jsonl:2: .*'instruction'/'response'.*'prompt'/'completion'"
                                         r".*'input'/'output'.*\['answer', 'question'\]"):
        load_jsonl_pairs(bad_keys, tok, 16)
    bad_json = tmp_path / "json.jsonl"
    bad_json.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"json\.jsonl:3: not valid JSON"):
        load_jsonl_pairs(bad_json, tok, 16)
    not_str = tmp_path / "types.jsonl"
    write_jsonl(not_str, [{"prompt": "a", "completion": 3}])
    with pytest.raises(ValueError, match=r"types\.jsonl:1: 'completion' must be a string"):
        load_jsonl_pairs(not_str, tok, 16)
    no_template = CharTokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        load_jsonl_pairs(bad_keys, no_template, 16)


# ---------------------------------------------------------------------------
# Held-out windows
# ---------------------------------------------------------------------------


def is_slice_of(window, ids):
    w = len(window)
    return any(torch.equal(ids[s: s + w], window) for s in range(len(ids) - w + 1))


def test_heldout_windows_long_text():
    tok = CharTokenizer()
    num_windows, window = 4, 8
    span = num_windows * window * 5
    n = span + random.randint(1, 300)
    text = random_text(n)
    ids = torch.tensor(tok.encode(text))
    out = heldout_windows(tok, text, num_windows=num_windows, window=window)
    assert out.shape == (num_windows, window) and out.dtype == torch.long
    starts = [(i * (span - window)) // (num_windows - 1) + n - span for i in range(num_windows)]
    for row, s in zip(out, starts):
        assert torch.equal(row, ids[s: s + window])
    assert starts[0] == n - span and starts[-1] + window == n


def test_heldout_windows_shorter_than_span_uses_whole_text():
    tok = CharTokenizer()
    num_windows, window = 4, 8
    n = random.randint(num_windows * window, num_windows * window * 5 - 1)
    text = random_text(n)
    ids = torch.tensor(tok.encode(text))
    out = heldout_windows(tok, text, num_windows=num_windows, window=window)
    assert out.shape == (num_windows, window)
    assert torch.equal(out[0], ids[:window]) and torch.equal(out[-1], ids[-window:])
    flat_starts = [(i * (n - window)) // (num_windows - 1) for i in range(num_windows)]
    assert all(b - a >= window for a, b in zip(flat_starts, flat_starts[1:]))
    for row, s in zip(out, flat_starts):
        assert torch.equal(row, ids[s: s + window])


def test_heldout_windows_too_short():
    tok = CharTokenizer()
    text = random_text(8 * 2 + 5)
    with pytest.warns(UserWarning, match="room for 2 of the 4 windows"):
        out = heldout_windows(tok, text, num_windows=4, window=8)
    ids = torch.tensor(tok.encode(text))
    assert torch.equal(out, ids[5:].view(2, 8))
    with pytest.raises(ValueError, match="fewer than one window of 8"):
        heldout_windows(tok, "abcdefg", num_windows=4, window=8)


def test_heldout_windows_default_corpus():
    tok = CharTokenizer()
    _, heldout = default_corpus_split()
    out = heldout_windows(tok, num_windows=16, window=512)
    assert out.shape == (16, 512)
    ids = torch.tensor(tok.encode(heldout))
    assert torch.equal(out[-1], ids[-512:])
    assert is_slice_of(out[7], ids)


# ---------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------


def tiny_model():
    import transformers

    import qalora_ext

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config)
    qalora_ext.quantize_model(model, bits=4, group_size=32, progress=False)
    qalora_ext.add_adapters(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    return model


def test_perplexity_matches_float64_reference():
    model = tiny_model()
    windows = torch.randint(0, 256, (5, random.randint(8, 24)))
    model.train()
    ppl = perplexity(model, windows, batch_size=2, progress=False)
    assert model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            total -= logp[torch.arange(len(w) - 1), w[1:]].sum().item()
            count += len(w) - 1
    ref = torch.tensor(total / count, dtype=torch.float64).exp().item()
    assert ppl == pytest.approx(ref, rel=1e-5)
    assert perplexity(model, windows, batch_size=5, progress=False) == pytest.approx(ref, rel=1e-5)


def test_perplexity_rejects_bad_windows():
    model = tiny_model()
    with pytest.raises(ValueError, match="windows must be"):
        perplexity(model, torch.randint(0, 256, (8,)), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, torch.randint(0, 256, (2, 8)), batch_size=0, progress=False)


def test_module_exports():
    for name in data.__all__:
        assert hasattr(data, name), name

"""Checkpoints: exact round trips, sharding, atomic saves, integrity checks, adapters.

Every test draws fresh random weights (conftest seeds each test anew and
prints the seed on failure), so a pass does not depend on one lucky draw. Round trips compare outputs with torch.equal: the
format stores codes, scales, zeros and adapters bit for bit, and the kernels
are deterministic (SPEC), so anything short of identity is a bug.
"""

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qalora_ext as qe
from qalora_ext import checkpoint as ckpt
from qalora_ext.checkpoint import files as ckpt_files
from qalora_ext.checkpoint import CheckpointError


class Tiny(nn.Module):
    """Embedding, three linears (in 64, 128, 96) and an lm_head tied to the embedding."""

    def __init__(self, vocab=100, d=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, 128)
        self.mid = nn.Linear(128, 96)
        self.down = nn.Linear(96, d, bias=False)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(F.gelu(self.mid(F.gelu(self.up(h)))))
        return self.lm_head(self.norm(h))


def _quantize(model, bits, group_size=32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # G=64 leaves the 96-input layer float, with a warning
        return qe.quantize_model(model, bits=bits, group_size=group_size, progress=False)


def _randomize_adapters(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qe.QALoRALinear):
                m.lora_B.normal_(0.0, 0.5)
                m.lora_A.normal_(0.0, 0.5)


def _out(model, ids):
    with torch.no_grad():
        y = model(ids)
    return getattr(y, "logits", y)


def _make(bits, group_size=32, adapters=True, rank=4):
    """(float copy of the architecture, quantized model, base output, output)."""
    fresh = Tiny()
    model = _quantize(copy.deepcopy(fresh), bits, group_size).eval()
    ids = torch.randint(0, 100, (2, 7))
    y_base = _out(model, ids)
    if adapters:
        qe.add_adapters(model, rank=rank)
        _randomize_adapters(model)
        model.eval()
    y = _out(model, ids)
    assert y.abs().sum() > 0
    if adapters:
        assert not torch.equal(y, y_base)
    return fresh, model, ids, y


def _leftovers(path):
    path = Path(path)
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("adapters", [True, False], ids=["adapters", "no_adapters"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_roundtrip_into_fresh_float_model(tmp_path, bits, adapters):
    _, model, ids, y = _make(bits, adapters=adapters)
    out = tmp_path / "ckpt"
    qe.save_quantized(model, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qalora_ext" and qc["format_version"] == 1  # nothing that needs version 2
    assert (qc["bits"], qc["group_size"], qc["packed_layout"]) == (bits, 32, 1)
    assert (qc["scale_dtype"], qc["zero_dtype"]) == ("float16", "float32")
    assert set(qc["modules"]) == {"up", "mid", "down"}
    assert qc["tied"] == {"lm_head.weight": "embed.weight"}
    assert (qc["modules"]["up"]["adapter"] is not None) == adapters
    assert qc["files"]["model.safetensors"]["size"] == (out / "model.safetensors").stat().st_size

    loaded = qe.load_quantized(out, Tiny())  # a fresh float model with other random weights
    assert not loaded.training
    assert loaded.lm_head.weight is loaded.embed.weight
    trainable = sorted(n for n, p in loaded.named_parameters() if p.requires_grad)
    if adapters:  # ready to resume training: as after add_adapters, only the adapters train
        assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert torch.equal(_out(loaded, ids), y)
    for name in ("up", "mid", "down"):
        got, want = loaded.get_submodule(name), model.get_submodule(name)
        assert type(got) is type(want)
        gb = got.base if adapters else got
        wb = want.base if adapters else want
        for t in ("packed", "scale", "zero"):
            assert getattr(gb, t).dtype == getattr(wb, t).dtype
            assert torch.equal(getattr(gb, t), getattr(wb, t))


def test_roundtrip_mixed_float_and_quantized_layers(tmp_path):
    # G=64: the layer with in_features=96 stays nn.Linear and travels as a float tensor.
    _, model, ids, y = _make(4, group_size=64)
    assert isinstance(model.down, nn.Linear) and isinstance(model.up, qe.QALoRALinear)
    qe.save_quantized(model, tmp_path / "c")
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert set(qc["modules"]) == {"up", "mid"} and qc["group_size"] == 64
    loaded = qe.load_quantized(tmp_path / "c", Tiny())
    assert isinstance(loaded.down, nn.Linear)
    assert torch.equal(_out(loaded, ids), y)


def test_load_into_already_quantized_model(tmp_path):
    _, model, ids, y = _make(3)
    qe.save_quantized(model, tmp_path / "c")
    other = _quantize(Tiny(), 2)  # other bits, other weights, no adapters
    loaded = qe.load_quantized(tmp_path / "c", other)
    assert loaded is other and loaded.up.bits == 3 and isinstance(loaded.up, qe.QALoRALinear)
    assert torch.equal(_out(loaded, ids), y)


def test_shared_quantized_layer_stays_shared(tmp_path):
    class Twice(Tiny):
        def forward(self, ids):
            h = self.embed(ids)
            h = h + self.down(F.gelu(self.mid(F.gelu(self.up(h)))))
            h = h + self.down(F.gelu(self.mid(F.gelu(self.up2(h)))))
            return self.lm_head(self.norm(h))

    model = _quantize(Twice(), 4)
    qe.add_adapters(model, rank=4)
    _randomize_adapters(model)
    model.up2 = model.up  # one layer object under two names
    ids = torch.randint(0, 100, (2, 5))
    y = _out(model.eval(), ids)
    qe.save_quantized(model, tmp_path / "c")
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["tied_modules"] == {"up2": "up"}
    fresh = Twice()
    fresh.up2 = nn.Linear(64, 128)
    loaded = qe.load_quantized(tmp_path / "c", fresh)
    assert loaded.up2 is loaded.up
    assert torch.equal(_out(loaded, ids), y)


def test_sharded_save_and_load(tmp_path):
    _, model, ids, y = _make(4)
    out = tmp_path / "sharded"
    qe.save_quantized(model, out, max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    files = json.loads((out / "config.json").read_text())["quantization_config"]["files"]
    assert set(files) == set(shards) | {"model.safetensors.index.json"}
    from safetensors import safe_open

    with safe_open(str(out / shards[0]), framework="pt") as f:
        meta = f.metadata()
    # SPEC's {"format": "pt"}, plus each packed layer's [bits, group_size, layout] (bound to the data).
    assert meta["format"] == "pt" and set(meta) == {"format", "qalora_ext.layers"}
    assert json.loads(meta["qalora_ext.layers"]) == {"up": [4, 32, 1], "mid": [4, 32, 1], "down": [4, 32, 1]}
    assert torch.equal(_out(qe.load_quantized(out, Tiny()), ids), y)


def test_parse_size():
    assert ckpt.parse_size("2GB") == 2 * 10**9
    assert ckpt.parse_size("500MB") == 500 * 10**6
    assert ckpt.parse_size("10KB") == 10_000
    assert ckpt.parse_size("10kib") == 10_240
    assert ckpt.parse_size(12345) == 12345
    for bad in ("ten MB", "-1MB", 0, True):
        with pytest.raises((ValueError, TypeError)):
            ckpt.parse_size(bad)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_transformers_llama_model_none(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=100,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    _quantize(model, 4)
    qe.add_adapters(model, rank=4)
    _randomize_adapters(model)
    ids = torch.randint(0, 100, (2, 9))
    y = _out(model, ids)
    assert y.abs().sum() > 0
    qe.save_quantized(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization_config"]["quant_method"] == "qalora_ext"
    assert ("lm_head.weight" in config["quantization_config"]["tied"]) == tie

    loaded = qe.load_quantized(tmp_path / "hf")
    assert type(loaded) is type(model) and not loaded.training
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    assert isinstance(loaded.model.layers[0].mlp.down_proj, qe.QALoRALinear)
    assert torch.equal(_out(loaded, ids), y)


def test_model_none_needs_transformers_config(tmp_path):
    _, model, _, _ = _make(4, adapters=False)
    qe.save_quantized(model, tmp_path / "c")
    with pytest.raises(CheckpointError, match="model="):
        qe.load_quantized(tmp_path / "c")


def test_save_refuses_float_model(tmp_path):
    with pytest.raises(ValueError, match="quantize_model"):
        qe.save_quantized(Tiny(), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_load_into_other_architecture_fails_clearly(tmp_path):
    _, model, _, _ = _make(4)
    qe.save_quantized(model, tmp_path / "c")
    smaller = Tiny()
    smaller.mid = nn.Linear(128, 64)
    with pytest.raises(CheckpointError, match="mid"):
        qe.load_quantized(tmp_path / "c", smaller)
    assert type(smaller.up) is nn.Linear  # checked before anything was replaced
    wider = Tiny(vocab=120)
    with pytest.raises(CheckpointError, match=r"shapes.*embed\.weight"):
        qe.load_quantized(tmp_path / "c", wider)
    assert type(wider.up) is nn.Linear and wider.embed.weight.shape == (120, 64)
    missing = Tiny()
    del missing.down
    with pytest.raises(CheckpointError, match="down"):
        qe.load_quantized(tmp_path / "c", missing)


# ---------------------------------------------------------------------------
# Atomicity
# ---------------------------------------------------------------------------


def _failing_save_file(monkeypatch, exc, after=1):
    real = ckpt_files.save_file
    calls = {"n": 0}

    def save_file(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise exc("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_files, "save_file", save_file)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch, exc):
    _, model, _, _ = _make(4)
    out = tmp_path / "c"
    _failing_save_file(monkeypatch, exc)  # the second shard fails
    with pytest.raises(exc, match="injected"):
        qe.save_quantized(model, out, max_shard_size="20KB")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["shard", "rename"])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_overwrite_keeps_old_checkpoint(tmp_path, monkeypatch, exc, where):
    _, old_model, ids, y_old = _make(2)
    _, new_model, _, y_new = _make(4)
    out = tmp_path / "c"
    qe.save_quantized(old_model, out, max_shard_size="20KB")
    old_files = sorted(os.listdir(out))
    if where == "shard":
        _failing_save_file(monkeypatch, exc, after=0)  # the new save is one file
    else:
        real = os.rename

        def rename(src, dst, *a, **k):
            if Path(src).name.startswith(".c.tmp-"):
                raise exc("injected")
            return real(src, dst, *a, **k)

        monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(exc, match="injected"):
        qe.save_quantized(new_model, out)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == old_files
    assert _leftovers(out) == []
    loaded = qe.load_quantized(out, Tiny())
    assert loaded.up.bits == 2
    assert torch.equal(_out(loaded, ids), y_old)
    assert not torch.equal(y_old, y_new)


def test_overwrite_replaces_stale_shards_and_keeps_foreign_files(tmp_path):
    _, old_model, _, _ = _make(2)
    _, new_model, ids, y_new = _make(3)
    out = tmp_path / "c"
    qe.save_quantized(old_model, out, max_shard_size="20KB")
    (out / "tokenizer.json").write_text('{"hello": 1}')
    qe.save_quantized(new_model, out)  # one file now: the old shards and index must go
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == '{"hello": 1}'
    assert _leftovers(out) == []
    assert torch.equal(_out(qe.load_quantized(out, Tiny()), ids), y_new)


# ---------------------------------------------------------------------------
# Integrity
# ---------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    _, model, ids, y = _make(4)
    out = tmp_path / "c"
    qe.save_quantized(model, out, max_shard_size="20KB")
    return out


def _shard(out):
    return sorted(out.glob("model-*.safetensors"))[1]


def test_truncated_shard(saved):
    shard = _shard(saved)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*truncated"):
        qe.load_quantized(saved, Tiny())


def test_flipped_byte(saved):
    shard = _shard(saved)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*corrupted \(sha256 mismatch\)"):
        qe.load_quantized(saved, Tiny())
    # verify=False skips the hash (and here loads the corrupted value without complaint)
    qe.load_quantized(saved, Tiny(), verify=False)


def test_missing_shard(saved):
    shard = _shard(saved)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*missing"):
        qe.load_quantized(saved, Tiny())


def test_missing_config_is_incomplete(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete qalora_ext checkpoint"):
        qe.load_quantized(saved, Tiny())


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        qe.load_quantized(tmp_path / "nope", Tiny())


def _edit_qc(out, **changes):
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"].update(changes)
    path.write_text(json.dumps(cfg))


def test_wrong_quant_method(saved):
    _edit_qc(saved, quant_method="gptq")
    with pytest.raises(CheckpointError, match="'gptq'.*not 'qalora_ext'"):
        qe.load_quantized(saved, Tiny())


def test_future_format_version(saved):
    _edit_qc(saved, format_version=99)
    with pytest.raises(CheckpointError, match="format_version 99 is newer"):
        qe.load_quantized(saved, Tiny())


def test_unknown_packed_layout(saved):
    _edit_qc(saved, packed_layout=7)
    with pytest.raises(CheckpointError, match="packed_layout 7"):
        qe.load_quantized(saved, Tiny())


# ---------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_adapter_roundtrip(tmp_path, bits):
    fresh, model, ids, y = _make(bits, rank=4)
    out = tmp_path / "adapter"
    qe.save_adapter(model, out)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "QALORA_EXT" and cfg["pooling"] == "mean"
    assert (cfg["group_size"], cfg["rank"], cfg["r"], cfg["alpha"], cfg["lora_alpha"]) == (32, 4, 4, 16.0, 16.0)
    assert cfg["scaling"] == 4.0 and cfg["use_rslora"] is False
    assert cfg["target_modules"] == ["up", "mid", "down"]

    # onto the same base without adapters: wrapped in new QALoRALinear layers
    base = _quantize(copy.deepcopy(fresh), bits).eval()
    assert qe.load_adapter(base, out) is base
    assert isinstance(base.up, qe.QALoRALinear) and not base.up.training
    assert torch.equal(_out(base, ids), y)

    # onto the same base with other adapters of the same rank: overwritten in place
    same = qe.add_adapters(_quantize(copy.deepcopy(fresh), bits), rank=4).eval()
    _randomize_adapters(same)
    param = same.up.lora_A
    qe.load_adapter(same, out)
    assert same.up.lora_A is param
    assert torch.equal(_out(same, ids), y)

    # ... and of another rank: replaced
    other = qe.add_adapters(_quantize(copy.deepcopy(fresh), bits), rank=8, alpha=3).eval()
    qe.load_adapter(other, out)
    assert other.up.rank == 4 and other.up.scaling == 4.0
    assert torch.equal(_out(other, ids), y)


def test_adapter_group_size_mismatch(tmp_path):
    fresh, model, _, _ = _make(4)
    qe.save_adapter(model, tmp_path / "a")
    other = _quantize(copy.deepcopy(fresh), 4, group_size=64)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(CheckpointError, match="group_size=64.*group_size=32"):
        qe.load_adapter(other, tmp_path / "a")
    assert not any(isinstance(m, qe.QALoRALinear) for m in other.modules())  # left untouched
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_adapter_errors(tmp_path):
    fresh, model, _, _ = _make(4)
    out = tmp_path / "a"
    qe.save_adapter(model, out)
    with pytest.raises(CheckpointError, match="not a quantized layer"):
        qe.load_adapter(copy.deepcopy(fresh), out)
    partial = _quantize(copy.deepcopy(fresh), 4)
    del partial.mid
    with pytest.raises(CheckpointError, match="no layer 'mid'"):
        qe.load_adapter(partial, out)

    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key, value, msg in (("pooling", "sum", "pooling"), ("peft_type", "LORA", "PEFT LoRA"),
                            ("format_version", 99, "format_version 99")):
        cfg_path.write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(CheckpointError, match=msg):
            qe.load_adapter(_quantize(copy.deepcopy(fresh), 4), out)
    cfg_path.unlink()
    with pytest.raises(CheckpointError, match="not a complete qalora_ext adapter"):
        qe.load_adapter(_quantize(copy.deepcopy(fresh), 4), out)


def test_adapter_save_is_atomic(tmp_path, monkeypatch):
    _, model, _, _ = _make(4)
    out = tmp_path / "a"
    qe.save_adapter(model, out)
    before = (out / "adapter_model.safetensors").read_bytes()
    _randomize_adapters(model)
    _failing_save_file(monkeypatch, KeyboardInterrupt, after=0)
    with pytest.raises(KeyboardInterrupt):
        qe.save_adapter(model, out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert _leftovers(out) == []


def test_load_adapter_checks_every_layer_before_changing_any(tmp_path):
    """A bad dropout on the LAST layer must leave every layer as it was (the docstring's promise)."""
    import json

    torch.manual_seed(15)
    _, model, _, _ = _make(3, adapters=True, rank=4)
    qe.save_adapter(model, tmp_path / "ad")
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    last = cfg["target_modules"][-1]
    cfg["layers"][last]["dropout"] = 1.5
    cfg_path.write_text(json.dumps(cfg))
    _, target, _, _ = _make(3, adapters=False)
    before = {n: type(m) for n, m in target.named_modules()}
    with pytest.raises(CheckpointError, match=f"layer '{last}': dropout must be in"):
        qe.load_adapter(target, tmp_path / "ad", verify=False)
    assert {n: type(m) for n, m in target.named_modules()} == before


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resave_keeps_the_folders_mode_group_and_xattrs(tmp_path):
    """A re-save replaces the directory; it keeps 0700 (not the umask's 0755) and extended attributes."""
    import stat as st

    fresh, model, _, _ = _make(3, adapters=False)
    out = tmp_path / "ck"
    qe.save_quantized(model, out)
    os.chmod(out, 0o700)
    has_xattr = True
    try:
        os.setxattr(out, "user.qalora_test", b"keep me")
    except OSError:
        has_xattr = False  # the filesystem has no user xattrs
    gid = out.stat().st_gid
    qe.save_quantized(model, out)
    assert st.S_IMODE(out.stat().st_mode) == 0o700
    assert out.stat().st_gid == gid
    if has_xattr:
        assert os.getxattr(out, "user.qalora_test") == b"keep me"
    qe.load_quantized(out, model=fresh)


def test_next_save_removes_leftovers_of_killed_saves_only(tmp_path):
    """kill -9 mid-save leaves .NAME.tmp-PID-* / .NAME.old-PID-*; the next save removes those whose writer is gone."""
    _, model, _, _ = _make(3, adapters=False)
    out = tmp_path / "ck"
    qe.save_quantized(model, out)
    dead = _dead_pid()
    stale_tmp = tmp_path / f".ck.tmp-{dead}-0123abcd"
    stale_old = tmp_path / f".ck.old-{dead}-4567cdef"
    running = tmp_path / f".ck.tmp-{os.getpid()}-89abcdef"  # a save of this (live) process
    unrelated = tmp_path / ".other.tmp-1-00000000"
    for d in (stale_tmp, stale_old, running, unrelated):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    qe.save_quantized(model, out)
    assert not stale_tmp.exists() and not stale_old.exists()
    assert running.exists() and unrelated.exists()
    # A save killed between its two renames: the target is gone and the .old sibling is the
    # only copy of the previous checkpoint; it is kept (and named by the load error).
    only_copy = tmp_path / f".lost.old-{dead}-0badc0de"
    qe.save_quantized(model, only_copy)
    from qalora_ext.checkpoint.files import remove_stale_leftovers

    assert remove_stale_leftovers(tmp_path / "lost") == []
    assert only_copy.exists()
    with pytest.raises(FileNotFoundError, match="previous checkpoint was left at"):
        qe.load_quantized(tmp_path / "lost")


class _FakeTokenizer:
    """save_pretrained writes a file whose content says which version it is."""

    def __init__(self, version):
        self.version = version

    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text(json.dumps({"version": self.version}))
        (Path(path) / "tokenizer_config.json").write_text(json.dumps({"version": self.version}))


def test_save_model_writes_tokenizer_and_weights_together(tmp_path, monkeypatch):
    """A save killed after the tokenizer but before the weights must leave the OLD tokenizer beside the old weights."""
    from qalora_ext.checkpoint import files as ckpt_files_mod
    from qalora_ext.checkpoint.quantized import save_model

    fresh, model, ids, y = _make(3, adapters=False)
    out = tmp_path / "m"
    save_model(model, _FakeTokenizer("old"), out)
    assert json.loads((out / "tokenizer.json").read_text()) == {"version": "old"}

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while writing the weights")

    monkeypatch.setattr(ckpt_files_mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, _FakeTokenizer("new"), out)
    monkeypatch.undo()
    assert json.loads((out / "tokenizer.json").read_text()) == {"version": "old"}
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"version": "old"}
    assert _leftovers(out) == []
    save_model(model, _FakeTokenizer("new"), out)
    assert json.loads((out / "tokenizer.json").read_text()) == {"version": "new"}
    assert torch.equal(_out(qe.load_quantized(out, model=copy.deepcopy(fresh)), ids), y)


def test_edited_bits_in_config_is_refused(tmp_path):
    """bits are bound to the data: the weights file records each layer's bits, group size and layout."""
    fresh, model, _, _ = _make(3, adapters=False)
    out = tmp_path / "ck"
    qe.save_quantized(model, out)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    layer = next(iter(qc["modules"]))
    qc["modules"][layer]["bits"] = 4  # INT3 codes read as INT4 would be garbage
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"layer '{layer}' was written with bits=3.*config.json says bits=4"):
        qe.load_quantized(out, model=copy.deepcopy(fresh), verify=False)


def test_unreadable_files_are_named(tmp_path):
    fresh, model, _, _ = _make(3, adapters=False)
    out = tmp_path / "ck"
    qe.save_quantized(model, out)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\xff\xff\xff\xff"  # the JSON header now lies about itself
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        qe.load_quantized(out, model=copy.deepcopy(fresh), verify=False)
    (out / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    with pytest.raises(CheckpointError, match="config.json: config.json is not text"):
        qe.load_quantized(out, model=copy.deepcopy(fresh))


@pytest.mark.parametrize("edit", ["layout_float", "layout_module_float", "adapter_not_object", "packed_int64",
                                  "packed_float32"])
def test_malformed_checkpoints_fail_at_load_naming_the_problem(tmp_path, edit):
    """Each of these once loaded and failed only at the first forward (or with an AttributeError)."""
    from safetensors.torch import load_file, save_file

    fresh, model, _, _ = _make(3, adapters=True)
    out = tmp_path / "ck"
    qe.save_quantized(model, out)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    first = next(iter(qc["modules"]))
    if edit == "layout_float":
        qc["packed_layout"] = 1.0
        want = "packed_layout 1.0 is not known"
    elif edit == "layout_module_float":
        qc["modules"][first]["layout"] = 1.0
        want = "packed layout 1.0 is not known"
    elif edit == "adapter_not_object":
        qc["modules"][first]["adapter"] = "rank 4"
        want = "its adapter entry must be an object"
    else:
        tensors = load_file(str(out / "model.safetensors"))
        key = f"{first}.base.packed"
        tensors[key] = tensors[key].long() if edit == "packed_int64" else tensors[key].float()
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        from qalora_ext.checkpoint.files import hash_file

        qc["files"]["model.safetensors"] = hash_file(out / "model.safetensors")
        want = "packed must be int32"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=want):
        qe.load_quantized(out, model=copy.deepcopy(fresh), verify=False)


@pytest.mark.parametrize("bad", ["layers_list", "entry_string"])
def test_adapter_config_entries_of_the_wrong_kind_are_named(tmp_path, bad):
    _, model, _, _ = _make(3, adapters=True, rank=4)
    qe.save_adapter(model, tmp_path / "ad")
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if bad == "layers_list":
        cfg["layers"] = list(cfg["layers"])
        want = "'layers' must be an object"
    else:
        cfg["layers"][cfg["target_modules"][0]] = "rank 4"
        want = "its entry in 'layers' must be an object"
    cfg_path.write_text(json.dumps(cfg))
    _, target, _, _ = _make(3, adapters=False)
    with pytest.raises(CheckpointError, match=want):
        qe.load_adapter(target, tmp_path / "ad", verify=False)


def test_identical_saves_give_identical_bytes(tmp_path):
    """safetensors lists metadata keys in hash-map order; our header is sorted, so saves are reproducible."""
    _, model, _, _ = _make(3, adapters=True)
    digests = set()
    for i in range(8):
        out = tmp_path / f"c{i}"
        qe.save_quantized(model, out)
        digests.add(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
                    + hashlib.sha256((out / "config.json").read_bytes()).hexdigest())
    assert len(digests) == 1

"""Fine-tuning under bfloat16 autocast (issue 18 item 2), on a tiny quantized Llama (CPU).

bf16 and float32 runs on the same data and seed agree (final loss and merged perplexity within 2%); the packed
layers, attention and the head run in bfloat16 while the adapters, their gradients and the optimizer state stay
float32; the default precision of `qalora finetune` and the demo comes from one function
(`training.precision`), and `--autocast none` forces float32.
"""

from __future__ import annotations

import collections

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import qalora_ext
from qalora_ext import cli
from qalora_ext.training import finetune as train
from qalora_ext.training import precision
from qalora_ext.training.data import TokenDataset, perplexity
from qalora_ext.training.finetune import TRAINER_STATE_NAME, finetune

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 160
RANK = 5  # no other dimension of the tiny model is 5: a float32 matmul with a 5 in its shapes is an adapter's


def tiny_quantized(seed: int, bits: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # wider than the default init (std 0.02), so the model is far from the data
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    qalora_ext.quantize_model(model, bits=bits, group_size=32, progress=False)
    torch.manual_seed(seed + 1)
    qalora_ext.add_adapters(model, rank=RANK, alpha=2 * RANK)
    return model


def markov_tokens(seed: int, n: int, seq_len: int = 32, draw: int = 0) -> torch.Tensor:
    """Sequences of a noisy permutation chain (next = perm[current], 10% random): learnable in a few steps.

    ``seed`` fixes the permutation (the "language"), ``draw`` the sequences drawn from it.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(VOCAB, generator=g)
    g.manual_seed(seed * 7919 + draw + 1)
    ids = [torch.randint(0, VOCAB, (n,), generator=g)]
    for _ in range(seq_len - 1):
        noise = torch.rand(n, generator=g) < 0.1
        ids.append(torch.where(noise, torch.randint(0, VOCAB, (n,), generator=g), perm[ids[-1]]))
    return torch.stack(ids, 1)


def test_bf16_and_float32_fine_tunes_agree(fresh_seed, tmp_path):
    seed = fresh_seed % 100_000
    train_ids, heldout = markov_tokens(seed, 64), markov_tokens(seed, 16, draw=1)
    runs = {}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        model = tiny_quantized(seed)
        before = perplexity(model, heldout, progress=False)
        grad_dtypes = set()
        hooks = [p.register_hook(lambda g: grad_dtypes.add(g.dtype)) for p in model.parameters() if p.requires_grad]
        result = finetune(model, TokenDataset({"input_ids": train_ids}), steps=40, batch_size=8, lr=3e-2, seed=seed,
                          autocast=amp, output_dir=tmp_path / name, loss_plot=False, progress=False)
        for h in hooks:
            h.remove()
        assert grad_dtypes == {torch.float32}, (name, grad_dtypes)
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert len(trained) == 2 * 14 and all(p.dtype == torch.float32 for _, p in trained), name
        state = torch.load(result.checkpoint / TRAINER_STATE_NAME, weights_only=True)["optimizer"]["state"]
        assert len(state) == len(trained)
        for s in state.values():
            assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32, name
        report = qalora_ext.merge_adapters(model)
        assert max(report.values()) < 1e-3
        runs[name] = (result.losses, before, perplexity(model, heldout, progress=False))

    (loss32, before32, ppl32), (loss16, before16, ppl16) = runs["fp32"], runs["bf16"]
    assert before16 == before32  # the same model before training
    # Training changed a lot, so agreeing within 2% says something ...
    assert loss32[-1] < 0.75 * loss32[0], loss32
    assert ppl32 < 0.5 * before32, (before32, ppl32)
    # ... and bf16 really ran (not bit for bit the float32 run), yet lands in the same place.
    assert loss16 != loss32
    assert loss16[-1] == pytest.approx(loss32[-1], rel=0.02), (loss32[-1], loss16[-1])
    assert ppl16 == pytest.approx(ppl32, rel=0.02), (ppl32, ppl16)


class _OpDtypes(TorchDispatchMode):
    """Every op's name with the shapes and dtypes of its tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        self.calls.append((func.name(), [t.dtype for t in tensors], [tuple(t.shape) for t in tensors]))
        return func(*args, **(kwargs or {}))

    def named(self, *fragments: str):
        return [c for c in self.calls if any(f in c[0] for f in fragments)]


@pytest.mark.parametrize("attn, checkpointing", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_bf16_autocast_runs_packed_layers_attention_and_head_in_bf16(fresh_seed, attn, checkpointing):
    """Under the trainer's autocast nothing that should be bf16 silently runs float32: the packed layers (forward
    and grad_input), attention (forward and backward) and the tied head take bf16, also in the forward that
    activation checkpointing recomputes; the only float32 matmuls are the adapters' own (shapes with the rank)."""
    model = tiny_quantized(fresh_seed)
    model.config._attn_implementation = attn
    data = TokenDataset({"input_ids": markov_tokens(fresh_seed % 1000, 4)})
    with _OpDtypes() as ops:
        finetune(model, data, steps=1, batch_size=4, autocast=torch.bfloat16, gradient_checkpointing=checkpointing,
                 progress=False)
    forwards = [c for c in ops.calls if c[0] == "qalora::qlinear"]
    assert len(forwards) == (2 if checkpointing else 1) * 14  # checkpointing runs the blocks' forward twice

    packed = ops.named("qalora::qlinear")
    assert {n for n, _, _ in packed} == {"qalora::qlinear", "qalora::qlinear_grad_input"}
    assert all(d[0] == torch.bfloat16 for _, d, _ in packed), packed[:3]

    matmuls = ops.named("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
    head = [c for c in matmuls if (VOCAB, 128) in c[2] or (128, VOCAB) in c[2]]
    assert head and all(set(d) == {torch.bfloat16} for _, d, _ in head), head  # forward logits and their grad_x
    for name, dtypes, shapes in matmuls:
        if torch.float32 in dtypes:
            assert any(RANK in s for s in shapes), (name, dtypes, shapes)

    if attn == "sdpa":
        attention = ops.named("scaled_dot_product")
        assert len(attention) == (3 if checkpointing else 2) * 2  # forward (again) and backward of each layer
    else:
        attention = [c for c in matmuls if len(c[2][0]) == 3 and RANK not in c[2][0]]  # q k^T and p v, batched
        assert len(attention) >= 2 * 2
    for name, dtypes, _ in attention:
        assert all(d == torch.bfloat16 for d in dtypes[:3]), (name, dtypes)


def test_cpu_has_bf16_reads_torch_then_proc_cpuinfo(monkeypatch):
    no_bf16 = {"avx512_bf16": False, "amx_bf16": False, "avx512_f": True}
    cases = [
        ({**no_bf16, "avx512_bf16": True}, {"avx2"}, True),
        ({**no_bf16, "amx_bf16": True}, None, True),
        (no_bf16, {"avx512_bf16"}, False),  # torch's answer wins when it has both keys
        (None, {"avx512f", "amx_bf16"}, True),
        ({"avx2": True}, {"avx512_bf16"}, True),  # a torch without the keys: /proc/cpuinfo decides
        (None, {"avx512f", "avx512_vnni"}, False),
        (None, None, False),
    ]
    for features, flags, want in cases:
        monkeypatch.setattr(precision, "_torch_cpu_features", lambda f=features: f)
        monkeypatch.setattr(precision, "_proc_cpuinfo_flags", lambda f=flags: f)
        assert precision.cpu_has_bf16() is want, (features, flags)


def test_cpu_has_bf16_agrees_with_proc_cpuinfo_here():
    flags = precision._proc_cpuinfo_flags()
    if flags is None or precision._torch_cpu_features() is None:
        pytest.skip("needs both torch's cpuinfo and /proc/cpuinfo")
    assert precision.cpu_has_bf16() == any(f in flags for f in precision.BF16_CPU_FLAGS)


def test_resolve_autocast(monkeypatch):
    for has in (True, False):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda h=has: h)
        assert precision.resolve_autocast("auto", "cpu") == (torch.bfloat16 if has else None)
        assert precision.resolve_autocast("auto", torch.device("cuda", 1)) == torch.bfloat16
        assert precision.resolve_autocast("none", "cpu") is None
        assert precision.resolve_autocast(None, "cpu") is None
        assert precision.resolve_autocast("bf16", "cpu") == torch.bfloat16
        assert precision.resolve_autocast(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="loss scaling"):
        precision.resolve_autocast(torch.float16, "cpu")
    with pytest.raises(ValueError, match=r"one of auto, none, bf16 .*got 'float32'"):
        precision.resolve_autocast("float32", "cpu")


class _Stop(Exception):
    """The stand-in finetune raises it once it has its arguments (not an OSError or ValueError: cli.main re-raises)."""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_llm import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


@pytest.mark.parametrize("has_bf16", [True, False])
def test_cli_finetune_autocast_default_and_none(tiny_dir, text_file, tmp_path, monkeypatch, has_bf16):
    seen = []

    def fake_finetune(model, dataset, **kw):
        seen.append(kw["autocast"])
        raise _Stop

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    monkeypatch.setattr(train, "finetune", fake_finetune)
    base = ["finetune", "--model", str(tiny_dir), "--bits", "4", "--data", str(text_file), "--seq-len", "32",
            "--steps", "1", "--out", str(tmp_path / "o")]
    for extra in ([], ["--autocast", "auto"], ["--autocast", "none"], ["--autocast", "bf16"]):
        with pytest.raises(_Stop):
            cli.main(base + extra)
    default = torch.bfloat16 if has_bf16 else None
    assert seen == [default, default, None, torch.bfloat16]


def test_demo_autocast_default_and_none(monkeypatch):
    from qalora_ext.cli import demo as cli_demo

    got = []
    monkeypatch.setattr(cli_demo, "run_demo", lambda *a, **kw: got.append(kw["autocast"]) or 0)
    assert cli.main(["demo"]) == 0 and cli.main(["demo", "--autocast", "none"]) == 0
    assert got == ["auto", "none"]

    from qalora_ext.demo import run_demo

    with pytest.raises(ValueError, match="autocast must be one of"):
        run_demo("/nonexistent", autocast="fp8")


def test_demo_fine_tunes_under_the_default_autocast(tiny_dir, tmp_path, monkeypatch):
    seen = []
    real = train.finetune

    def recording_finetune(model, dataset, **kw):
        seen.append(kw["autocast"])
        return real(model, dataset, **kw)

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(train, "finetune", recording_finetune)
    from qalora_ext.demo import run_demo

    result = run_demo(tiny_dir, bits=4, steps=1, batch_size=2, seq_len=32, rank=4, windows=1, window=32,
                      prompt="hi", out=tmp_path / "demo")
    assert seen == [torch.bfloat16]
    assert any("bf16 autocast" in phase for phase in result.phases.times)

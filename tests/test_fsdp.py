"""FSDP2 sharding of packed models (qalora_ext.training.fsdp): CPU, gloo.

The two-rank test runs ``qalora finetune --fsdp`` under torchrun three times
(uninterrupted; killed after step 2; resumed) on a tiny quantized Llama and
compares with one process on the same global batch. The in-process tests use
a one-rank gloo group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import qalora_ext
from qalora_ext import loading
from qalora_ext.checkpoint import load_adapter
from qalora_ext.checkpoint.quantized import save_model
from qalora_ext.training import data
from qalora_ext.training import fsdp as qfsdp
from qalora_ext.training.finetune import finetune

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tiny_llm import save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BATCH, RANK, ALPHA, LR, SEQ = 3, 2, 4, 8, 1e-3, 32


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, expect_ok=True, timeout=150):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "python")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), str(ROOT / "tests" / "fsdp_worker.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n" + output[-6000:])
    if expect_ok:
        assert proc.returncode == 0, output[-6000:]
    else:
        assert proc.returncode != 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory):
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("fsdp")
    save_tiny_llama(root / "float")
    lm, tok, _ = loading.load_model(root / "float")
    qalora_ext.quantize_model(lm, bits=4, group_size=32, progress=False)
    save_model(lm, tok, root / "q")
    (root / "data.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]))
    return root


def _memory_plan():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fsdp_memory_plan", ROOT / "bench" / "fsdp_memory_plan.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fsdp_memory_plan", mod)  # dataclasses look their module up
    spec.loader.exec_module(sys.modules["fsdp_memory_plan"])
    return sys.modules["fsdp_memory_plan"]


def _tiny_config(folder):
    cfg = json.loads((folder / "config.json").read_text())
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
    return {k: cfg[k] for k in keys}


def test_memory_plan_script_prints_every_model_and_rank_count(capsys):
    plan = _memory_plan()
    assert plan.main(["--models", "Llama-2 7B", "--seq-len", "512"]) == 0
    out = capsys.readouterr().out
    assert out.count("Llama-2 7B") == 4
    (one, two, four, eight) = plan.plan_model("Llama-2 7B", plan.CONFIGS["Llama-2 7B"], seq_len=512)
    # INT4 G32, float16 scales, float32 zeros: 4 + 16/32 + 32/32 = 5.5 bits per packed weight.
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert one.packed_rank_bytes == linear * 5.5 / 8
    assert two.packed_rank_bytes == one.packed_rank_bytes / 2 and eight.packed_rank_bytes == one.packed_rank_bytes / 8
    assert one.total > two.total > four.total > eight.total
    assert eight.qlora_nf4_total < eight.lora_bf16_total


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(got: dict, want: dict) -> float:
    assert set(got) == set(want)
    num = sum((got[k].double() - want[k].double()).pow(2).sum().item() for k in want)
    den = sum(want[k].double().pow(2).sum().item() for k in want)
    return (num / den) ** 0.5


def test_two_ranks_equal_one_process_shard_memory_and_resume_after_kill(quantized_folder, tmp_path):
    root = quantized_folder
    common = ["--model", root / "q", "--fsdp", "--data", root / "data.txt", "--seq-len", SEQ, "--max-examples", 16,
              "--steps", STEPS, "--batch-size", BATCH, "--grad-accum", 2, "--save-every", 1, "--rank", RANK,
              "--alpha", ALPHA,
              "--lr", LR, "--gradient-checkpointing",
              "--autocast", "none"]  # float32 (the default is bf16 on CPUs with bf16 units), as the one process below
    output = _torchrun([0, *common, "--out", tmp_path / "full"])

    # Each rank holds half of the packed bytes (rows split between the 2 ranks).
    # (Both ranks print to one pipe, so their lines may interleave: match anywhere.)
    held = {int(r): (int(h), int(t)) for r, h, t in
            re.findall(r"FSDP2 rank (\d+): holds (\d+) of the model's (\d+) packed bytes", output)}
    assert sorted(held) == [0, 1], output[-3000:]
    for h, t in held.values():
        assert h <= 0.55 * t, held
    # ... exactly what bench/fsdp_memory_plan.py plans for this model at 2 ranks.
    plan = _memory_plan().plan_model("tiny", _tiny_config(root / "q"), ranks=(2,))[0]
    assert all(h == plan.packed_rank_bytes for h, _ in held.values()), (plan, held)

    # One process, the same global batch and the same adapter init: the same adapters.
    lm, tok, _ = loading.load_model(root / "q")
    torch.manual_seed(0)
    qalora_ext.add_adapters(lm, rank=RANK, alpha=ALPHA, dropout=0.0)
    ds = data.load_training_data(str(root / "data.txt"), tok, SEQ, max_examples=16)
    single = finetune(lm, ds, steps=STEPS, batch_size=2 * BATCH, grad_accum=2, lr=LR, progress=False)
    want = _adapters(lm)
    # (lr 1e-3: Adam moves a coordinate whose gradient is a near-cancelled sum by a share of lr on summation-order
    # noise alone; at 1e-2 that reached 1.2e-5 of the adapters' norm on some random bases.)
    full_state = json.loads((tmp_path / "full" / "checkpoint-000003" / "trainer_state.json").read_text())
    assert single.losses == pytest.approx(full_state["losses"], rel=1e-5)

    # The adapter written at the end (and every checkpoint) loads in one process with load_adapter.
    for folder in (tmp_path / "full", tmp_path / "full" / "checkpoint-000003"):
        other, _, _ = loading.load_model(root / "q")
        load_adapter(other, folder)
        rel = _rel(_adapters(other), want)
        print(f"FSDP2 vs one process: relative difference of the adapters {rel:.2e}")
        assert rel <= 1e-5

    # Killed right after the step-2 checkpoint, then resumed: exactly the uninterrupted run.
    _torchrun([2, *common, "--out", tmp_path / "split"], expect_ok=False)
    assert (tmp_path / "split" / "checkpoint-000002").is_dir()
    assert not (tmp_path / "split" / "checkpoint-000003").exists()
    _torchrun([0, *common, "--out", tmp_path / "split", "--resume"])
    split_state = json.loads((tmp_path / "split" / "checkpoint-000003" / "trainer_state.json").read_text())
    assert split_state["losses"] == full_state["losses"]
    for name in ("adapter_model.safetensors",):
        assert (tmp_path / "split" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


def test_two_ranks_train_scales_and_zeros_alone(quantized_folder, tmp_path):
    """`qalora finetune --fsdp --rank 0 --train-scales --train-zeros` on two ranks: dscale / dzero sharded by
    rows, gathered whole into the adapter written at the end, equal to one process on the same global batch."""
    root = quantized_folder
    _torchrun([0, "--model", root / "q", "--fsdp", "--data", root / "data.txt", "--seq-len", SEQ, "--max-examples",
               8, "--steps", 2, "--batch-size", BATCH, "--rank", 0, "--train-scales", "--train-zeros", "--lr", LR,
               "--quant-lr", 1e-3, "--autocast", "none", "--out", tmp_path / "run"])
    lm, tok, _ = loading.load_model(root / "q")
    qalora_ext.add_adapters(lm, rank=0, train_scale=True, train_zero=True)
    ds = data.load_training_data(str(root / "data.txt"), tok, SEQ, max_examples=8)
    finetune(lm, ds, steps=2, batch_size=2 * BATCH, lr=LR, quant_lr=1e-3, progress=False)
    want = _adapters(lm)
    assert want and all(k.endswith((".dscale", ".dzero")) for k in want)
    other, _, _ = loading.load_model(root / "q")
    load_adapter(other, tmp_path / "run")
    assert _rel(_adapters(other), want) <= 1e-5


@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _tiny(seed):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config)
    qalora_ext.quantize_model(model, bits=4, group_size=32, progress=False)
    qalora_ext.add_adapters(model, rank=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    return model


def test_unsharded_model_keeps_buffers_and_mp_policy_refused():
    model = _tiny(0)
    names = [n for n, _ in model.named_parameters()]
    assert all(not n.endswith((".packed", ".scale", ".zero")) for n in names)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    with pytest.raises(ValueError, match="param_dtype"):
        qfsdp.shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    assert [n for n, _ in model.named_parameters()] == names  # refused before anything changed
    assert not qfsdp.is_sharded(model)


def test_sharded_model_forward_refusals_and_bf16_checkpointed_training(one_rank_group, tmp_path):
    ref, model = _tiny(1), _tiny(1)
    ids = torch.randint(0, 256, (2, 16))
    want = ref(input_ids=ids).logits
    qfsdp.shard_model(model)
    assert qfsdp.is_sharded(model)
    packed = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.base.packed"]
    assert packed.dtype == torch.int32 and not packed.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in ref.named_parameters() if p.requires_grad}
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
    held, total = qfsdp.resident_packed_bytes(model)
    assert held == total > 0  # one rank holds everything

    # A dtype cast would reinterpret packed words / re-round scales: refused before any tensor changes.
    before = {n: p.dtype for n, p in model.named_parameters()}
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float(),
                 lambda m: m.model.layers[0].half()):
        with pytest.raises(TypeError, match="refused"):
            cast(model)
    assert {n: p.dtype for n, p in model.named_parameters()} == before
    layer = model.get_submodule("model.layers.0.self_attn.q_proj.base")
    assert layer.scale.dtype == torch.float16 and layer.zero.dtype == torch.float32

    # bf16 autocast + gradient checkpointing under FSDP2 train as the unsharded model does.
    ds = data.TokenDataset({"input_ids": torch.randint(0, 256, (8, 16))})
    kw = dict(steps=2, batch_size=4, lr=1e-2, autocast=torch.bfloat16, gradient_checkpointing=True, progress=False)
    r_ref = finetune(ref, ds, **kw)
    r_sh = finetune(model, ds, fsdp=True, output_dir=tmp_path / "run", **kw)
    assert r_sh.losses == pytest.approx(r_ref.losses, rel=1e-5)
    other = _tiny(1)
    load_adapter(other, r_sh.checkpoint)
    assert _rel(_adapters(other), _adapters(ref)) <= 1e-5


@pytest.mark.parametrize("rank", [4, 0])
def test_sharded_training_of_scales_and_zeros(one_rank_group, tmp_path, rank):
    """dscale / dzero (rank 0: alone) train under FSDP2 as unsharded, and its checkpoints hold them whole."""
    import transformers

    def tiny(seed):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128)
        model = transformers.LlamaForCausalLM(config)
        qalora_ext.quantize_model(model, bits=3, group_size=32, progress=False)
        return qalora_ext.add_adapters(model, rank=rank, alpha=8, train_scale=True, train_zero=True)

    ref, model = tiny(3), tiny(3)
    qfsdp.shard_model(model)
    ds = data.TokenDataset({"input_ids": torch.randint(0, 256, (8, 16))})
    kw = dict(steps=2, batch_size=4, lr=1e-2, quant_lr=1e-3, progress=False)
    r_ref = finetune(ref, ds, **kw)
    r_sh = finetune(model, ds, fsdp=True, output_dir=tmp_path / "run", **kw)
    assert r_sh.losses == pytest.approx(r_ref.losses, rel=1e-5)
    other = tiny(4)
    load_adapter(other, r_sh.checkpoint)
    want = _adapters(ref)
    assert any(k.endswith(".dscale") for k in want) and any(k.endswith(".dzero") for k in want)
    assert all(want[k].abs().sum() > 0 for k in want if k.endswith((".dscale", ".dzero")))
    assert _rel(_adapters(other), want) <= 1e-5


def test_mixed_precision_applied_outside_is_caught_in_forward(one_rank_group):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = _tiny(2)
    layer = model.model.layers[0].self_attn.q_proj.base
    qfsdp._to_frozen_parameters(layer)
    fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="MixedPrecisionPolicy"):
        model(input_ids=torch.randint(0, 256, (1, 8)))


def test_cli_fsdp_refuses_a_float_model(quantized_folder, tmp_path, capsys):
    from qalora_ext.cli import main

    root = quantized_folder
    assert main(["finetune", "--fsdp", "--model", str(root / "float"), "--out", str(tmp_path / "o"),
                 "--steps", "1"]) == 2
    assert "quantize it first" in capsys.readouterr().err


def test_sharded_load_matches_load_quantized_with_saved_adapters(quantized_folder, one_rank_group, tmp_path):
    """load_quantized_sharded (meta build, rows read per rank) gives load_quantized's model: a folder saved with
    trained adapters (tied embeddings) loads them; a folder without gets the seeded init of add_adapters."""
    root = quantized_folder
    lm, tok, _ = loading.load_model(root / "q")
    torch.manual_seed(3)
    qalora_ext.add_adapters(lm, rank=RANK, alpha=ALPHA)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    save_model(lm, tok, tmp_path / "with_adapters")
    ids = torch.randint(0, 300, (2, 12))

    ref = qalora_ext.load_quantized(tmp_path / "with_adapters")
    sharded = qfsdp.load_quantized_sharded(tmp_path / "with_adapters")
    assert qfsdp.is_sharded(sharded)
    with qfsdp.full_adapters(sharded):
        assert _rel(_adapters(sharded), _adapters(ref)) == 0
    torch.testing.assert_close(sharded.eval()(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)

    fresh = qfsdp.load_quantized_sharded(root / "q", rank=RANK, alpha=ALPHA, seed=5)
    plain = qalora_ext.load_quantized(root / "q")
    torch.manual_seed(5)
    qalora_ext.add_adapters(plain, rank=RANK, alpha=ALPHA)
    with qfsdp.full_adapters(fresh):
        assert _rel(_adapters(fresh), _adapters(plain)) == 0

"""qalora_ext.training.finetune on a tiny random quantized Llama (CPU)."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import qalora_ext
from qalora_ext.training import finetune as train
from qalora_ext.training.data import IGNORE_INDEX, TokenDataset
from qalora_ext.training.finetune import TrainResult, finetune, latest_checkpoint, token_nll_sum

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")

def tiny_model(seed, dropout=0.0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config)
    qalora_ext.quantize_model(model, bits=4, group_size=32, progress=False)
    qalora_ext.add_adapters(model, rank=4, alpha=8, dropout=dropout)
    return model


def random_dataset(n, seq_len=16):
    return TokenDataset({"input_ids": torch.randint(0, 256, (n, seq_len))})


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def randomize_lora_B(model):
    # A fresh adapter has B = 0, so A gets no gradient on the first step.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)


def quiet(**kw):
    return dict(progress=False, **kw)


def test_loss_decreases(fresh_seed):
    model = tiny_model(fresh_seed)
    result = finetune(model, random_dataset(4, 32), steps=30, batch_size=4, lr=3e-2, **quiet())
    assert isinstance(result, TrainResult)
    assert result.steps_done == 30 and len(result.losses) == 30
    assert result.tokens_per_second > 0 and result.elapsed > 0
    assert result.output_dir is None and result.plot_path is None and result.checkpoint is None
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.2, result.losses


def test_bf16_autocast_trains_float32_adapters(fresh_seed):
    """autocast=bfloat16: the packed layers see bfloat16 activations, the adapters stay float32 with float32
    gradients, and the loss still falls."""
    model = tiny_model(fresh_seed)
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, qalora_ext.QALoRALinear))
    hook = layer.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
    result = finetune(model, random_dataset(4, 32), steps=30, batch_size=4, lr=3e-2, autocast=torch.bfloat16,
                      **quiet())
    hook.remove()
    assert seen and all(o == torch.bfloat16 for _, o in seen), seen[:3]
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.2, result.losses
    with pytest.raises(ValueError, match="loss scaling"):
        finetune(model, random_dataset(4), steps=1, autocast=torch.float16, **quiet())


def test_only_adapters_change(fresh_seed):
    model = tiny_model(fresh_seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, random_dataset(8), steps=3, batch_size=2, lr=1e-2, **quiet())
    after = model.state_dict()
    assert set(after) == set(before)
    lora = [k for k in before if k.endswith(("lora_A", "lora_B"))]
    assert len(lora) == 2 * 14
    for k in before:
        if k in lora:
            assert not torch.equal(after[k], before[k]), f"{k} did not train"
        else:
            assert torch.equal(after[k], before[k]), f"{k} changed"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora)


def test_first_loss_is_mean_over_labelled_tokens(fresh_seed):
    model = tiny_model(fresh_seed)
    randomize_lora_B(model)
    n, seq_len = 4, 12
    ids = torch.randint(0, 256, (n, seq_len))
    labels = ids.clone()
    labels[torch.rand(n, seq_len) < 0.4] = IGNORE_INDEX
    labels[:, -1] = ids[:, -1]
    mask = torch.ones(n, seq_len, dtype=torch.long)
    mask[0, -3:] = 0
    labels[0, -3:] = IGNORE_INDEX
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].clamp(min=0)).squeeze(-1)
    keep = labels[:, 1:] != IGNORE_INDEX
    ref = (-logp[keep]).mean().item()
    ds = TokenDataset({"input_ids": ids, "labels": labels, "attention_mask": mask})
    result = finetune(model, ds, steps=1, batch_size=n, lr=1e-3, **quiet())
    assert result.losses[0] == pytest.approx(ref, rel=1e-5)
    nll, count = token_nll_sum(logits.float(), labels)
    assert count == int(keep.sum()) and nll.item() / count == pytest.approx(ref, rel=1e-5)


def test_resume_is_bitwise_identical(tmp_path, fresh_seed):
    # Dropout, warmup, gradient accumulation and a dataset that is not a
    # multiple of the batch: RNG, scheduler, optimizer and data position
    # must all come back exactly.
    ds = random_dataset(7)
    kw = dict(batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=2, save_every=3, seed=fresh_seed % 1000, **quiet())

    model = tiny_model(fresh_seed, dropout=0.1)
    torch.manual_seed(1)
    full = finetune(model, ds, steps=6, output_dir=tmp_path / "full", **kw)
    want = adapters(model)

    model = tiny_model(fresh_seed, dropout=0.1)
    torch.manual_seed(1)
    first = finetune(model, ds, steps=3, output_dir=tmp_path / "split", **kw)
    assert first.steps_done == 3 and first.checkpoint.name == "checkpoint-000003"
    resumed_model = tiny_model(fresh_seed, dropout=0.1)
    torch.manual_seed(2)  # the resumed run must not depend on the caller's RNG
    second = finetune(resumed_model, ds, steps=6, output_dir=tmp_path / "split", resume=True, **kw)

    assert second.resumed_from == tmp_path / "split" / "checkpoint-000003"
    assert second.steps_done == 6
    assert second.losses == full.losses
    got = adapters(resumed_model)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert any(not torch.equal(want[k], v) for k, v in adapters(tiny_model(fresh_seed, dropout=0.1)).items())


def test_checkpoints_atomic_pruned_and_loadable(tmp_path, fresh_seed):
    model = tiny_model(fresh_seed)
    out = tmp_path / "run"
    result = finetune(model, random_dataset(6), steps=4, batch_size=2, lr=1e-2, output_dir=out, save_every=1,
                      **quiet())
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint-000003", "checkpoint-000004", "loss.png"]
    assert result.checkpoint == out / "checkpoint-000004" == latest_checkpoint(out)
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["losses"] == result.losses
    assert state["settings"]["global_batch_size"] == 2
    fresh = tiny_model(fresh_seed + 1)
    qalora_ext.load_adapter(fresh, result.checkpoint)
    for k, v in adapters(model).items():
        assert torch.equal(adapters(fresh)[k], v)
    png = result.plot_path
    assert png == out / "loss.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_save_leaves_previous_checkpoints(tmp_path, fresh_seed, monkeypatch):
    model = tiny_model(fresh_seed)
    out = tmp_path / "run"
    ds = random_dataset(6)
    finetune(model, ds, steps=2, batch_size=2, lr=1e-2, output_dir=out, save_every=2, loss_plot=False, **quiet())
    real_save = train.save_adapter

    def failing_save(m, directory):
        real_save(m, directory)
        raise OSError("disk full")

    monkeypatch.setattr(train, "save_adapter", failing_save)
    with pytest.raises(OSError, match="disk full"):
        finetune(model, ds, steps=4, batch_size=2, lr=1e-2, output_dir=out, save_every=2, resume=True, **quiet())
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000002"]

    # A run killed mid-save leaves a partial directory; the next run clears it.
    (out / ".checkpoint-000004.partial-xyz").mkdir()
    monkeypatch.setattr(train, "save_adapter", real_save)
    result = finetune(model, ds, steps=4, batch_size=2, lr=1e-2, output_dir=out, save_every=2, resume=True,
                      loss_plot=False, **quiet())
    assert result.steps_done == 4 and len(result.losses) == 4
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000002", "checkpoint-000004"]


def test_resume_without_checkpoint_warns_and_starts(tmp_path, fresh_seed):
    model = tiny_model(fresh_seed)
    with pytest.warns(UserWarning, match="no complete checkpoint; starting from step 0"):
        result = finetune(model, random_dataset(4), steps=2, batch_size=2, output_dir=tmp_path, resume=True,
                          loss_plot=False, **quiet())
    assert result.resumed_from is None and result.steps_done == 2


def test_resume_and_output_dir_guards(tmp_path, fresh_seed):
    model = tiny_model(fresh_seed)
    ds = random_dataset(4)
    finetune(model, ds, steps=2, batch_size=2, lr=1e-2, output_dir=tmp_path, loss_plot=False, **quiet())
    with pytest.raises(ValueError, match="already holds checkpoints.*resume=True"):
        finetune(model, ds, steps=4, batch_size=2, lr=1e-2, output_dir=tmp_path, **quiet())
    with pytest.raises(ValueError, match=r"other training settings \(lr: checkpoint 0.01, now 0.02\)"):
        finetune(model, ds, steps=4, batch_size=2, lr=2e-2, output_dir=tmp_path, resume=True, **quiet())
    with pytest.raises(ValueError, match="at step 2, beyond steps=1"):
        finetune(model, ds, steps=1, batch_size=2, lr=1e-2, output_dir=tmp_path, resume=True, **quiet())


def test_gradient_checkpointing_same_training(fresh_seed):
    ds = random_dataset(4)
    results, trained = [], []
    for gc in (False, True):
        model = tiny_model(fresh_seed)
        randomize_lora_B(model)
        start = adapters(model)
        model.config.use_cache = True
        results.append(finetune(model, ds, steps=2, batch_size=4, lr=1e-2, gradient_checkpointing=gc, **quiet()))
        assert not model.is_activation_checkpointing and model.config.use_cache is True
        assert not hasattr(model, "_require_grads_hook")
        trained.append(adapters(model))
        for k, v in start.items():
            assert not torch.equal(trained[-1][k], v), f"{k} got no gradient (gradient_checkpointing={gc})"
    assert results[1].losses == pytest.approx(results[0].losses, rel=1e-6)
    for k in trained[0]:
        torch.testing.assert_close(trained[1][k], trained[0][k], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_grads_flow(fresh_seed):
    grads = []
    ids = torch.randint(0, 256, (2, 16))
    for gc in (False, True):
        model = tiny_model(fresh_seed)
        randomize_lora_B(model)
        model.train()
        if gc:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        nll, count = token_nll_sum(model(input_ids=ids, use_cache=False).logits, ids)
        (nll / count).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for k, g in grads[0].items():
        assert grads[1][k].abs().sum() > 0, k
        torch.testing.assert_close(grads[1][k], g, rtol=1e-5, atol=1e-8)


def test_argument_errors(fresh_seed, tmp_path):
    model = tiny_model(fresh_seed)
    with pytest.raises(ValueError, match="dataset is empty"):
        finetune(model, TokenDataset({"input_ids": torch.zeros(0, 8, dtype=torch.long)}), steps=1, **quiet())
    ds = random_dataset(2)
    with pytest.raises(ValueError, match="steps must be an integer >= 1; got 0"):
        finetune(model, ds, steps=0, **quiet())
    with pytest.raises(ValueError, match="lr must be"):
        finetune(model, ds, steps=1, lr=float("nan"), **quiet())
    with pytest.raises(ValueError, match="need an output_dir"):
        finetune(model, ds, steps=1, save_every=2, **quiet())
    with pytest.raises(ValueError, match="items must be dicts with 'input_ids'"):
        finetune(model, [torch.zeros(4, dtype=torch.long)], steps=1, **quiet())
    masked = TokenDataset({"input_ids": torch.randint(0, 256, (2, 8)),
                           "labels": torch.full((2, 8), IGNORE_INDEX, dtype=torch.long)})
    with pytest.raises(ValueError, match="no token to predict"):
        finetune(model, masked, steps=1, **quiet())
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="add_adapters"):
        finetune(model, ds, steps=1, **quiet())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_two_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "python")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)]
    # A session of its own, so a timeout can stop torchrun and its workers together.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("torchrun did not finish in 120 s:\n" + output[-6000:])
    assert proc.returncode == 0, output[-6000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    init0, init1 = (torch.load(tmp_path / f"init{r}.pt") for r in (0, 1))
    assert r0["steps_done"] == r1["steps_done"] == 3
    assert r0["losses"] == r1["losses"]
    for k in r0["adapters"]:
        assert torch.equal(r0["adapters"][k], r1["adapters"][k]), k
        assert not torch.equal(r0["adapters"][k], init0[k]), k
    assert any(not torch.equal(init0[k], init1[k]) for k in init0)
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-000002", "checkpoint-000003", "loss.png"]

    # Two ranks of batch 2 are one process of batch 4 (up to summation order).
    spec = importlib.util.spec_from_file_location("ddp_worker", ROOT / "tests" / "ddp_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    model = worker.build_model(seed=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single = finetune(model, worker.build_dataset(), steps=worker.STEPS, batch_size=2 * worker.BATCH_SIZE,
                          grad_accum=worker.GRAD_ACCUM, lr=worker.LR, progress=False)
    assert single.losses == pytest.approx(r0["losses"], rel=1e-5)
    for k, v in adapters(model).items():
        # Adam divides by sqrt(v): a coordinate with a near-zero gradient moves
        # by up to lr on rounding noise alone, so compare to a small share of lr.
        torch.testing.assert_close(v, r0["adapters"][k], rtol=1e-4, atol=1e-2 * worker.LR)

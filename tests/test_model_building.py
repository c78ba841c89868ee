"""Building a transformers model from a checkpoint's config (loading.transformers_model)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import qalora_ext  # noqa: E402
from qalora_ext.checkpoint import CheckpointError  # noqa: E402
from qalora_ext.loading import build_transformers_model  # noqa: E402

from tiny_llm import make_tiny_llama  # noqa: E402


@pytest.fixture
def quantized_folder(tmp_path):
    torch.manual_seed(20)
    model = make_tiny_llama(vocab_size=320)
    qalora_ext.quantize_model(model, bits=3, group_size=32, progress=False)
    return qalora_ext.save_quantized(model, tmp_path / "q"), model


def _config(folder):
    return json.loads((folder / "config.json").read_text())


def test_meta_build_rebuilds_rotary_buffers_and_loads_exactly(quantized_folder):
    folder, model = quantized_folder
    built = build_transformers_model(_config(folder), folder)
    assert all(p.is_meta for p in built.parameters())
    ref = dict(model.named_buffers())
    for name, buf in built.named_buffers():
        if name.endswith("inv_freq"):
            assert not buf.is_meta and torch.equal(buf, ref[name])
    loaded = qalora_ext.load_quantized(folder)
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)


def test_meta_build_touches_no_global_state(quantized_folder):
    """Another thread building modules meanwhile gets real parameters (the old builder patched nn.Module)."""
    folder, _ = quantized_folder
    stop = threading.Event()
    seen_meta = []

    def build_linears():
        while not stop.is_set():
            seen_meta.append(nn.Linear(8, 8).weight.is_meta)

    t = threading.Thread(target=build_linears)
    t.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            build_transformers_model(_config(folder), folder)
    finally:
        stop.set()
        t.join()
    assert seen_meta and not any(seen_meta)


def test_only_model_classes_are_built(quantized_folder):
    folder, _ = quantized_folder
    cfg = _config(folder)
    for name in ("pipeline", "AutoTokenizer", "set_seed"):
        cfg["architectures"] = [name]
        with pytest.raises(CheckpointError, match=f"names '{name}', which is not a transformers model class"):
            build_transformers_model(cfg, folder)


def test_a_config_that_disagrees_with_the_module_table_is_refused_at_once(quantized_folder):
    folder, _ = quantized_folder
    cfg = _config(folder)
    cfg["num_hidden_layers"] = 5000
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="num_hidden_layers=5000 but the checkpoint's quantized layers are "
                                              "those of 2 decoder layers"):
        build_transformers_model(cfg, folder)
    assert time.perf_counter() - t0 < 1.0

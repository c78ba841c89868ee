"""One rank of the data-parallel test (tests/test_train.py), launched by torchrun.

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/ddp_worker.py OUT_DIR

Every rank builds its own random tiny quantized Llama with its own random
adapters (finetune must start all ranks from rank 0's weights), trains a few
steps on the same dataset, and writes its model state and losses to
OUT_DIR/rank{r}.pt.
"""

import faulthandler
import os
import sys

import torch

STEPS, BATCH_SIZE, GRAD_ACCUM, LR = 3, 2, 2, 1e-2


def build_model(seed):
    import transformers

    import qalora_ext

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config)
    qalora_ext.quantize_model(model, bits=4, group_size=32, progress=False)
    qalora_ext.add_adapters(model, rank=4, alpha=8)
    return model


def build_dataset():
    from qalora_ext.training.data import TokenDataset

    g = torch.Generator().manual_seed(7)
    return TokenDataset({"input_ids": torch.randint(0, 256, (10, 16), generator=g)})


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def main(out_dir):
    from qalora_ext.training.finetune import finetune

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = build_model(seed=100 + rank)
    torch.save(adapters(model), os.path.join(out_dir, f"init{rank}.pt"))
    result = finetune(model, build_dataset(), steps=STEPS, batch_size=BATCH_SIZE, grad_accum=GRAD_ACCUM, lr=LR,
                      output_dir=os.path.join(out_dir, "run"), save_every=2, progress=False)
    report = {"adapters": adapters(model), "state": model.state_dict(), "losses": result.losses,
              "steps_done": result.steps_done}
    torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    # A rank stuck in a collective prints where it is and exits before the
    # test's timeout, so a hang shows up as a traceback, not as silence.
    faulthandler.dump_traceback_later(int(os.environ.get("QALORA_DDP_WORKER_TIMEOUT", "90")), exit=True)
    main(sys.argv[1])

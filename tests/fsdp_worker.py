"""One rank of the FSDP2 tests (tests/test_fsdp.py), launched by torchrun: ``qalora finetune`` in this process.

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/fsdp_worker.py KILL_AFTER_STEP FINETUNE_ARGS...

KILL_AFTER_STEP > 0: rank 0 SIGKILLs itself right after writing that step's
checkpoint (a preempted job: torchrun then stops the other rank); 0: run to
the end.
"""

import faulthandler
import os
import signal
import sys


def main(kill_after, argv):
    import torch

    from qalora_ext.cli import main as cli_main
    from qalora_ext.training import finetune

    torch.set_num_threads(1)
    if kill_after:
        save = finetune._save_checkpoint

        def save_then_die(output_dir, step, model, state):
            path = save(output_dir, step, model, state)
            if step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        finetune._save_checkpoint = save_then_die
    return cli_main(["finetune", *argv])


if __name__ == "__main__":
    # A rank stuck in a collective prints where it is and exits before the
    # test's timeout, so a hang shows up as a traceback, not as silence.
    faulthandler.dump_traceback_later(int(os.environ.get("QALORA_DDP_WORKER_TIMEOUT", "90")), exit=True)
    sys.exit(main(int(sys.argv[1]), sys.argv[2:]))

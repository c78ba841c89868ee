"""Fork server for tests/test_crash_consistency.py: one pre-imported interpreter, one forked process per job.

Importing torch + transformers + qalora_ext costs seconds on a busy machine;
a crash test that kills dozens of writers cannot pay that per kill. This
script imports everything once (no torch op runs here, so no thread pool
exists to be broken by fork) and then, for each request on stdin (one JSON
line: ``{"code": ..., "log": ..., "trace": prefix or null}``), forks a child
that runs ``code`` (its own PID, SIGKILL-able, exits through ``os._exit``)
and answers two JSON lines on stdout: ``{"pid": ...}`` right after the fork,
``{"status": ..., "elapsed": ...}`` once the child is gone. A child that
completes gets ``qalora_ext.cli.main`` exactly as ``python -m qalora_ext``
does when its code calls it.

With ``trace``, the child records (through an audit hook) when it first and
last wrote, created, renamed or removed anything under that prefix, so the
test can aim half of its kills at the write itself, not only at the loading
that precedes it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _preimport() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (finetune's loss plot)
    import gguf  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401

    import qalora_ext  # noqa: F401
    import qalora_ext.cli  # noqa: F401
    import qalora_ext.interop.gguf_export  # noqa: F401
    import qalora_ext.interop.mlx_export  # noqa: F401
    import qalora_ext.loading  # noqa: F401
    import qalora_ext.training.data  # noqa: F401
    import qalora_ext.training.finetune  # noqa: F401

    torch.set_num_threads(1)


_WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.link", "os.symlink",
                 "os.chmod", "os.truncate", "shutil.copyfile", "shutil.copytree", "shutil.move"}


def _install_trace(prefix: str, times: list) -> None:
    t0 = time.monotonic()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event != "open" and event not in _WRITE_EVENTS:
            return
        if not args:
            return
        path = args[0]
        if isinstance(path, int) or path is None:
            return
        try:
            path = os.fsdecode(os.fspath(path))
        except TypeError:
            return
        if not os.path.abspath(path).startswith(prefix):
            return
        if event == "open":
            mode, flags = args[1], args[2]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if not writes:
                return
        times.append(time.monotonic() - t0)

    sys.addaudithook(hook)


def _child(req: dict) -> None:
    code = 1
    try:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        times: list = []
        if req.get("trace"):
            _install_trace(req["trace"], times)
        try:
            exec(compile(req["code"], "<crash job>", "exec"), {"__name__": "__crash_job__"})
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if req.get("trace"):
            with open(req["trace_out"], "w") as f:
                json.dump(times, f)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    _preimport()
    out = sys.stdout
    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(req)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        elapsed = time.monotonic() - t0
        out.write(json.dumps({"status": status, "exit": os.waitstatus_to_exitcode(status),
                              "elapsed": elapsed}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()

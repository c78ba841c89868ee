"""Crash consistency: a writer SIGKILLed at a random moment leaves the old version, the new one, or a clean refusal.

Default run, the one CI runs (6 kills per writer; about 1 minute on 2 busy cores: 52-75 s measured):

    .venv/bin/python -m pytest tests/test_crash_consistency.py

Full run (20 kills per writer, offline; 2.5 minutes on 2 busy cores, 151 s measured):

    QALORA_CRASH_KILLS=20 .venv/bin/python -m pytest tests/test_crash_consistency.py -s

``QALORA_CRASH_SEED=N`` replays the kill delays of a failed run (every failure
message names its seed, writer, kill number and delay); ``-s`` prints, per
writer, the kills and what each left at the destination.

Writers: ``save_quantized``, ``save_adapter``, ``save_model`` (tokenizer +
weights), and the CLI's ``quantize``, ``merge``, ``finetune --save-every 1``
(its ``checkpoint-NNNNNN`` folders and the final folder, resumed: old = a
finished 2-step run, new = the same run resumed to 4 steps), ``export
--format gguf`` (one file) and ``export --format mlx``.

For each writer, on the tiny random Llama of tests/tiny_llm.py:

1. The OLD version is written at the destination (different bits, adapters
   or tokenizer than the new one, plus a file of the user's inside the
   folder, which a re-save must keep), next to decoy siblings (one named like
   our leftovers but not one).
2. An unkilled run writes the NEW version and is timed; it also records when
   the job first and last touched the destination's folder (its write window).
   Before it, two fake leftovers are planted next to the destination: one of
   a killed save (a dead PID), which this run must remove, and one of a save
   still running (this process's PID), which it must keep.
3. Until the writer has been SIGKILLed QALORA_CRASH_KILLS times (default 6;
   runs that end before their delay are checked too but do not count): the
   old version is put back, the job is started and SIGKILLed after a random
   delay, drawn alternately uniformly over the unkilled run's duration and
   at one of the moments it wrote (± 10 ms), so kills land in the save
   itself and not only in the loading before it. Then:

   * the destination is byte for byte (sha256 and mode of every file; for
     safetensors files, of the header with sorted keys and the data, for JSON
     files of their content without the sha256 records: see _digest) the old
     or the new version and loads (load_quantized, load_adapter, the gguf
     package's reader, a reader of the MLX layout), or it does not load and is
     refused cleanly (CheckpointError / FileNotFoundError / ValueError); it
     never loads as anything else;
   * the destination's parent (except the destination and our own
     ``.NAME.tmp-*`` / ``.NAME.old-*`` leftovers), the source folders and the
     model cache (QALORA_CACHE_DIR) are unchanged;
   * a further, unkilled run succeeds, leaves exactly the new version, and no
     leftover of the killed one remains (``.NAME.tmp-*`` / ``.NAME.old-*``).

   finetune's --out is not one atomic unit: checkpoints are added one by one
   while the run goes on. There the model files and tokenizer (as a group)
   must be the old or the new ones, each ``checkpoint-NNNNNN`` and loss.png
   a version the unkilled runs wrote, the newest checkpoint must load as an
   adapter, and the further run (``--resume``) must end bit for bit where the
   unkilled run ended.

Known failure (xfail strict, test_finetune_removes_a_killed_runs_plot; tolerated
and counted as ``plot_leaks`` in the kills): a finetune killed inside its
loss-plot write leaves ``.loss.png.partial-PID.png`` in --out for good.

The process's TMPDIR is isolated too; what a killed run leaves there is
counted and printed (``tmpdir_leaks``), not asserted: save_model stages the
tokenizer in a ``qalora-tokenizer-*`` folder of TMPDIR that a SIGKILL leaves
behind (reported; outside the destination, its siblings, the sources and the
cache).

Jobs run in processes forked from one pre-imported interpreter
(tests/crash_worker.py): a fresh ``python -m qalora_ext`` costs ~6 s of
imports per kill on a busy machine, which would be most of the budget. Each
job is still its own process (own PID, which the leftover cleanup checks),
killed with SIGKILL (no cleanup runs), running the same code
``python -m qalora_ext`` runs (``qalora_ext.cli.main(argv)``).
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import qalora_ext  # noqa: E402
from qalora_ext.checkpoint.files import CheckpointError  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not hasattr(os, "fork"), reason="the fork server needs os.fork (POSIX)")]

KILLS = int(os.environ.get("QALORA_CRASH_KILLS", "6"))
SEED = int(os.environ.get("QALORA_CRASH_SEED", random.SystemRandom().randrange(2**31)))
REFUSALS = (CheckpointError, FileNotFoundError, ValueError)
HERE = Path(__file__).resolve().parent

# Inside a finetune --out: partial checkpoints that the next run removes (training/finetune.py's _PARTIAL_RE).
_FT_PARTIAL = re.compile(r"^\.\.?checkpoint-\d+\.partial-")
# ... and the loss plot's temporary file of a run killed inside savefig, which the next run removes too
# (it once stayed and was carried into the saved model: test_finetune_removes_a_killed_runs_plot).
_FT_PLOT_PARTIAL = re.compile(r"^\.loss\.png\.partial-\d+\.png$")


# ---------------------------------------------------------------------------
# The fork server
# ---------------------------------------------------------------------------


class Server:
    """tests/crash_worker.py in a subprocess: ``run(code)`` forks one job and waits for it (or kills it)."""

    def __init__(self, env: dict, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.jobs = 0
        self.proc = subprocess.Popen([sys.executable, str(HERE / "crash_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd=str(log_dir))
        self._buf = b""
        msg = self._read(timeout=300)
        assert "ready" in msg, msg

    def _read(self, timeout: Optional[float] = None) -> Optional[dict]:
        """The next JSON line, or None when ``timeout`` passes first."""
        fd = self.proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"crash_worker exited (status {self.proc.poll()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, code: str, *, kill_after: Optional[float] = None, trace: Optional[Path] = None) -> dict:
        """Run ``code`` in a forked process; SIGKILL it ``kill_after`` seconds after the fork if still running.

        Returns ``{"pid", "exit", "elapsed", "killed", "log", "times"}``; ``times`` (with ``trace``): when, in
        seconds from the fork, the job wrote, created, renamed or removed something under ``trace``."""
        self.jobs += 1
        log = self.log_dir / f"job-{self.jobs:04d}.log"
        req = {"code": code, "log": str(log)}
        if trace is not None:
            req["trace"] = os.path.realpath(trace) + os.sep
            req["trace_out"] = str(log.with_suffix(".trace.json"))
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        t0 = time.monotonic()
        pid = self._read(timeout=60)["pid"]
        killed = False
        done = None
        if kill_after is not None:
            done = self._read(timeout=max(0.0, kill_after - (time.monotonic() - t0)))
            if done is None:
                os.kill(pid, signal.SIGKILL)
                killed = True
        if done is None:
            done = self._read(timeout=600)
        times = []
        if trace is not None and done["exit"] == 0:
            times = json.loads(Path(req["trace_out"]).read_text())
        return {"pid": pid, "exit": done["exit"], "elapsed": done["elapsed"], "killed": killed, "log": log,
                "times": times}

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------
# Snapshots
# ---------------------------------------------------------------------------


def _digest(path: Path) -> str:
    """sha256 of the file; of a safetensors file, of its header (keys sorted) and data.

    safetensors writes ``__metadata__`` in a Rust HashMap's order, which changes from process to process:
    two saves of the same tensors and metadata need not be the same bytes, nor have the same sha256. So the
    sha256 records in JSON files are left out of their digest (the loaders check them against the files);
    everything else in them counts."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".json":
            raw = f.read()
            try:
                obj = json.loads(raw)
            except ValueError:
                return hashlib.sha256(raw).hexdigest()
            return "json:" + hashlib.sha256(json.dumps(_drop_sha256(obj), sort_keys=True).encode()).hexdigest()
        if path.suffix == ".safetensors":
            raw = f.read()
            n = int.from_bytes(raw[:8], "little")
            try:
                header = json.loads(raw[8:8 + n])
            except ValueError:
                header = None
            if isinstance(header, dict):
                h.update(json.dumps(header, sort_keys=True).encode())
                h.update(raw[8 + n:])
                return "st:" + h.hexdigest()
            h.update(raw)
            return h.hexdigest()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _drop_sha256(obj):
    if isinstance(obj, dict):
        return {k: _drop_sha256(v) for k, v in obj.items() if k != "sha256"}
    if isinstance(obj, list):
        return [_drop_sha256(v) for v in obj]
    return obj


def snapshot(path: Path, exclude: Callable[[str], bool] = lambda name: False) -> Optional[dict]:
    """``{relative path: (kind, mode, sha256 or link target)}`` of a file or folder; None when it is missing.

    ``exclude`` filters the top-level names of a folder."""
    if not os.path.lexists(path):
        return None
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path):
        return {".": ("f", st.st_mode, _digest(path))}
    out = {".": ("d", st.st_mode, None)}
    for root, dirs, files in os.walk(path):
        rel_root = os.path.relpath(root, path)
        if rel_root == ".":
            dirs[:] = [d for d in dirs if not exclude(d)]
            files = [f for f in files if not exclude(f)]
        for name in dirs + files:
            p = os.path.join(root, name)
            rel = os.path.normpath(os.path.join(rel_root, name))
            st = os.lstat(p)
            if os.path.islink(p):
                out[rel] = ("l", st.st_mode, os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("d", st.st_mode, None)
            else:
                out[rel] = ("f", st.st_mode, _digest(Path(p)))
    return out


def diff(a: Optional[dict], b: Optional[dict]) -> str:
    if a is None or b is None:
        return f"{'missing' if a is None else 'present'} -> {'missing' if b is None else 'present'}"
    keys = sorted(set(a) | set(b))
    lines = [f"  {k}: {a.get(k)} -> {b.get(k)}" for k in keys if a.get(k) != b.get(k)]
    return "\n".join(lines[:20]) + (f"\n  ... {len(lines) - 20} more" if len(lines) > 20 else "")


def leftover_re(name: str) -> re.Pattern:
    """Our own siblings of ``name``: ``.NAME.tmp|old-PID-HEX`` (and ``.NAME.tmp-HEX``, gguf_export's old naming)."""
    n = re.escape(name)
    return re.compile(rf"^\.{n}\.(?:(?P<tag>tmp|old)-(?P<pid>\d+)-[0-9a-f]{{8}}|tmp-[0-9a-f]{{8}})$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def copy_version(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


# ---------------------------------------------------------------------------
# Readers: a destination loads (returns), or is refused (raises one of REFUSALS)
# ---------------------------------------------------------------------------


def read_quantized(path: Path, tokenizer: bool = True) -> None:
    model = qalora_ext.load_quantized(path)
    ids = torch.tensor([[1, 5, 7, 11]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    if tokenizer:
        from transformers import AutoTokenizer

        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path}: no tokenizer.json")
        AutoTokenizer.from_pretrained(str(path))


def read_adapter(base: Path) -> Callable[[Path], None]:
    def read(path: Path) -> None:
        qalora_ext.load_adapter(qalora_ext.load_quantized(base), path)

    return read


def read_gguf(path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    if not path.is_file():
        raise FileNotFoundError(path)
    reader = gguf.GGUFReader(str(path))
    assert reader.tensors and sum(int(t.data.nbytes) for t in reader.tensors) > 0
    assert reader.fields["general.architecture"].contents() == "llama"


def read_mlx(path: Path) -> None:
    """MLX's layout: config.json with a quantization block, the safetensors files (and index) it needs."""
    from safetensors.numpy import load_file

    from qalora_ext.checkpoint.files import read_json

    if not path.is_dir():
        raise FileNotFoundError(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no config.json")
    config = read_json(config_path, "config.json")
    q = config.get("quantization")
    assert isinstance(q, dict) and q["bits"] in (2, 3, 4) and q["group_size"] in (32, 64, 128), q
    files = sorted(path.glob("*.safetensors"))
    if (path / "model.safetensors.index.json").is_file():
        index = read_json(path / "model.safetensors.index.json", "index")
        files = sorted({path / f for f in index["weight_map"].values()})
    if not files:
        raise CheckpointError(f"{path}: no weights")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    assert any(k.endswith(".scales") for k in tensors) and any(k.endswith(".biases") for k in tensors)
    assert (path / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------
# The writers
# ---------------------------------------------------------------------------


@dataclass
class Writer:
    name: str
    dest_name: str
    old_code: str  # format fields: {dest} and the sources ({llama}, {int3}, {int4}, {a1}, {a2})
    new_code: str
    read: Callable[[dict], Callable[[Path], None]]
    user_file: bool = True  # a file of the user's inside the destination folder, kept by re-saves
    xfail: Optional[str] = None  # a known failure: the case is xfail(strict=True) with this reason


def _cli(*argv: str) -> str:
    return f"import sys\nfrom qalora_ext.cli import main\nsys.exit(main({list(argv)!r}))\n"


_LIB = ("import torch\nfrom transformers import AutoTokenizer\n"
        "from qalora_ext import load_quantized, save_quantized, save_adapter, add_adapters\n"
        "from qalora_ext.checkpoint.quantized import save_model\n")

_FT = ("--batch-size", "2", "--seq-len", "32", "--max-examples", "8", "--rank", "4", "--save-every", "1",
       "--seed", "0")

WRITERS = [
    Writer("save_quantized", "out",
           _LIB + "save_quantized(load_quantized({int3!r}), {dest!r})\n",
           _LIB + "lm = load_quantized({int4!r})\ntorch.manual_seed(2)\nadd_adapters(lm, rank=4, alpha=8)\n"
                  "save_quantized(lm, {dest!r})\n",
           lambda s: lambda p: read_quantized(p, tokenizer=False)),
    Writer("save_adapter", "adapter",
           _LIB + "lm = load_quantized({int4!r})\ntorch.manual_seed(1)\nadd_adapters(lm, rank=4, alpha=8)\n"
                  "save_adapter(lm, {dest!r})\n",
           _LIB + "lm = load_quantized({int4!r})\ntorch.manual_seed(2)\nadd_adapters(lm, rank=8, alpha=8)\n"
                  "save_adapter(lm, {dest!r})\n",
           lambda s: read_adapter(s["int4"])),
    Writer("save_model", "out",
           _LIB + "tok = AutoTokenizer.from_pretrained({int3!r})\ntok.model_max_length = 77\n"
                  "save_model(load_quantized({int3!r}), tok, {dest!r})\n",
           _LIB + "lm = load_quantized({int4!r})\ntorch.manual_seed(2)\nadd_adapters(lm, rank=4, alpha=8)\n"
                  "save_model(lm, AutoTokenizer.from_pretrained({int4!r}), {dest!r})\n",
           lambda s: read_quantized),
    Writer("cli_quantize", "out",
           _cli("quantize", "--model", "{llama}", "--bits", "3", "--group-size", "32", "--out", "{dest}"),
           _cli("quantize", "--model", "{llama}", "--bits", "4", "--group-size", "32", "--out", "{dest}"),
           lambda s: read_quantized),
    Writer("cli_merge", "merged",
           _cli("merge", "--model", "{int4}", "--adapter", "{a1}", "--out", "{dest}"),
           _cli("merge", "--model", "{int4}", "--adapter", "{a2}", "--out", "{dest}"),
           lambda s: read_quantized),
    Writer("cli_finetune", "run",
           _cli("finetune", "--model", "{int4}", "--out", "{dest}", "--steps", "2", *_FT),
           _cli("finetune", "--model", "{int4}", "--out", "{dest}", "--steps", "4", "--resume", *_FT),
           lambda s: read_quantized, user_file=False),
    Writer("cli_export_gguf", "model.gguf",
           _cli("export", "--format", "gguf", "--model", "{int4}", "--adapter", "{a1}", "--out", "{dest}"),
           _cli("export", "--format", "gguf", "--model", "{int4}", "--out", "{dest}"),
           lambda s: read_gguf, user_file=False),
    Writer("cli_export_mlx", "mlx",
           _cli("export", "--format", "mlx", "--model", "{int4}", "--adapter", "{a1}", "--out", "{dest}"),
           _cli("export", "--format", "mlx", "--model", "{int4}", "--out", "{dest}"),
           lambda s: read_mlx),
]


# ---------------------------------------------------------------------------
# Fixtures: sources, cache, server
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    """The tiny model's source folders, an isolated model cache and TMPDIR, and the fork server."""
    from tiny_llm import save_tiny_llama

    from qalora_ext import cli

    # A folder of its own, not pytest's numbered tmp folders: those are shared with (and pruned by) any
    # other pytest session of the same user, and these runs take minutes.
    root = Path(tempfile.mkdtemp(prefix="qalora-crash-"))
    src = root / "src"
    sources = {"llama": save_tiny_llama(src / "llama")}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for bits in (3, 4):
            out = src / f"int{bits}"
            assert cli.main(["quantize", "--model", str(sources["llama"]), "--bits", str(bits), "--group-size",
                             "32", "--out", str(out)]) == 0
            sources[f"int{bits}"] = out
        for i in (1, 2):
            lm = qalora_ext.load_quantized(sources["int4"])
            torch.manual_seed(100 + i)
            qalora_ext.add_adapters(lm, rank=4, alpha=8)
            with torch.no_grad():
                for m in lm.modules():
                    if isinstance(m, qalora_ext.QALoRALinear):
                        m.lora_B.normal_(0, 0.05)
            sources[f"a{i}"] = qalora_ext.save_adapter(lm, src / f"adapter{i}")
    finally:
        torch.set_num_threads(before)
    cache = root / "cache"
    (cache / "decoy-model").mkdir(parents=True)
    (cache / "decoy-model" / "config.json").write_text('{"decoy": true}\n')
    tmpdir = root / "tmpdir"
    tmpdir.mkdir()
    logs = root / "logs"
    logs.mkdir()
    env = dict(os.environ)
    env.update(QALORA_CACHE_DIR=str(cache), TMPDIR=str(tmpdir), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               MPLCONFIGDIR=str(root / "mpl"), MPLBACKEND="Agg", HF_HOME=str(root / "hf"),
               PYTHONPATH=os.pathsep.join([str(HERE)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("QALORA_DEBUG", None)
    server = Server(env, logs)
    try:
        yield {"root": root, "sources": sources, "cache": cache, "tmpdir": tmpdir, "server": server}
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------


def _finetune_classes(old: dict, new: dict) -> tuple[dict, dict]:
    """Per top-level entry of a finetune --out, the versions it may be in while the resumed run is killed.

    The folder as a whole is not atomic (checkpoints are added one by one, each atomically); its model files
    and tokenizer are, as one group, and each checkpoint and loss.png is old or new on its own."""
    def groups(snap: dict) -> dict:
        out: dict = {}
        for rel, rec in snap.items():
            if rel == ".":
                continue
            top = rel.split(os.sep, 1)[0]
            key = top if top.startswith("checkpoint-") or top == "loss.png" else "<model>"
            out.setdefault(key, {})[rel] = rec
        return out

    return groups(old), groups(new)


def check_finetune_out(dest: Path, old: dict, new: dict, read: Callable[[Path], None], sources: dict) -> str:
    """A killed resumed finetune: the model group is old or new, every checkpoint a reference one."""
    snap = snapshot(dest)
    if snap is None:
        with pytest.raises(REFUSALS):
            read(dest)
        return "refused (missing)"
    g_old, g_new = _finetune_classes(old, new)
    now = {}
    for rel, rec in snap.items():
        if rel == ".":
            continue
        top = rel.split(os.sep, 1)[0]
        if _FT_PARTIAL.match(top) or top.startswith(".loss.png.partial-"):
            continue  # a killed run's partial checkpoint or plot: the run after it must remove it
        key = top if top.startswith("checkpoint-") or top == "loss.png" else "<model>"
        now.setdefault(key, {})[rel] = rec
    model = now.pop("<model>", None)
    assert model in (g_old["<model>"], g_new["<model>"]), \
        f"model files of {dest} are neither the old nor the new version:\nvs old:\n{diff(g_old['<model>'], model)}"
    for key, group in now.items():
        assert group in (g_old.get(key), g_new.get(key)), f"{dest}/{key} is neither a reference version: {group}"
    read(dest)
    from qalora_ext.training.finetune import latest_checkpoint

    ckpt = latest_checkpoint(dest)
    assert ckpt is not None
    read_adapter(sources["int4"])(ckpt)
    model_state = "old" if model == g_old["<model>"] else "new"
    return f"model {model_state}, checkpoints {sorted(k[-2:] for k in now if k.startswith('checkpoint-'))}"


@pytest.mark.parametrize("writer", WRITERS, ids=[w.name for w in WRITERS])
def test_killed_writer_leaves_old_or_new(world, writer, request):
    if writer.xfail:
        request.applymarker(pytest.mark.xfail(strict=True, reason=writer.xfail))
    server: Server = world["server"]
    sources = world["sources"]
    t_start = time.monotonic()
    rng = random.Random(f"{SEED}-{writer.name}")
    work = world["root"] / f"work-{writer.name}"
    parent = work / "parent"
    parent.mkdir(parents=True)
    dest = parent / writer.dest_name
    # Decoys next to the destination: a file, a folder named like it, a hidden file named like our leftovers.
    (parent / "neighbour.txt").write_text("not ours\n")
    (parent / f"{writer.dest_name}-other").mkdir()
    (parent / f"{writer.dest_name}-other" / "keep.bin").write_bytes(os.urandom(64))
    (parent / f".{writer.dest_name}.tmp-notes").write_text("a user's file named like a leftover\n")
    fmt = {k: str(v) for k, v in sources.items()}
    fmt["dest"] = str(dest)
    old_code, new_code = writer.old_code.format(**fmt), writer.new_code.format(**fmt)
    read = writer.read(sources)
    leftovers = leftover_re(writer.dest_name)

    def outside() -> dict:
        return {"parent": snapshot(parent, exclude=lambda n: n == writer.dest_name or bool(leftovers.match(n))),
                **{k: snapshot(Path(v)) for k, v in sources.items()}, "cache": snapshot(world["cache"])}

    def ok(run: dict, what: str) -> None:
        assert run["exit"] == 0, f"{what} failed (exit {run['exit']}):\n{run['log'].read_text()[-3000:]}"

    # 1. The old version.
    ok(server.run(old_code), "writing the old version")
    if writer.user_file:
        (dest / "NOTES.md").write_text("the user's notes, kept by every re-save\n")
    read(dest)
    old_snap = snapshot(dest)
    keep = work / "old-version"
    copy_version(dest, keep)
    baseline = outside()

    # Leftovers of an earlier save killed long ago (its PID gone) and of one still running (this process):
    # the next save removes the first and must not touch the second.
    dead = subprocess.Popen(["true"])
    dead.wait()
    planted_dead = parent / f".{writer.dest_name}.tmp-{dead.pid}-0badc0de"
    planted_live = parent / f".{writer.dest_name}.tmp-{os.getpid()}-0badf00d"
    for p in (planted_dead, planted_live):
        if dest.is_dir():
            p.mkdir()
            (p / "config.json").write_text("{}")
        else:
            p.write_bytes(b"GGUF half-written")

    # 2. The new version, unkilled and timed, with the moments it writes.
    ref = server.run(new_code, trace=parent)
    ok(ref, "the unkilled run")
    assert not os.path.lexists(planted_dead), "a dead writer's leftover survived the next save"
    assert os.path.lexists(planted_live), "a running writer's temporary was removed"
    remove(planted_live)
    new_snap = snapshot(dest)
    assert new_snap != old_snap
    read(dest)
    assert outside() == baseline
    assert not [n for n in os.listdir(parent) if leftovers.match(n)]
    duration = ref["elapsed"]
    writes = ref["times"] or [duration / 2]
    window = (min(writes), max(writes))
    if writer.user_file:
        assert (dest / "NOTES.md").is_file()

    # 3. The kills.
    outcomes: dict[str, int] = {}
    records = []
    tmp_leaks = plot_leaks = 0
    attempts = 0
    while sum(r[1] == "killed" for r in records) < KILLS:
        i = attempts
        attempts += 1
        assert attempts <= 4 * KILLS + 4, f"only {len(records)} of {attempts} runs were killed before they ended"
        remove(dest)
        copy_version(keep, dest)
        assert snapshot(dest) == old_snap
        tmp_before = set(os.listdir(world["tmpdir"]))
        if i % 2 == 0:
            delay = rng.uniform(0.0, duration)
        else:  # at one of the moments the unkilled run wrote, give or take 10 ms
            delay = max(0.0, rng.choice(writes) + rng.uniform(-0.01, 0.01))
        context = (f"QALORA_CRASH_SEED={SEED} writer {writer.name}, run {i + 1} (kills wanted: {KILLS}) after "
                   f"{delay:.3f} s "
                   f"(unkilled run {duration:.3f} s, write window {window[0]:.3f}-{window[1]:.3f} s)")
        try:
            run = server.run(new_code, kill_after=delay)
            if not run["killed"]:
                ok(run, "the run (it ended before the kill)")
            # The destination: old, new, or refused.
            if writer.name == "cli_finetune":
                state = check_finetune_out(dest, old_snap, new_snap, read, sources)
            else:
                snap = snapshot(dest)
                if snap == old_snap:
                    state = "old"
                elif snap == new_snap:
                    state = "new"
                else:
                    try:
                        read(dest)
                    except REFUSALS as e:
                        state = f"refused ({type(e).__name__})"
                    else:
                        pytest.fail(f"{dest} loads but is neither the old nor the new version:\n"
                                    f"vs old:\n{diff(old_snap, snap)}\nvs new:\n{diff(new_snap, snap)}")
                if state in ("old", "new"):
                    read(dest)
            missing_after_kill = snapshot(dest) is None
            if missing_after_kill:
                # Killed between the two renames: the old version waits in .NAME.old-PID-*, untouched.
                aside = [parent / n for n in os.listdir(parent) if (m := leftovers.match(n)) and m["tag"] == "old"]
                assert len(aside) == 1 and snapshot(aside[0]) == old_snap, aside
            assert outside() == baseline, f"something next to the destination changed:\n{diff(baseline, outside())}"
            killed_left = sorted(n for n in os.listdir(parent) if leftovers.match(n))
            records.append((round(delay, 3), "killed" if run["killed"] else "completed", state, killed_left))
            if run["killed"]:
                outcomes[state] = outcomes.get(state, 0) + 1
            # A further, unkilled run: succeeds, leaves the new version, removes what the killed one left.
            again = server.run(new_code)
            ok(again, "the run after the kill")
            after = snapshot(dest)
            if writer.name == "cli_finetune":
                leaked = [rel for rel in after or {} if _FT_PLOT_PARTIAL.match(rel)]
                plot_leaks += len(leaked)
                assert not leaked, f"the run after the kill kept a killed run's plot: {leaked}"
            assert after == new_snap, f"the run after the kill left:\n{diff(new_snap, after)}"
            read(dest)
            assert outside() == baseline, f"something next to the destination changed:\n{diff(baseline, outside())}"
            stale = [n for n in os.listdir(parent)
                     if (m := leftovers.match(n)) and not (m["pid"] and _pid_alive(int(m["pid"])))]
            if missing_after_kill and stale and all(leftovers.match(n)["tag"] == "old" for n in stale):
                # Documented (files.remove_stale_leftovers): while the target is missing, the .old sibling is
                # the only copy of the previous version and the save that recreates the target keeps it; the
                # save after that removes it.
                ok(server.run(new_code), "the second run after the kill")
                assert snapshot(dest) == new_snap
                stale = [n for n in os.listdir(parent)
                         if (m := leftovers.match(n)) and not (m["pid"] and _pid_alive(int(m["pid"])))]
            assert not stale, f"leftovers of the killed run survive the next save: {stale} (after the kill: " \
                              f"{killed_left})"
            tmp_leaks += len(set(os.listdir(world["tmpdir"])) - tmp_before)
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise AssertionError(f"{context}\n{type(e).__name__}: {e}") from e
    elapsed = time.monotonic() - t_start
    summary = {"writer": writer.name, "kills": sum(r[1] == "killed" for r in records), "runs": len(records),
               "after_kill": outcomes, "unkilled_s": round(duration, 3), "window_s": [round(w, 3) for w in window],
               "test_s": round(elapsed, 1), "tmpdir_leaks": tmp_leaks, "plot_leaks": plot_leaks, "seed": SEED}
    print(f"\n[crash] {json.dumps(summary)}")
    for r in records:
        print(f"[crash]   delay {r[0]:.3f} s: {r[1]}, destination {r[2]}, leftovers {r[3]}")
    if os.environ.get("QALORA_CRASH_LOG"):
        with open(os.environ["QALORA_CRASH_LOG"], "a") as f:
            f.write(json.dumps({**summary, "records": records}) + "\n")


def test_finetune_removes_a_killed_runs_plot(world):
    """Deterministic form of the plot leak the kills find now and then (about 1 kill in 20 of finetune)."""
    server: Server = world["server"]
    out = world["root"] / "plot-leak" / "run"
    argv = ["finetune", "--model", str(world["sources"]["int4"]), "--out", str(out), *_FT]
    run = server.run(_cli(*argv, "--steps", "1"))
    assert run["exit"] == 0, run["log"].read_text()[-3000:]
    dead = subprocess.Popen(["true"])
    dead.wait()
    partial = out / f".loss.png.partial-{dead.pid}.png"  # what a run SIGKILLed inside savefig leaves
    partial.write_bytes(b"")
    run = server.run(_cli(*argv, "--steps", "2", "--resume"))
    assert run["exit"] == 0, run["log"].read_text()[-3000:]
    assert (out / "checkpoint-000002").is_dir()
    assert not partial.exists(), f"{partial.name} survived the next run"

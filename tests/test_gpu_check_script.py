"""bench/gpu_check.sh, the script a lent GPU runs first, run here without one (issue 14, item 7): every
stage in a dry run (arguments checked, each step's command printed, nothing built or run), an unknown stage
refused, the files each stage runs present, and each pytest selection of a stage selecting tests."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STAGES = ("build", "test", "bench", "quick", "train", "racecheck")


def dry_run(*args, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "HOME": str(tmp_path)}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_runs_dry(stage, tmp_path):
    out = dry_run(stage, tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"=== {stage} (" in out.stdout and "all steps passed" in out.stdout
    if stage != "racecheck":  # racecheck needs compute-sanitizer, which a machine without CUDA lacks
        assert "[dry-run]" in out.stdout


def test_the_default_stages_and_all_together(tmp_path):
    out = dry_run(tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [s for s in STAGES if f"=== {s} (" in out.stdout] == ["build", "test", "bench"]
    out = dry_run(*STAGES, tmp_path=tmp_path)
    assert out.returncode == 0 and all(f"=== {s}: " in out.stdout for s in STAGES), out.stdout + out.stderr


def test_an_unknown_stage_is_refused(tmp_path):
    out = dry_run("build", "trian", tmp_path=tmp_path)
    assert out.returncode == 2
    assert "unknown stage 'trian'" in out.stdout and "train" in out.stdout


def test_what_the_stages_run_exists(tmp_path):
    """Each python script a stage runs exists, and each pytest -k selection selects tests of test_cuda.py."""
    out = dry_run(*STAGES, tmp_path=tmp_path).stdout
    commands = [line.split("): ", 1)[1] for line in out.splitlines() if line.startswith("[dry-run]") and "): " in line]
    scripts = {w for c in commands for w in shlex.split(c) if w.endswith(".py") and not w.startswith("tests/")}
    assert scripts >= {"bench/bench_gpu.py", "bench/bench_train_gpu.py"}
    for s in scripts:
        assert (ROOT / s).is_file(), s
    selections = set()
    for c in commands:
        words = shlex.split(c)
        if "pytest" in words and "-k" in words:
            selections.add(words[words.index("-k") + 1])
    # The printed command is not re-quoted: rebuild multi-word -k expressions from the raw line.
    for c in commands:
        m = re.search(r" -k (.+)$", c)
        if m and "pytest" in c:
            selections.add(m.group(1))
    assert selections
    for k in selections:
        got = subprocess.run([sys.executable, "-m", "pytest", "tests/test_cuda.py", "--collect-only", "-q",
                              "-p", "no:cacheprovider", "-k", k], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        if " or " not in k and " " in k:
            continue  # a fragment of a multi-word expression (from shlex): the raw one is checked too
        assert re.search(r"(\d+)/\d+ tests collected|(\d+) tests? collected", got.stdout), (k, got.stdout[-800:])
        n = re.search(r"(\d+)(?:/\d+)? tests? collected", got.stdout)
        assert n and int(n.group(1)) > 0, (k, got.stdout[-800:])

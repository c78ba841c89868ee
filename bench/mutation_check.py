"""Mutation check of the CUDA kernels' tests (issue 14, item 6). Offline: it takes long, it is not CI.

Generates single small changes to ``csrc/cuda/`` from a fixed list of operators (an index off by one,
``+ 8`` dropped, ``<`` to ``<=`` at a tail, a removed ``__syncthreads()``, a removed or weakened
``cp_async_wait``, a split boundary moved, a fragment register swapped, ...), picks ``--count`` of them
with a recorded seed (every operator represented), and for each one rebuilds the CUDA emulation in its own
copy of the sources (``build/mutation``: the working tree and ``build/emulation`` are never touched) and
runs the emulated tests: first the torch-free driver, then ``tests/test_cuda.py`` (``-x``, the default
grid without ``-m slow``). A mutant is *killed* when either fails (or the build fails), *survives*
otherwise. Writes ``bench/results/mutation.json`` and prints a table and the score.

    python bench/mutation_check.py --count 48 --seed 14
    python bench/mutation_check.py --list            # every candidate site, no build
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["gemv.cu", "qlinear_prologue.cu", "format_kernels.cu", "gemm_mma.cu", "grad_mma.cu", "mma_sm80.cuh",
         "device_helpers.cuh"]

# (operator, pattern, replacement): each match of the pattern in a code line is one candidate mutant.
OPERATORS = [
    ("remove __syncthreads", r"__syncthreads\(\);", ";"),
    ("remove cp_async_wait", r"cp_async_wait<(\d)>\(\);", ";"),
    ("weaken cp_async_wait", r"cp_async_wait<(\d)>\(\)", lambda m: f"cp_async_wait<{int(m.group(1)) + 1}>()"),
    ("drop + 8", r" \+ 8(?!\d| \*)", ""),
    ("< to <= at a tail", r"(?<![<])< (N|M|K|chunks|L|rank|w\.N|c_end|u1|rows|xrows|grows|kChunk|cpg|splits)\b",
     lambda m: f"<= {m.group(1)}"),
    (">= to > at a bound", r">= (N|M|K|chunks|L|w\.N|w\.stride_words|xrows|grows|c_end)\b", lambda m: f"> {m.group(1)}"),
    ("index off by one", r"\[(\w+) \* (\w+) \+ (\w+)\]", lambda m: f"[{m.group(1)} * {m.group(2)} + {m.group(3)} + 1]"),
    ("lane mapping off by one", r"\btig \* 2\b", "tig * 2 + 1"),
    ("fragment row + 8 dropped", r"gid \+ 8 \*", "gid + 0 *"),
    ("split boundary moved", r"(u0|g_begin) \+ (units_per_split|groups_per_split)",
     lambda m: f"{m.group(1)} + {m.group(2)} + 1"),
    ("split size rounded down", r"\((units|L) \+ splits - 1\) / splits", lambda m: f"{m.group(1)} / splits"),
    ("fragment register swapped", r"\{ld_shared_u32\((\w+)\), ld_shared_u32\((\w+ \+ 8 \* \w+)\), ld_shared_u32\((\w+ \+ 8)\)",
     lambda m: f"{{ld_shared_u32({m.group(1)}), ld_shared_u32({m.group(3)}), ld_shared_u32({m.group(2)})"),
    ("B fragment halves swapped", r"pack\(v\[0\], v\[1\]\)", "pack(v[1], v[0])"),
    ("B fragment codes swapped", r"get_code\(words, i0 \+ 8, BITS\), get_code\(words, i0 \+ 9, BITS\)",
     "get_code(words, i0 + 9, BITS), get_code(words, i0 + 8, BITS)"),
    ("shuffle offset", r"o = kWarp / 2", "o = kWarp / 4"),
    ("group fold condition", r"\(ci \+ 1\) % cpg == 0", "ci % cpg == 0"),
    ("accumulator not reset", r"acc\[mt\]\[nt\]\[i\] = 0\.f;\n", "\n"),
    ("epilogue term dropped", r"\+ \(bias \? bias\[n\] : 0\.f\)", ""),
    ("zero-fill made live", r"live \? (16|4) : 0", lambda m: f"{m.group(1)}"),
    ("stage step", r"c0 \+= kStageChunks", "c0 += kStageChunks + 1"),
    ("scale/zero group index", r"\bk / w\.group_size", "(k + 1) / w.group_size"),
]


def code_lines(text: str):
    """(start, end) offsets of code (not comment) in text: everything but // comments."""
    spans, pos = [], 0
    for line in text.splitlines(keepends=True):
        cut = line.find("//")
        spans.append((pos, pos + (cut if cut >= 0 else len(line))))
        pos += len(line)
    return spans


def candidates():
    out = []
    for name in FILES:
        text = (ROOT / "csrc" / "cuda" / name).read_text()
        spans = code_lines(text)
        for op, pattern, repl in OPERATORS:
            for m in re.finditer(pattern, text):
                if not any(a <= m.start() and m.end() <= b for a, b in spans) and "\n" not in pattern:
                    continue
                new = repl(m) if callable(repl) else m.expand(repl) if "\\" in repl else repl
                line = text.count("\n", 0, m.start()) + 1
                out.append({"operator": op, "file": name, "line": line, "start": m.start(), "end": m.end(),
                            "old": m.group(0), "new": new})
    return out


def pick(cands, count, seed):
    rng = random.Random(seed)
    by_op = {}
    for c in cands:
        by_op.setdefault(c["operator"], []).append(c)
    chosen = [rng.choice(v) for v in by_op.values()]  # every operator once
    rest = [c for c in cands if c not in chosen]
    rng.shuffle(rest)
    chosen += rest[: max(0, count - len(chosen))]
    return sorted(chosen, key=lambda c: (c["file"], c["start"]))


def run(cmd, env=None, timeout=1800, cwd=None):
    t = time.time()
    p = subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr, time.time() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--list", action="store_true", help="print every candidate and the pick, build nothing")
    ap.add_argument("--pytest-args", default="-x -q -p no:cacheprovider -m 'not slow'")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mutation.json"))
    args = ap.parse_args()

    cands = candidates()
    chosen = pick(cands, args.count, args.seed)
    print(f"{len(cands)} candidate mutants from {len(OPERATORS)} operators; {len(chosen)} picked with seed {args.seed}")
    if args.list:
        for i, c in enumerate(chosen):
            print(f"{i:3d} {c['operator']:28s} {c['file']}:{c['line']}  {c['old']!r} -> {c['new']!r}")
        return 0

    work = ROOT / "build" / "mutation"
    src, build = work / "src", work / "build"
    work.mkdir(parents=True, exist_ok=True)
    if src.exists():
        shutil.rmtree(src)
    src.mkdir()
    for item in ("CMakeLists.txt", "cmake", "csrc", "pyproject.toml"):
        (shutil.copytree if (ROOT / item).is_dir() else shutil.copy)(ROOT / item, src / item)
    py = os.environ.get("QALORA_PY", str(ROOT / ".venv" / "bin" / "python"))
    env = dict(os.environ, PATH=f"{Path(py).parent}:{os.environ['PATH']}")
    if not (build / "build.ninja").exists():
        pybind = subprocess.run([py, "-m", "pybind11", "--cmakedir"], capture_output=True, text=True).stdout.strip()
        rc, log, _ = run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DQALORA_CUDA_EMULATION=ON",
                          "-DQALORA_CUDA=OFF", f"-DPython_EXECUTABLE={py}", f"-Dpybind11_DIR={pybind}"], env=env)
        if rc:
            print(log)
            return 1
    targets = ["qalora_cuda_emulated", "qalora_emu_selftest"]
    rc, log, t = run(["ninja", "-C", str(build), "-j", os.environ.get("QALORA_JOBS", "2"), *targets], env=env)
    if rc:
        print(log[-3000:])
        return 1
    print(f"baseline build {t:.0f} s")
    lib = build / "libqalora_cuda_emulated.so"
    test_env = dict(env, QALORA_CUDA_EMULATION="1", QALORA_CUDA_EMULATION_LIB=str(lib))
    results = []
    for i, c in enumerate(chosen):
        path = src / "csrc" / "cuda" / c["file"]
        original = path.read_text()
        path.write_text(original[: c["start"]] + c["new"] + original[c["end"]:])
        verdict, by = "survived", ""
        try:
            rc, log, tb = run(["ninja", "-C", str(build), "-j", os.environ.get("QALORA_JOBS", "2"), *targets], env=env)
            if rc:
                verdict, by = "killed", "build"
            else:
                rc, log, td = run([str(build / "csrc" / "emulation" / "qalora_emu_selftest")], timeout=300)
                if rc:
                    verdict, by = "killed", "driver"
                else:
                    rc, log, tp = run([py, "-m", "pytest", "tests/test_cuda.py", *args.pytest_args.split()],
                                      env=test_env, timeout=1200)
                    if rc:
                        m = re.search(r"FAILED (\S+)", log)
                        verdict, by = "killed", "pytest " + (m.group(1).split("::")[-1] if m else "(error)")
        except subprocess.TimeoutExpired:
            verdict, by = "killed", "timeout"
        finally:
            path.write_text(original)
        results.append(dict(c, verdict=verdict, by=by))
        print(f"[{i + 1}/{len(chosen)}] {verdict:8s} {c['operator']:28s} {c['file']}:{c['line']} "
              f"{c['old']!r} -> {c['new']!r}  {by}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"seed": args.seed, "count": len(chosen), "results": results}, indent=1))
    # restore the baseline build for a later run
    run(["ninja", "-C", str(build), *targets], env=env)
    killed = sum(r["verdict"] == "killed" for r in results)
    print(f"mutation score: {killed}/{len(results)} = {100.0 * killed / max(1, len(results)):.1f}% killed")
    for r in results:
        if r["verdict"] == "survived":
            print(f"  survivor: {r['operator']} {r['file']}:{r['line']} {r['old']!r} -> {r['new']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

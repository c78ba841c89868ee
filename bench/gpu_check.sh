#!/usr/bin/env bash
# The GPU check, run from anywhere on a machine with an NVIDIA GPU, nvcc, cmake, ninja, pybind11,
# scikit-build-core and a CUDA build of torch (no network needed):
#
#   bash bench/gpu_check.sh [--dry-run] [build] [test] [bench] [quick] [train] [racecheck]   (default: build test bench)
#
# --dry-run (or GPU_CHECK_DRY_RUN=1): check the arguments and print every step's command instead of
#            running it (no GPU, no build): tests/test_gpu_check_script.py runs it on every commit, so the
#            script a lent GPU will run has been run before.
# build:     the extension for this GPU's architecture (QALORA_CUDA_ARCHS overrides; H100/H200: 90),
#            editable install, CMake build tree in build/gpu (a rerun reuses it); prints the build time,
#            ptxas's registers / spills per kernel, and build_info() (must say cuda_kernels: True).
# test:      tests/test_cuda.py, then tests/test_cuda.py::test_sanitizer_small under
#            `compute-sanitizer --tool memcheck` with torch's caching allocator off.
# bench:     bench/bench_gpu.py: issue 5's table and targets (markdown on stdout, JSON + markdown in $OUT).
# quick:     a one-minute smoke run: import, three tests, bench --quick.
# train:     (not in the default; issue 6) tests/test_cuda.py's training tests (-k train), then
#            bench/bench_train_gpu.py: one Llama-7B block's QA-LoRA training step vs dense bf16 LoRA and
#            dequantize-then-matmul (eager, torch.compile); T_TRAIN (default 120) per step.
# racecheck: (not in the default) the small case under `compute-sanitizer --tool racecheck`.
#
# Logs, JSON and markdown go to $OUT (default build/gpu_out). Time limits per step, seconds (environment):
# T_BUILD=90 T_TEST=55 T_SAN=35 T_BENCH=55 T_QUICK=60 (the default stages fit 4 minutes). A failed step is reported and the next stage
# still runs (except after a failed build); the exit status is 1 if anything failed.
# Reads GPU information only: never changes GPU settings (no nvidia-smi -pm / -lgc / -r ...).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
[ -n "$PY" ] || PY="$(command -v python || command -v python3 || true)"
[ -n "$PY" ] || { echo "gpu_check: no python on PATH (set PYTHON=...)"; exit 2; }
OUT="${OUT:-build/gpu_out}"
BUILD_DIR="${QALORA_GPU_BUILD_DIR:-build/gpu}"
T_BUILD="${T_BUILD:-90}"; T_TEST="${T_TEST:-55}"; T_SAN="${T_SAN:-35}"; T_BENCH="${T_BENCH:-55}"
T_QUICK="${T_QUICK:-60}"; T_TRAIN="${T_TRAIN:-120}"
mkdir -p "$OUT" "$BUILD_DIR"

DRY="${GPU_CHECK_DRY_RUN:-0}"
stages=()
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then DRY=1; else stages+=("$a"); fi
done
[ ${#stages[@]} -gt 0 ] || stages=(build test bench)
ALL_STAGES="build test bench quick train racecheck"
for s in "${stages[@]}"; do
  case " $ALL_STAGES " in *" $s "*) ;; *) echo "gpu_check: unknown stage '$s' (${ALL_STAGES// /, })"; exit 2 ;; esac
done

FAILED=()
TIMES=()
T_ALL=$(date +%s)
fail() { FAILED+=("$1"); echo "!!! FAILED: $1"; }
stage_start() { printf '\n=== %s (%s) ===\n' "$1" "$(date +%H:%M:%S)"; STAGE_T0=$(date +%s); }
stage_end() {
  local dt=$(( $(date +%s) - STAGE_T0 ))
  TIMES+=("$1 ${dt}s"); printf '=== %s: %s s ===\n' "$1" "$dt"
}

# run_step NAME SECONDS LOG CMD...: runs CMD under `timeout`, all output to LOG; records a failure
# (never exits). Returns CMD's status.
run_step() {
  local name=$1 secs=$2 logf=$3 rc=0
  shift 3
  if [ "$DRY" = 1 ]; then
    echo "[dry-run] $name (limit ${secs} s, log $logf): $*"
    : > "$logf"
    return 0
  fi
  set +e
  timeout -k 10 "$secs" "$@" >"$logf" 2>&1
  rc=$?
  set -e
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    fail "$name: timed out after ${secs} s (log: $logf)"
  elif [ "$rc" -ne 0 ]; then
    fail "$name: exit status $rc (log: $logf)"
  fi
  return "$rc"
}

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer 2>/dev/null || true)" \
           "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}" \
           "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/nvcc)")/compute-sanitizer" \
           /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

# ---- what this machine is --------------------------------------------------------------------------------
echo "gpu_check: stages ${stages[*]}; python $PY; out $OUT; $(date -u +%Y-%m-%dT%H:%M:%SZ)"
[ "$DRY" = 1 ] && echo "gpu_check: dry run: commands are printed, not run"
if [ "$DRY" != 1 ]; then
nvidia-smi -L 2>/dev/null || echo "nvidia-smi -L: not available"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>/dev/null || true
if command -v nvcc >/dev/null 2>&1; then nvcc --version | tail -n 2; else echo "nvcc: not on PATH"; fi
"$PY" - <<'EOF' || true
import importlib.util, platform, sys
import torch
print(f"python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB; "
          f"{torch.cuda.device_count()} device(s)")
missing = [m for m in ("numpy", "safetensors", "tqdm", "pytest", "scikit_build_core", "pybind11", "cmake", "ninja")
           if importlib.util.find_spec(m) is None]
print("python packages missing:", ", ".join(missing) if missing else "none")
EOF
fi

if [ -n "${QALORA_CUDA_ARCHS:-}" ]; then
  ARCHS="$QALORA_CUDA_ARCHS"
elif [ "$DRY" = 1 ]; then
  ARCHS=90
else
  ARCHS="$("$PY" -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}{m}")' 2>/dev/null || echo 90)"
fi

IMPORT_CHECK='import json, qalora_ext
from qalora_ext import _C
info = qalora_ext.build_info()
print(json.dumps(info))
print("CUDA_GEMV_MAX_M =", getattr(_C, "CUDA_GEMV_MAX_M", None), "; set_nvtx:", hasattr(_C, "set_nvtx"))
assert info["cuda_kernels"], "this build has no CUDA kernels"
import torch
ops = ["quantize_rtn", "pack", "unpack", "dequantize", "qlinear", "qlinear_int8", "qlinear_grad_input"]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"qalora::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print("CUDA kernels registered for every op")'

import_check() {
  if [ "$DRY" = 1 ]; then echo "[dry-run] import / build_info check"; return 0; fi
  (cd /tmp && "$PY" -c "$IMPORT_CHECK")
}

for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      stage_start build
      build_ok=1
      echo "pip install -e . (scikit-build-core, build dir $BUILD_DIR, QALORA_CUDA=ON, archs $ARCHS)"
      if run_step build "$T_BUILD" "$OUT/build.log" env QALORA_CUDA=ON \
          "$PY" -m pip install --no-build-isolation --no-deps --no-index --disable-pip-version-check -v \
          --config-settings=build-dir="$BUILD_DIR" \
          --config-settings=cmake.define.QALORA_CUDA=ON \
          --config-settings=cmake.define.QALORA_CUDA_ARCHS="$ARCHS" \
          -e .; then
        grep -E "qalora_ext:" "$OUT/build.log" | sed 's/^ *//' | sort -u || true
        # ptxas -v (cmake/cuda.cmake passes -Xptxas=-v): one line per kernel.
        awk '
          /Compiling entry function/ { f = $0; sub(/.*function ./, "", f); sub(/. for .*/, "", f); sp = "" }
          /bytes spill stores/ { sp = $0; sub(/^.*: */, "", sp); gsub(/^ +| +$/, "", sp) }
          /Used [0-9]+ registers/ { r = $0; sub(/.*Used /, "", r); print "  " f ": " r (sp != "" ? "; " sp : "") }
        ' "$OUT/build.log" | { if command -v c++filt >/dev/null 2>&1; then c++filt; else cat; fi; } \
          | sort -u > "$OUT/ptxas.txt" || true
        if [ -s "$OUT/ptxas.txt" ]; then
          cp "$OUT/ptxas.txt" "$BUILD_DIR/ptxas_last.txt" 2>/dev/null || true
          echo "ptxas (per kernel: registers, barriers, smem; stack / spills):"
          cat "$OUT/ptxas.txt"
        elif [ -s "$BUILD_DIR/ptxas_last.txt" ]; then
          echo "ptxas: nothing recompiled; the last full report ($BUILD_DIR/ptxas_last.txt):"
          cat "$BUILD_DIR/ptxas_last.txt"
        else
          echo "ptxas: no report in the log"
        fi
        nz=$(grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$OUT/build.log" | wc -l || true)
        echo "ptxas lines with nonzero spills: $nz"
      else
        build_ok=0
        tail -n 60 "$OUT/build.log"
      fi
      if [ "$build_ok" = 1 ] && ! import_check; then
        build_ok=0
        fail "build: import / build_info check"
      fi
      stage_end build
      if [ "$build_ok" != 1 ]; then
        echo "gpu_check: the build failed; later stages skipped"
        break
      fi
      ;;
    test)
      stage_start test
      run_step "test: pytest tests/test_cuda.py" "$T_TEST" "$OUT/test.log" \
        "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider --maxfail=20 -rfE --durations=5 || true
      tail -n 60 "$OUT/test.log"
      if SAN="$(find_sanitizer)"; then
        echo "--- $SAN --tool memcheck: test_sanitizer_small (PYTORCH_NO_CUDA_MEMORY_CACHING=1)"
        run_step "test: compute-sanitizer memcheck" "$T_SAN" "$OUT/memcheck.log" \
          env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 9 --print-limit 20 \
          "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -x -k sanitizer_small || true
        grep -E "ERROR SUMMARY|Invalid|out of bounds|passed|failed|skipped|error" "$OUT/memcheck.log" | head -n 30 || true
      else
        echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, next to nvcc, /usr/local/cuda): memcheck skipped"
      fi
      stage_end test
      ;;
    bench)
      stage_start bench
      run_step "bench: bench/bench_gpu.py" "$T_BENCH" "$OUT/bench.err" \
        "$PY" bench/bench_gpu.py --json "$OUT/gpu_bench.json" --out-dir "$OUT" || tail -n 25 "$OUT/bench.err"
      if [ -s "$OUT/gpu_bench.md" ]; then cat "$OUT/gpu_bench.md"; fi
      stage_end bench
      ;;
    quick)
      stage_start quick
      if ! import_check; then fail "quick: import / build_info check"; fi
      run_step "quick: 3 tests" "$T_QUICK" "$OUT/test_quick.log" \
        "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rfE \
        -k "build_exposes or sanitizer_small or cuda_graph_capture" || true
      tail -n 15 "$OUT/test_quick.log"
      run_step "quick: bench --quick" "$T_QUICK" "$OUT/bench_quick.err" \
        "$PY" bench/bench_gpu.py --quick --json "$OUT/gpu_bench_quick.json" --out-dir "$OUT/quick" \
        || tail -n 25 "$OUT/bench_quick.err"
      if [ -s "$OUT/quick/gpu_bench.md" ]; then cat "$OUT/quick/gpu_bench.md"; fi
      stage_end quick
      ;;
    train)
      stage_start train
      run_step "train: pytest -k train" "$T_TRAIN" "$OUT/test_train.log" \
        "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rfE -k train || true
      tail -n 15 "$OUT/test_train.log"
      run_step "train: bench/bench_train_gpu.py" "$T_TRAIN" "$OUT/train_bench.err" \
        "$PY" bench/bench_train_gpu.py --json "$OUT/train_bench.json" --out-dir "$OUT" \
        || tail -n 25 "$OUT/train_bench.err"
      if [ -s "$OUT/train_bench.md" ]; then cat "$OUT/train_bench.md"; fi
      stage_end train
      ;;
    racecheck)
      stage_start racecheck
      if SAN="$(find_sanitizer)"; then
        run_step "racecheck" "$T_SAN" "$OUT/racecheck.log" \
          env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool racecheck --error-exitcode 9 --print-limit 20 \
          "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -x -k sanitizer_small || true
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|passed|failed" "$OUT/racecheck.log" | head -n 30 || true
      else
        echo "compute-sanitizer not found: racecheck skipped"
      fi
      stage_end racecheck
      ;;
  esac
done

printf '\n=== gpu_check summary: %s s in all; %s ===\n' "$(( $(date +%s) - T_ALL ))" "${TIMES[*]:-no stage run}"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "all steps passed"

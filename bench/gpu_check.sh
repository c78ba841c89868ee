#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU, nvcc, cmake, ninja, pybind11,
# scikit-build-core and a CUDA build of torch (no network needed):
#   bash bench/gpu_check.sh [build] [test] [bench] [quick]   (default: build test bench)
# build: the extension for sm_90 (QALORA_CUDA_ARCHS overrides), editable, into
#        build/gpu (reused when rerun); prints the build time and ptxas report.
# test:  tests/test_cuda.py, then one compute-sanitizer memcheck run on a small case.
# bench: bench/bench_gpu.py (the table and issue 5's targets).
# quick: import check, a few tests, bench --quick.
# Logs and JSON go to $OUT (default build/gpu_out). Never changes GPU settings.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-build/gpu_out}"
ARCHS="${QALORA_CUDA_ARCHS:-90}"
mkdir -p "$OUT" build/gpu
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test bench)

stage_start() { printf '\n=== %s (%s) ===\n' "$1" "$(date +%H:%M:%S)"; STAGE_T0=$(date +%s); }
stage_end() { printf '=== %s done in %s s ===\n' "$1" "$(( $(date +%s) - STAGE_T0 ))"; }

nvidia-smi -L || true
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"

for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      stage_start build
      timeout 150 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v \
        -C build-dir=build/gpu -C cmake.define.QALORA_CUDA=ON -C "cmake.define.QALORA_CUDA_ARCHS=$ARCHS" \
        -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      grep "qalora_ext:" "$OUT/build.log" | sed 's/^ *//' || true
      echo "ptxas (gemv kernels: registers, spills):"
      awk '/Compiling entry function/ { f = $0; sub(/.*function ./, "", f); sub(/. for .*/, "", f) }
           /spill stores/ { sp = $0; sub(/.*: +/, "", sp); sub(/^ +/, "", sp) }
           /Used [0-9]+ registers/ { if (f ~ /gemv/) { r = $0; sub(/.*Used /, "", r); sub(/,.*/, "", r); print "  " f ": " r "; " sp } }' \
        "$OUT/build.log" | (c++filt 2>/dev/null || cat) | sort -u
      (cd /tmp && "$PY" -c "import qalora_ext as q; i = q.build_info(); print(i); assert i['cuda_kernels'], 'no CUDA kernels'")
      stage_end build
      ;;
    test)
      stage_start test
      timeout 120 "$PY" -m pytest tests/test_cuda.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/test.log" | tail -15
      SAN="$(command -v compute-sanitizer || true)"
      [ -z "$SAN" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SAN=/usr/local/cuda/bin/compute-sanitizer
      if [ -n "$SAN" ]; then
        timeout 90 "$SAN" --tool memcheck --error-exitcode 9 "$PY" -m pytest tests/test_cuda.py -q -x \
          -p no:cacheprovider -k sanitizer_small 2>&1 | tee "$OUT/memcheck.log" | tail -6
      else
        echo "compute-sanitizer not found: memcheck run skipped"
      fi
      stage_end test
      ;;
    bench)
      stage_start bench
      timeout 150 "$PY" bench/bench_gpu.py --json "$OUT/gpu_bench.json" 2>"$OUT/bench.err" | tee "$OUT/gpu_bench.md"
      stage_end bench
      ;;
    quick)
      stage_start quick
      (cd /tmp && "$PY" -c "import qalora_ext as q; print(q.build_info())")
      timeout 60 "$PY" -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
        -k "sanitizer_small or deterministic or format_ops" 2>&1 | tail -5
      timeout 60 "$PY" bench/bench_gpu.py --quick 2>"$OUT/bench_quick.err" | tee "$OUT/gpu_bench_quick.md"
      stage_end quick
      ;;
    *) echo "unknown stage '$stage' (build, test, bench, quick)"; exit 2 ;;
  esac
done

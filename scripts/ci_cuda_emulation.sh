#!/usr/bin/env bash
# CI: the CUDA kernels run and tested without a GPU (issue 14). Builds the
# emulation (csrc/cuda/ compiled as host C++ against csrc/emulation/, cmake
# -DQALORA_CUDA_EMULATION=ON) in its own build folder, runs its torch-free
# driver (the emulation layer's tests and every kernel against a scalar
# reference), then tests/test_cuda.py against the emulated ops
# (torch.ops.qalora_emu). Extra arguments go to pytest (e.g. -m slow for the
# full grid, -k mma).
#   QALORA_VENV        the environment with torch (default .venv, as run_tests.sh)
#   QALORA_EMU_BUILD   the build folder (default build/emulation)
#   QALORA_JOBS        parallel compile jobs (default 2)
#   --build-only       build, run nothing
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QALORA_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
BUILD="${QALORA_EMU_BUILD:-$ROOT/build/emulation}"
JOBS="${QALORA_JOBS:-2}"
log() { printf '[cuda-emulation %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
export PATH="$VENV/bin:$PATH"  # cmake and ninja from the environment

build_only=0
if [ "${1:-}" = "--build-only" ]; then build_only=1; shift; fi

start=$(date +%s)
if [ ! -f "$BUILD/build.ninja" ]; then
  log "configuring $BUILD"
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DQALORA_CUDA_EMULATION=ON -DQALORA_CUDA=OFF \
    -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" > "$BUILD.configure.log" 2>&1 \
    || { cat "$BUILD.configure.log"; exit 1; }
fi
ninja -C "$BUILD" -j "$JOBS" qalora_cuda_emulated qalora_emu_selftest > "$BUILD.build.log" 2>&1 \
  || { tail -60 "$BUILD.build.log"; exit 1; }
log "build took $(( $(date +%s) - start )) s"
[ "$build_only" = 1 ] && exit 0

log "emulation layer and kernels, torch-free driver"
"$BUILD/csrc/emulation/qalora_emu_selftest"

log "tests/test_cuda.py against the emulated CUDA ops"
cd "$ROOT"
QALORA_CUDA_EMULATION=1 QALORA_CUDA_EMULATION_LIB="$BUILD/libqalora_cuda_emulated.so" \
  "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider "$@"

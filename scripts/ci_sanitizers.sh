#!/usr/bin/env bash
# Sanitizer runs, one stage per argument (default: emu-asan emu-tsan):
#   emu-asan   the emulated CUDA kernels (issue 14) under AddressSanitizer +
#              UBSan, from the torch-free driver (csrc/emulation/selftest.cpp:
#              exact-size buffers, so a read past a row's padding or past the
#              last row is reported)
#   emu-tsan   the same under ThreadSanitizer: each emulated CUDA thread is a
#              TSan fiber and only barriers order them, so a shared-memory race
#              between emulated threads is reported (TSan inside Python and
#              torch's OpenMP would report false positives: no torch here)
#   cpu-asan   the CPU extension built with -fsanitize=address,undefined in its
#              own build folder (build/cpu-asan, the package's editable build
#              untouched), and the op/kernel tests run against it with libasan
#              and libstdc++ preloaded (shared with the reliability issue)
# Any report fails the stage (halt_on_error / -fno-sanitize-recover).
#   QALORA_VENV   the environment with torch (default .venv)
#   QALORA_JOBS   parallel compile jobs (default 2)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QALORA_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
JOBS="${QALORA_JOBS:-2}"
export PATH="$VENV/bin:$PATH"
log() { printf '[sanitizers %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

emu_stage() {  # $1 = asan | tsan
  local name="$1" dir="$ROOT/build/emu-$1" start san=thread
  [ "$name" = asan ] && san="address,undefined"
  start=$(date +%s)
  cmake -S "$ROOT/csrc/emulation" -B "$dir" -G Ninja -DQALORA_EMU_SANITIZE="$san" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo > "$dir.log" 2>&1 || { cat "$dir.log"; return 1; }
  ninja -C "$dir" -j "$JOBS" qalora_emu_selftest >> "$dir.log" 2>&1 || { tail -40 "$dir.log"; return 1; }
  log "emu-$name: built in $(( $(date +%s) - start )) s; running the driver"
  start=$(date +%s)
  export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1" UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
  export TSAN_OPTIONS="halt_on_error=1"
  if [ "$name" = tsan ]; then
    # First the proof that TSan sees the emulated threads' races: one launch with a barrier removed.
    if "$dir/qalora_emu_selftest" --race-demo > "$dir/race-demo.log" 2>&1 \
        || ! grep -q "ThreadSanitizer: data race" "$dir/race-demo.log"; then
      cat "$dir/race-demo.log"; log "emu-tsan: a removed barrier went unreported"; return 1
    fi
    log "emu-tsan: a removed barrier is reported as a data race (as it must be)"
    "$dir/qalora_emu_selftest" --no-racy
  else
    "$dir/qalora_emu_selftest"
  fi
  log "emu-$name: clean ($(( $(date +%s) - start )) s)"
}

cpu_asan_stage() {
  local dir="$ROOT/build/cpu-asan" start libasan libstdcxx
  start=$(date +%s)
  cmake -S "$ROOT" -B "$dir" -G Ninja -DQALORA_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
    -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
    -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
    > "$dir.log" 2>&1 || { cat "$dir.log"; return 1; }
  ninja -C "$dir" -j "$JOBS" _C >> "$dir.log" 2>&1 || { tail -40 "$dir.log"; return 1; }
  log "cpu-asan: built in $(( $(date +%s) - start )) s"
  # The package from the source tree with this _C in front of the editable one.
  local pkg="$dir/pkg"
  rm -rf "$pkg" && mkdir -p "$pkg"
  cp -r "$ROOT/python/qalora_ext" "$pkg/"
  rm -f "$pkg"/qalora_ext/_C*.so
  cp "$dir"/_C*.so "$pkg/qalora_ext/"
  libasan="$(g++ -print-file-name=libasan.so)"
  libstdcxx="$(g++ -print-file-name=libstdc++.so)"
  start=$(date +%s)
  cd "$ROOT"
  LD_PRELOAD="$libasan $libstdcxx" PYTHONPATH="$pkg" \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:detect_odr_violation=0" UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
    "$PY" -m pytest tests/test_ops.py tests/test_cpu_fast_paths.py tests/test_format.py tests/test_fake_kernels.py \
      -q -p no:cacheprovider -x
  log "cpu-asan: clean ($(( $(date +%s) - start )) s)"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(emu-asan emu-tsan)
for stage in "${stages[@]}"; do
  case "$stage" in
    emu-asan) emu_stage asan ;;
    emu-tsan) emu_stage tsan ;;
    cpu-asan) cpu_asan_stage ;;
    *) echo "unknown stage '$stage' (emu-asan, emu-tsan, cpu-asan)" >&2; exit 2 ;;
  esac
done

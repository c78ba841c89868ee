#!/usr/bin/env bash
# CI: build the CUDA extension on a machine without a GPU, in a second virtual
# environment with a CUDA build of torch (2.14.1, CUDA 13.0) and the installed
# nvcc, for sm_80 and sm_90. Prints the build time and the ptxas resource
# report (registers, spills per kernel), then checks that every op has a CUDA
# kernel registered and runs the CPU op tests against this build.
#   QALORA_CUDA_VENV   the environment (default ~/.cache/qalora_ext/venv-cu130)
#   QALORA_CUDA_TORCH  the torch to install there (default torch==2.14.1)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QALORA_CUDA_VENV:-$HOME/.cache/qalora_ext/venv-cu130}"
TORCH_SPEC="${QALORA_CUDA_TORCH:-torch==2.14.1}"
BUILD_DIR="$VENV/build-qalora"
log() { printf '[cuda-build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if ! command -v nvcc >/dev/null; then
  log "no nvcc on PATH: the CUDA build check needs a CUDA toolkit; skipped"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"  # cmake >= 3.26 and ninja from the environment
log "installing $TORCH_SPEC and the build requirements (a no-op when present)"
"$PY" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC" numpy "safetensors>=0.4" tqdm pytest \
  "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.26" 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -c "import torch; assert torch.version.cuda, 'expected a CUDA build of torch'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

log "building qalora_ext with QALORA_CUDA=ON for sm_80 and sm_90 (from scratch: the full compile time and ptxas report)"
rm -rf "$BUILD_DIR"
start=$(date +%s)
cd "$ROOT"
"$PY" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -v --force-reinstall \
  -C build-dir="$BUILD_DIR" -C cmake.define.QALORA_CUDA=ON -C 'cmake.define.QALORA_CUDA_ARCHS=80;90' . \
  > "$VENV/build.log" 2>&1 || { tail -60 "$VENV/build.log"; exit 1; }
log "build took $(( $(date +%s) - start )) s"
grep "qalora_ext:" "$VENV/build.log" | sed 's/^ *//'
echo "ptxas resource report (kernel: registers, spills):"
awk '/Compiling entry function/ { match($0, /function .[^ ]*. for .sm_[0-9]+./); f = substr($0, RSTART + 9, RLENGTH - 9) }
     /spill stores/ { match($0, /[0-9]+ bytes spill stores, [0-9]+ bytes spill loads/); sp = substr($0, RSTART, RLENGTH) }
     /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); print "  " f ": " substr($0, RSTART, RLENGTH) ", " sp }' \
  "$VENV/build.log" | "$VENV/bin/python" -c "import sys, subprocess; print(subprocess.run(['c++filt'], input=sys.stdin.read(), capture_output=True, text=True).stdout, end='')" | sort -u

cd "$VENV"  # import the installed package, not the source tree
"$PY" - <<'PY'
import torch, qalora_ext
info = qalora_ext.build_info()
print("build_info:", info)
assert info["cuda_kernels"], "the CUDA build registered no CUDA kernels"
ops = ["quantize_rtn", "pack", "unpack", "dequantize", "qlinear", "qlinear_int8", "qlinear_grad_input"]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"qalora::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print("CUDA kernels registered for every op:", ", ".join(ops))
from qalora_ext import _C
print("CUDA paths by M:", _C.cuda_path_limits(), "(GEMV up to", _C.CUDA_GEMV_MAX_M, "rows at most)")
PY
log "CPU op tests against the CUDA build (torch $TORCH_SPEC)"
cd "$ROOT"
"$PY" -m pytest tests/test_ops.py tests/test_cpu_fast_paths.py tests/test_format.py -q -p no:cacheprovider -x

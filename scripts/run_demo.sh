#!/usr/bin/env bash
# Quick start, main job: set up what the demo needs (venv, torch, requirements,
# build, conversion of the default model; each skipped when already done),
# then run the demo: quantize SmolLM2 to INT3, fine-tune QA-LoRA adapters,
# merge, evaluate, generate. Extra arguments go to `qalora demo` (see
# `qalora demo --help`). The test clients (mlx, peft, llama-cpp-python) and
# pytest are not installed here: scripts/run_tests.sh adds them.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" main
step_start "default model (converted once into the cache)"
"$PY" -c "from qalora_ext.loading import default_model_folder; print('[setup] default model folder:', default_model_folder())"
step_end "default model"
setup_done
cd "$ROOT"
exec "$PY" -m qalora_ext demo "$@"

#!/usr/bin/env bash
# Quick start, main job: set up (if needed) and run the example.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" main
setup_done
exec "$PY" "$ROOT/examples/quickstart.py" "$@"

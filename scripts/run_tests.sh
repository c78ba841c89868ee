#!/usr/bin/env bash
# Quick start, tests: set up (if needed) what the main job needs plus the test
# requirements (pytest, and the real clients of the import/export tests unless
# QALORA_REAL_CLIENTS=0), then run the test suite.
# Extra arguments go to pytest (e.g. -k merge, -m "not slow").
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" tests
setup_done
cd "$ROOT"
exec "$PY" -m pytest tests -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Quick start, tests: set up (if needed) and run the test suite.
# Extra arguments go to pytest (e.g. -k merge, -m "not slow").
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
exec "$PY" -m pytest tests -q -p no:cacheprovider "$@"

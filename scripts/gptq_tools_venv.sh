#!/usr/bin/env bash
# A throwaway environment with the real GPTQ tools, for the slow tests that
# check the GPTQ importer against checkpoints those tools write
# (tests/test_import_gptq.py -m slow). It sees the project's .venv packages
# (torch, transformers, qalora_ext) through a .pth file and adds, without
# their dependency pins (GPTQModel asks for a newer torch than it needs on CPU):
#   auto-gptq 0.7.1   its QuantLinear packer (the tests load it without the
#                     package's top-level import, which fails on transformers 5)
#   GPTQModel 7.7.0   quantizes a tiny Llama on the CPU (GPTQMODEL_CPU_WORKERS=4)
# Usage:
#   bash scripts/gptq_tools_venv.sh [/tmp/gptqvenv]
#   QALORA_GPTQMODEL_PYTHON=/tmp/gptqvenv/bin/python QALORA_AUTOGPTQ_PYTHON=/tmp/gptqvenv/bin/python \
#     .venv/bin/python -m pytest tests/test_import_gptq.py -m slow
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-/tmp/gptqvenv}"
MAIN_SITE="$("$ROOT/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
python3 -m venv "$VENV"
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$MAIN_SITE" > "$SITE/zz_main.pth"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
  auto-gptq==0.7.1 gptqmodel==7.7.0 device-smi pypcre tokenicer logbar protobuf defuser threadpoolctl
"$VENV/bin/python" -c "import gptqmodel, torch; print('gptqmodel', gptqmodel.__version__, 'torch', torch.__version__)"

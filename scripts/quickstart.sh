#!/usr/bin/env bash
# Set up (once), then bake, verify and evaluate the quickstart recipe on the embedded SmolLM2-135M-Instruct into
# out/quickstart (evaluation data from $BAKEEDIT_DATA_DIR, default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${BAKEEDIT_DATA_DIR:-}" ] && [ -d ../shared/data ]; then export BAKEEDIT_DATA_DIR="$PWD/../shared/data"; fi
exec .venv/bin/bakeedit apply recipes/quickstart.yaml -o "${1:-out/quickstart}" --overwrite

#!/usr/bin/env bash
# Set up (once) and bake the quickstart recipe on the embedded SmolLM2-135M-Instruct into out/quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/bakeedit apply recipes/quickstart.yaml -o "${1:-out/quickstart}" --overwrite

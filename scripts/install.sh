#!/usr/bin/env bash
# Create .venv and install kiln into it: torch first (pinned CPU build), then kiln.
#   bash scripts/install.sh          core only (kiln demo, export, generate)
#   bash scripts/install.sh dev      everything that installs on a CPU machine + test tools
# An unpinned torch, or a package that wants a newer one, pulls a multi-GB CUDA build:
# torch is installed first and pinned so nothing else can replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==${KILN_TORCH_VERSION:-2.13.0}"
target="."
if [ -n "$extras" ]; then target=".[${extras}]"; fi
.venv/bin/python -m pip install --quiet -e "$target" "torch==${KILN_TORCH_VERSION:-2.13.0}"
.venv/bin/python -c "import kiln, torch; print(f'kiln {kiln.__version__} installed in .venv (torch {torch.__version__})')"

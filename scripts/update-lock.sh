#!/usr/bin/env bash
# Re-resolve the locked dependency set (requirements/*.txt, written by `uv pip compile` with
# hashes) and keep it only if the parity-critical tests pass on it.
#   bash scripts/update-lock.sh                    every package to its newest allowed version
#   bash scripts/update-lock.sh transformers ...   only the packages named
# The new set is installed into .venv-lock (a venv of its own), the tests run there, and only
# then are requirements/*.txt replaced. On failure the current lock stays and the new set is
# left in a temporary folder, named on the last line, for a look.
set -euo pipefail
cd "$(dirname "$0")/.."
uv="${UV:-.venv/bin/uv}"
if [ ! -x "$uv" ] && ! uv="$(command -v uv)"; then
  echo "update-lock: needs uv (in the dev extra): run 'bash scripts/install.sh dev' first" >&2
  exit 1
fi
upgrade=(--upgrade)
if [ $# -gt 0 ]; then
  upgrade=()
  for package in "$@"; do upgrade+=(--upgrade-package "$package"); done
fi
new="$(mktemp -d)"
cp requirements/*.txt "$new"/ 2>/dev/null || true  # uv keeps the pins of an existing output file unless upgraded

compile() {
  local out="$1"
  shift
  "$uv" pip compile --quiet --generate-hashes --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --find-links /opt/wheels \
    --constraint requirements/constraints.in \
    --custom-compile-command "bash scripts/update-lock.sh" -o "$new/$out" "$@"
}

echo "update-lock: resolving with $("$uv" --version)"
# dev is the whole tested set; every other file is resolved within it, so an extra installed
# beside the core gets exactly the versions the tests ran on (unannotated: their "via" would
# name the temporary folder, and dev.txt says why each package is there).
compile dev.txt "${upgrade[@]}" pyproject.toml --extra dev
within() { compile "$@" --constraint "$new/dev.txt" --no-annotate; }
within core.txt pyproject.toml
extras="$(python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"])')"
for extra in $extras; do
  case "$extra" in
    dev) ;;
    # onnxruntime-gpu replaces onnxruntime (the same module): the gpu set leaves it out.
    gpu) within gpu.txt "${upgrade[@]}" pyproject.toml --extra gpu --no-emit-package onnxruntime ;;
    *) within "$extra.txt" pyproject.toml --extra "$extra" ;;
  esac
done
within bootstrap.txt "${upgrade[@]}" requirements/bootstrap.in

echo "update-lock: installing the new set into .venv-lock"
KILN_LOCK_DIR="$new" KILN_VENV=.venv-lock bash scripts/install.sh dev
echo "update-lock: parity-critical tests on the new set"
if ! KILN_LOCK_DIR="$new" .venv-lock/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_lock.py tests/test_generate.py tests/test_blip.py tests/test_blip2.py; then
  echo "update-lock: tests failed on the new set; the lock is unchanged. New set: $new" >&2
  exit 1
fi
python3 scripts/lock_diff.py requirements "$new"
cp "$new"/*.txt requirements/
rm -rf "$new" .venv-lock
echo "update-lock: requirements/*.txt updated; commit them"

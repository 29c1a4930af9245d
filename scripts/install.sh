#!/usr/bin/env bash
# Create .venv and install kiln into it from the lock (requirements/*.txt, every file hashed).
#   bash scripts/install.sh               core only (kiln demo, export, generate, caption)
#   bash scripts/install.sh dev           everything that installs on a CPU machine + test tools
#   bash scripts/install.sh openvino,serve    the core plus the extras named
# The venv is made anew each time, so it holds exactly the locked set: nothing left over, nothing
# newer. torch is the CPU build of the lock (an unpinned torch pulls a multi-GB CUDA build).
# KILN_VENV and KILN_LOCK_DIR (defaults .venv and requirements) are for scripts/update-lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${KILN_VENV:-.venv}"
lock="${KILN_LOCK_DIR:-requirements}"
# Every extra's file holds the core too, resolved within the one tested set (dev.txt).
sets=()
IFS=, read -ra extras <<<"${1:-}"
for extra in "${extras[@]}"; do
  if [ ! -f "$lock/$extra.txt" ]; then
    known="$(cd "$lock" && ls -- *.txt | sed 's/\.txt$//' | grep -vx -e bootstrap -e core | paste -sd, -)"
    echo "install.sh: no extra named '$extra' (extras: $known)" >&2
    exit 2
  fi
  sets+=("$extra")
done
[ ${#sets[@]} -gt 0 ] || sets=(core)

python3 -m venv --clear "$venv"
pip=("$venv/bin/python" -m pip install --quiet --require-hashes)
"${pip[@]}" -r "$lock/bootstrap.txt"
for set in "${sets[@]}"; do
  echo "install.sh: installing the locked '$set' set into $venv"
  "${pip[@]}" -r "$lock/$set.txt"
done
"$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
if [[ " ${sets[*]} " == *" dev "* ]]; then
  # The serve page's test drives Debian's Chromium: a system package, installed as root.
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    bash scripts/install-browser.sh
  else
    echo "install.sh: not root: the page test will skip until scripts/install-browser.sh runs"
  fi
fi
"$venv/bin/python" -c "import kiln, torch; print(f'kiln {kiln.__version__} installed in $venv (torch {torch.__version__})')"

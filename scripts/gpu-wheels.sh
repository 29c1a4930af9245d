#!/usr/bin/env bash
# Fill gpu-wheels/ with what scripts/gpu-check.sh installs on a GPU machine without a package
# registry. Such a machine is expected to hold Python 3.12, a CUDA build of torch,
# transformers, onnx, onnxruntime and nvidia-ml-py (and what they depend on); this folder
# carries the rest of kiln's core and of the GPU tests, at the locked versions
# (requirements/dev.txt, hashes checked), as wheels for CPython 3.12 on manylinux_2_28 x86_64.
#   bash scripts/gpu-wheels.sh [FOLDER]      default gpu-wheels/ (git-ignored); at most 40 MiB
#   KILN_WHEELS_PYTHON=3.11 bash scripts/gpu-wheels.sh /tmp/w311    for another Python
# Left out on purpose:
# - scipy (35 MB, over the folder's budget): kiln's SSIM computes its Gaussian blur in numpy;
#   diffusers needs scipy only for schedulers' optional beta sigmas;
# - torch, onnxruntime-gpu, tensorrt: multi-GB CUDA wheels; gpu-check.sh skips what needs
#   them and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-wheels}"
python_version="${KILN_WHEELS_PYTHON:-3.12}"
limit_mib=40
lock=requirements/dev.txt
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3

# kiln's core beyond the machine's packages: diffusers and its own requirements, the ONNX
# exporter's onnxscript, pillow, psutil; the CLI (typer, rich and theirs: transformers brings
# them through huggingface-hub 2, older ones do not); pytest for the GPU tests.
# gpu-check.sh installs only those the machine lacks.
packages=(
  diffusers importlib-metadata zipp lazy-importer requests urllib3 certifi charset-normalizer idna
  pillow onnxscript onnx-ir psutil
  typer click shellingham rich markdown-it-py mdurl pygments annotated-doc
  pydantic pydantic-core annotated-types typing-inspection
  pytest pluggy iniconfig pytest-timeout
)

requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT
for package in "${packages[@]}"; do
  # The pin and its hash lines, as the lock has them.
  block="$(awk -v name="$package" '
    tolower($0) ~ "^" tolower(name) "==" { keep = 1; print; next }
    keep && /^    --hash/ { print; next }
    { keep = 0 }' "$lock")"
  if [ -z "$block" ]; then
    echo "gpu-wheels: $package is not in $lock" >&2
    exit 1
  fi
  printf '%s\n' "${block%\\}" | sed '$ s/ \\$//' >>"$requirements"
done

rm -rf "$out"
mkdir -p "$out"
echo "gpu-wheels: downloading ${#packages[@]} wheels for CPython $python_version into $out"
# pip takes --platform literally: the older manylinux tags a glibc 2.28 machine also runs
# are named too (pydantic-core ships manylinux_2_17 wheels only).
"$python" -m pip download --quiet --require-hashes --no-deps --only-binary=:all: \
  --python-version "$python_version" --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -r "$requirements" -d "$out"
ls -1 "$out"
size_kib="$(du -sk "$out" | cut -f1)"
wheels=("$out"/*.whl)
echo "gpu-wheels: ${#wheels[@]} wheels, $((size_kib / 1024)) MiB in $out"
if [ "$size_kib" -gt $((limit_mib * 1024)) ]; then
  echo "gpu-wheels: $out is over $limit_mib MiB" >&2
  exit 1
fi

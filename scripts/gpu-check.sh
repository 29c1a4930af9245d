#!/usr/bin/env bash
# The GPU check: on an NVIDIA machine, in under 10 minutes, with everything written to one
# folder ($OUT when set, else ./gpu-check-out):
#   1. the environment: what runs kiln here, and which GPU paths its packages allow;
#   2. `kiln doctor` (hardware, runtimes, target);
#   3. the `gpu`-marked tests the installed packages allow (tests/test_gpu.py, and
#      tests/test_tensorrt.py's where TensorRT is installed);
#   4. a short bench, SD 1.5 architecture with random weights, 512x512, 20 steps: diffusers
#      fp16 eager vs kiln's torch target on CUDA vs onnxruntime's CUDA provider vs TensorRT,
#      each where installed, in one run; then the plan kiln makes for that artifact here;
#   5. the same for BLIP base, 20 new tokens per caption.
# Every step prints a time line; summary.txt lists them. A step that would not finish within
# the budget (KILN_GPU_CHECK_BUDGET_S, default 570 s) is skipped with the reason.
#
# The Python that runs kiln, first that applies:
# - $KILN_PYTHON;
# - this checkout's .venv (scripts/install.sh gpu);
# - a venv made here from the machine's python3 that sees its site-packages (so its torch with
#   CUDA is the one used; torch is never installed), filled from gpu-wheels/ (made by
#   scripts/gpu-wheels.sh elsewhere) with what kiln needs and the machine lacks, without any
#   package registry; kiln itself is installed into it with --no-deps.
# What cannot travel (onnxruntime-gpu, TensorRT) is skipped where missing, with the reason.
#
#   bash scripts/gpu-check.sh                  everything
#   bash scripts/gpu-check.sh --setup-only     steps 1-2 only, and without needing a GPU
# shellcheck disable=SC2317  # the step functions are called through `step`
set -uo pipefail
started=$(date +%s)
budget=${KILN_GPU_CHECK_BUDGET_S:-570}
deadline=$((started + budget))
out="$(mkdir -p "${OUT:-gpu-check-out}" && cd "${OUT:-gpu-check-out}" && pwd)"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root" || exit 1
scratch="${KILN_GPU_SCRATCH:-${TMPDIR:-/tmp}/kiln-gpu-check}"
wheels="${KILN_GPU_WHEELS:-$root/gpu-wheels}"
setup_only=false
[ "${1:-}" = "--setup-only" ] && setup_only=true
summary="$out/summary.txt"
: >"$summary"
failures=0

say() { echo "gpu-check: $*" | tee -a "$summary"; }

elapsed() { echo $(($(date +%s) - started)); }

# watchdog PID SECONDS: stop process group PID once SECONDS have passed (and it still runs).
watchdog() {
  local pid="$1" left="$2"
  for ((i = 0; i < left; i++)); do
    sleep 1
    kill -0 "$pid" 2>/dev/null || return 0
  done
  kill -TERM -- "-$pid" 2>/dev/null
  sleep 10
  kill -KILL -- "-$pid" 2>/dev/null
}

# step NAME MIN MAX COMMAND...: skipped when less than MIN seconds of the budget are left,
# stopped after MAX seconds (or at the budget's end); the output goes to $out/NAME.log.
step() {
  local name="$1" need="$2" most="$3"
  shift 3
  local left=$((deadline - $(date +%s)))
  if [ "$left" -lt "$need" ]; then
    say "$name: skipped: needs about ${need} s, ${left} s of the budget left"
    return 1
  fi
  [ "$left" -gt "$most" ] && left="$most"
  local t0 rc pid
  t0=$(date +%s)
  # In a process group of its own (set -m), so the watchdog stops the step's children too.
  set -m
  "$@" >"$out/$name.log" 2>&1 &
  pid=$!
  set +m
  watchdog "$pid" "$left" &
  wait "$pid"
  rc=$?
  local took=$(($(date +%s) - t0))
  if [ "$rc" -eq 0 ]; then
    say "$name: ok in ${took} s (at $(elapsed) s)"
  elif [ "$took" -ge "$left" ]; then
    say "$name: stopped after ${took} s, its share of the budget (log: $name.log)"
    failures=$((failures + 1))
  else
    say "$name: FAILED (exit $rc) after ${took} s; last lines of $name.log:"
    tail -5 "$out/$name.log" | sed 's/^/    /' | tee -a "$summary"
    failures=$((failures + 1))
  fi
  return "$rc"
}

# ------------------------------------------------------------------------------ the GPU

gpu_names() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    nvidia-smi -L
  elif ls /proc/driver/nvidia/gpus/* >/dev/null 2>&1; then
    echo "NVIDIA driver lists: $(cd /proc/driver/nvidia/gpus && echo *)"
  fi
}
gpus="$(gpu_names)"
if [ -z "$gpus" ] && ! $setup_only; then
  say "no NVIDIA GPU on this machine (no nvidia-smi GPU, no /proc/driver/nvidia/gpus): nothing to check"
  say "finished in $(elapsed) s"
  exit 0
fi
say "GPU: ${gpus:-none (--setup-only)}"
say "results in $out; scratch in $scratch; budget ${budget} s"

# ------------------------------------------------------------------------- environment

make_venv() {
  local base="${KILN_BASE_PYTHON:-python3}" venv="${KILN_GPU_VENV:-$scratch/venv}"
  if ! "$base" -c 'import torch' 2>/dev/null; then
    echo "$base cannot import torch: install a CUDA build of torch for it (kiln never does)"
    return 1
  fi
  if [ ! -d "$wheels" ]; then
    echo "no $wheels: run scripts/gpu-wheels.sh on a machine with a package registry and copy it here"
    return 1
  fi
  "$base" -m venv --clear --system-site-packages "$venv" || return 1
  # Only the wheels whose distribution the machine lacks: its own versions stay in use.
  local missing
  missing="$("$venv/bin/python" - "$wheels" <<'PY'
import pathlib
import sys
from importlib import metadata

for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        metadata.version(wheel.name.split("-")[0])
    except metadata.PackageNotFoundError:
        print(wheel)
PY
)"
  echo "installing from $wheels:"
  echo "${missing:-  (nothing: the machine has them all)}"
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install --quiet --no-index --no-deps $missing || return 1
  fi
  if ! "$venv/bin/python" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .; then
    # No setuptools to build with: put the source on the path instead.
    echo "pip could not install kiln (no build backend offline); adding $root/src to the path"
    local site
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$root/src" >"$site/kiln-src.pth"
  fi
  echo "$venv/bin/python" >"$scratch/python"
}

mkdir -p "$scratch"
if [ -n "${KILN_PYTHON:-}" ]; then
  py="$KILN_PYTHON"
  say "python: \$KILN_PYTHON ($py)"
elif [ -x .venv/bin/python ]; then
  py="$root/.venv/bin/python"
  say "python: this checkout's .venv"
else
  step environment 20 120 make_venv || {
    say "no environment to run kiln in (environment.log says why)"
    exit 1
  }
  py="$(cat "$scratch/python")"
  say "python: a venv over the machine's python3 ($py), wheels from $wheels"
fi
PATH="$(dirname "$py"):$PATH"
export PATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
kiln() { "$py" -c 'import sys; from kiln.cli import main; sys.argv[0] = "kiln"; sys.exit(main())' "$@"; }

# What this environment can run: one line per GPU path, and the versions.
"$py" - >"$out/paths.txt" 2>&1 <<'PY'
import importlib.util
from importlib import metadata


def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


import torch

cuda = torch.cuda.is_available()
print(f"python {__import__('platform').python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}")
for name in ("transformers", "diffusers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
             "tensorrt", "tensorrt-cu12", "nvidia-ml-py", "scipy", "kiln"):
    print(f"  {name} {version(name) or '-'}")
print("torch_cuda", "yes" if cuda else f"no: torch {torch.__version__} is not a CUDA build or sees no GPU")
try:
    import onnxruntime
    providers = onnxruntime.get_available_providers()
    ok = "CUDAExecutionProvider" in providers
    print("ort_cuda", "yes" if ok else f"no: onnxruntime {onnxruntime.__version__} has {', '.join(providers)} (onnxruntime-gpu cannot travel: pip install 'kiln[gpu]' where a registry is reachable)")
except ImportError as exc:
    print("ort_cuda", f"no: {exc}")
trt = importlib.util.find_spec("tensorrt") is not None
print("tensorrt", "yes" if trt else "no: TensorRT is not installed (its multi-GB wheels cannot travel: pip install 'kiln[gpu]')")
if cuda:
    print("gpu", torch.cuda.get_device_name(0), "sm", ".".join(map(str, torch.cuda.get_device_capability(0))))
PY
tee -a "$summary" <"$out/paths.txt"
has() { grep -q "^$1 yes" "$out/paths.txt"; }

step doctor 10 60 kiln doctor
kiln doctor --json >"$out/doctor.json" 2>/dev/null

if $setup_only; then
  say "--setup-only: stopping after the environment and kiln doctor ($(elapsed) s)"
  exit $((failures > 0))
fi
if ! has torch_cuda; then
  say "torch cannot use the GPU here: every GPU path below needs it; stopping"
  exit 1
fi

# ------------------------------------------------------------------------------ tests

tests=(tests/test_gpu.py)
if ! has tensorrt; then
  say "tests/test_tensorrt.py: not run: $(grep '^tensorrt' "$out/paths.txt" | cut -d' ' -f2-)"
elif [ -f tests/test_tensorrt.py ]; then
  tests+=(tests/test_tensorrt.py)
fi
step gpu-tests 90 150 "$py" -m pytest -m gpu -q -p no:cacheprovider -p no:randomly -rs \
  --junitxml="$out/gpu-tests.xml" "${tests[@]}"

# -------------------------------------------------------------------------- the bench

# The SD 1.5 artifact is prepared one runtime at a time, so what does not fit in the budget
# (TensorRT engine builds, the longest) leaves the others to be benched; the bench then runs
# every variant that was prepared, in one run.
sd="$scratch/sd15-kiln"
components=(-c text_encoder -c unet -c vae_decoder)
sd_variants=()

prepare_sd15_torch() {
  rm -rf "$scratch/sd15" "$sd"
  "$py" -c "from kiln.models.tiny import save_pipeline; save_pipeline('sd15', '$scratch/sd15', seed=0)" || return 1
  kiln export "$scratch/sd15" -o "$sd" -t torch "${components[@]}" || return 1
  # An fp16 cast; its drift is measured on the GPU, kept short (1 prompt, 2 steps, 256 px).
  kiln quantize "$sd" --precision fp16 -t torch --calibration 1 --steps 2 --size 256
}

prepare_sd15_onnx() {
  kiln export "$scratch/sd15" -o "$sd" -t onnx "${components[@]}" || return 1
  kiln quantize "$sd" --precision fp16 -t onnx --calibration 1 --steps 2 --size 256
}

prepare_sd15_tensorrt() {
  # Engines are built from the onnx fp32 graphs (exported here unless onnx ran above).
  if [ ! -d "$sd/unet/onnx-fp32" ]; then
    kiln export "$scratch/sd15" -o "$sd" -t onnx "${components[@]}" || return 1
  fi
  kiln export "$sd" -o "$sd" -t tensorrt "${components[@]}" --static 512x512 --max-batch 1 \
    --precision fp16
}

bench_sd15() {
  kiln bench "$sd" "${sd_variants[@]}" --baseline torch --baseline torch-cuda-fp16 \
    --size 512 --steps 20 --repeats 2 --warmup 1 --json "$out/bench-sd15.json" || return 1
  kiln doctor "$sd" >"$out/plan-sd15.txt" 2>&1
}

blip="$scratch/blip-kiln"
blip_targets=(-t torch)
blip_variants=(--variant torch:fp16@cuda)
if has ort_cuda; then
  blip_targets+=(-t onnx)
  blip_variants+=(--variant onnx:fp16@cuda)
fi

prepare_blip() {
  rm -rf "$scratch/blip" "$blip"
  "$py" -c "from kiln.models.tiny_captioning import save_model; save_model('blip-base', '$scratch/blip', seed=0)" || return 1
  kiln export "$scratch/blip" -o "$blip" "${blip_targets[@]}" || return 1
  kiln quantize "$blip" --precision fp16 "${blip_targets[@]}" --calibration 1
}

bench_blip() {
  kiln bench "$blip" "${blip_variants[@]}" --baseline torch --max-new-tokens 20 --repeats 3 \
    --warmup 1 --json "$out/bench-blip.json" || return 1
  kiln doctor "$blip" >"$out/plan-blip.txt" 2>&1
}

# MIN and MAX seconds per step come from the CPU-side work measured on a 2-core CPU (see the
# README's GPU section): a step that cannot finish is skipped rather than cut. The benches
# keep RESERVE seconds for themselves from the preparation steps.
reserve=200
budget_for() { echo $((deadline - $(date +%s) - reserve)); }

if step sd15-torch 90 240 prepare_sd15_torch; then
  sd_variants+=(--variant torch:fp16@cuda)
  if ! has ort_cuda; then
    say "sd15-onnx: skipped: $(grep '^ort_cuda' "$out/paths.txt" | cut -d' ' -f2-)"
  elif step sd15-onnx 120 "$(budget_for)" prepare_sd15_onnx; then
    sd_variants+=(--variant onnx:fp16@cuda)
  fi
  if ! has tensorrt; then
    say "sd15-tensorrt: skipped: $(grep '^tensorrt' "$out/paths.txt" | cut -d' ' -f2-)"
  elif step sd15-tensorrt 180 "$(budget_for)" prepare_sd15_tensorrt; then
    sd_variants+=(--variant tensorrt:fp16)
  fi
  reserve=90  # BLIP's share
  step sd15-bench 60 "$(budget_for)" bench_sd15
fi
reserve=0
step blip-prepare 45 120 prepare_blip && step blip-bench 30 100 bench_blip

# Markdown tables of the benches, for the README and the closing note.
for report in "$out"/bench-*.json; do
  [ -f "$report" ] || continue
  "$py" -c "import json, sys; from kiln.bench.report import markdown; print(markdown(json.load(open(sys.argv[1]))))" \
    "$report" >"${report%.json}.md" 2>>"$out/markdown.log" && tee -a "$summary" <"${report%.json}.md"
done

say "finished in $(elapsed) s with $failures failed step(s)"
exit $((failures > 0))

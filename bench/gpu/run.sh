#!/usr/bin/env bash
# GPU verification of issue 15 in one command: install the carried wheels, run every check.
#
#   bash bench/gpu/run.sh               # on the GPU machine: results in $OUT (else bench/results/gpu)
#   bash bench/gpu/run.sh --dry-run     # anywhere: the same code on the CPU with tiny sizes (CI)
#
# Options of this script (the rest go to bench/gpu/run.py: --only, --budget-s, --cifar, --work,
# --keep-work; see --help):
#   --dry-run        CPU, tiny sizes; nothing is installed (the checkout's environment is used)
#   --out DIR        result directory (default: $OUT when set, else bench/results/gpu)
#   --no-install     use the Python environment as it is
#   --wheels DIR     carried wheels (default: .whl), pinned by bench/gpu/wheels.txt
#   --target DIR     where they are installed (default: /tmp/advguard-site)
#   --python PY      interpreter (default: .venv/bin/python if present, else python3)
#
# Why a target directory: the machine's own Python holds its CUDA torch; the carried wheels are
# the service's other dependencies, installed with --no-index --no-deps beside it and put first
# on PYTHONPATH, so nothing of the image is touched. Prepare .whl and .gpudata here first with
# `python -m bench.gpu.prepare` (docs/deploy.md, GPU verification).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

dry_run=0
install=1
out=${OUT:-bench/results/gpu}
wheels=.whl
target=/tmp/advguard-site
python=""
forward=()
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1; install=0; forward+=(--dry-run) ;;
    --no-install) install=0 ;;
    --out|--wheels|--target|--python)
      (($# >= 2)) || { echo "run.sh: $1 needs a value" >&2; exit 2; }
      case "$1" in
        --out) out=$2 ;; --wheels) wheels=$2 ;; --target) target=$2 ;; --python) python=$2 ;;
      esac
      shift ;;
    -h|--help) usage; echo; forward+=(--help) ;;
    *) forward+=("$1") ;;
  esac
  shift
done
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# Options first (no torch import): a typo costs nothing, not an install.
"$python" -m bench.gpu.run --parse-only "${forward[@]}" --out "$out" || exit $?
for arg in "${forward[@]}"; do [[ "$arg" == --help ]] && exit 0; done

# The wheel list is checked on every run (format, tags, one version each, sizes).
"$python" -m bench.gpu.wheels check
if ((install)); then
  started=$(date +%s%N)
  "$python" -m bench.gpu.wheels verify --dir "$wheels"
  mapfile -t files < <("$python" -m bench.gpu.wheels files --dir "$wheels")
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$target" "${files[@]}"
  export PYTHONPATH="$target:$PYTHONPATH"
  ms=$(( ($(date +%s%N) - started) / 1000000 ))
  ADVGUARD_GPU_INSTALL_S=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
  export ADVGUARD_GPU_INSTALL_S
  echo "run.sh: ${#files[@]} wheels installed into $target in ${ADVGUARD_GPU_INSTALL_S} s"
fi

mkdir -p "$out"
set -o pipefail
"$python" -m bench.gpu.run "${forward[@]}" --out "$out" 2>&1 | tee "$out/run.log"

#!/usr/bin/env bash
# alignflow's SFT, sampling and DPO code paths on one CUDA GPU vs plain TRL defaults, and its GRPO step
# (bench/device_check.py); on a machine with several GPUs also the SFT path launched on all of them (DDP),
# against one process.
#
#   bash bench/fetch_device_wheels.sh                 # here: the wheels the GPU image lacks -> bench/wheels/
#   bash bench/device_check.sh OUT.json               # on the GPU machine (carry bench/wheels), <= 8 min
#   bash bench/device_check.sh --dry-run OUT.json     # here, on CPU: everything but the CUDA calls
#
# The GPU image has torch, transformers, peft, accelerate, pyarrow and pandas but no trl or datasets (nor
# prefect, mlflow, pydantic, which these code paths do not import: the script checks sys.modules at the
# end, dry run included); what is missing is installed from bench/wheels into a private folder, nothing
# is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; shift; fi
OUT=${1:?usage: bash bench/device_check.sh [--dry-run] OUT.json}
# DISABLE_MLFLOW_INTEGRATION: TRL's GRPO profiling imports mlflow (and so pydantic) wherever it is installed; the
# GPU image has neither, so the dry run here must not either
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 DO_NOT_TRACK=true DISABLE_MLFLOW_INTEGRATION=TRUE

if [ -n "$DRY" ]; then  # the project's venv; the script fails if prefect, mlflow or pydantic got imported
    PYTHONPATH="$PWD" ${PYTHON:-.venv/bin/python} bench/device_check.py --dry-run --out "$OUT"
    exit 0
fi

PY=${PYTHON:-python3}
PRIVATE=$(mktemp -d)
trap 'rm -rf "$PRIVATE"' EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
missing() { ! $PY -c "import $1" 2>/dev/null; }
install() { $PY -m pip install --quiet --no-index --no-deps --target "$PRIVATE" "$@"; }
[ -d bench/wheels ] || { echo "bench/wheels missing: run bench/fetch_device_wheels.sh here and carry it"; exit 2; }
for module in dill multiprocess xxhash fsspec; do
    if missing "$module"; then install bench/wheels/"$module"-*.whl; fi
done
if missing datasets; then
    # datasets 5.x wants pyarrow >= 24 and huggingface-hub >= 1.31; older images get datasets 4.8
    if $PY -c "import pyarrow, huggingface_hub as h; from packaging.version import Version as V; \
assert V(pyarrow.__version__) >= V('24') and V(h.__version__) >= V('1.31')" 2>/dev/null; then
        install bench/wheels/datasets-5.*.whl
    else
        install bench/wheels/datasets-4.*.whl
    fi
fi
if missing trl; then install bench/wheels/trl-*.whl; fi
PYTHONPATH="$PRIVATE:$PWD" $PY bench/device_check.py --out "$OUT"

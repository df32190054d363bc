#!/bin/sh
# MLflow's tracking server as infra/compose.yaml runs it (and tests/test_team_servers.py, natively):
# PostgreSQL backend store, artifacts proxied by the server to MLFLOW_ARTIFACTS_DESTINATION (s3://mlflow in
# compose), MLflow's basic-auth app. The auth store's URI can only be given in an ini file, so it is written
# here from the environment (mode 600). Needs MLFLOW_DB_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY, and on the
# first start MLFLOW_AUTH_ADMIN_PASSWORD (MLflow refuses to start otherwise).
set -eu
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}" "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"
DB="${MLFLOW_DB_USER:-mlflow}:${MLFLOW_DB_PASSWORD}@${MLFLOW_DB_HOST:-postgres}:${MLFLOW_DB_PORT:-5432}"
AUTH_INI=${MLFLOW_AUTH_INI:-/tmp/mlflow-basic-auth.ini}
umask 077
printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = postgresql://%s/%s\nadmin_username = %s\n' \
    "$DB" "${MLFLOW_AUTH_DB:-mlflow_auth}" "${MLFLOW_AUTH_ADMIN_USERNAME:-admin}" > "$AUTH_INI"
export MLFLOW_AUTH_CONFIG_PATH="$AUTH_INI"
export MLFLOW_BACKEND_STORE_URI="postgresql://$DB/${MLFLOW_DB:-mlflow}"   # not on the command line: ps shows that
exec mlflow server --app-name basic-auth --serve-artifacts \
    --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-s3://mlflow}" \
    --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" "$@"

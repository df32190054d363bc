#!/bin/sh
# The first start of infra/compose.yaml's PostgreSQL: a database and an owner each for MLflow's tracking
# store, MLflow's auth store and Prefect, with the passwords from the environment; pg_trgm for Prefect.
set -eu
psql -v ON_ERROR_STOP=1 --username postgres \
     -v mlflow_pw="$MLFLOW_DB_PASSWORD" -v prefect_pw="$PREFECT_DB_PASSWORD" <<'SQL'
CREATE USER mlflow WITH PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE USER prefect WITH PASSWORD :'prefect_pw';
CREATE DATABASE prefect OWNER prefect;
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL

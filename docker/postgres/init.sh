#!/usr/bin/env bash
# The roles and databases of pipeline/stack/postgres.py (`provision`), for the official
# postgres image: /docker-entrypoint-initdb.d runs this once, on an empty data volume.
#
# One role per database (airflow, mlflow, superset, telemetry) plus telemetry_reader,
# read-only on telemetry, which the dashboards and the live page use. The passwords
# come from the environment (the same .env variables as the local stack) and have no
# default: a missing one stops the initialisation. They reach psql through \getenv,
# never through a command line, so they do not show in `ps`.
#
# Unlike `make up`, which sets the passwords again on every start, this runs only on
# an empty volume: after changing a password in .env, run ALTER ROLE ... PASSWORD as
# the postgres superuser, or start from a fresh volume (docker compose down -v).
set -eo pipefail  # no -u: the entrypoint may source this file rather than run it

: "${AIRFLOW_DB_PASSWORD:?is not set: generate .env first (README, With Docker)}"
: "${MLFLOW_DB_PASSWORD:?is not set: generate .env first (README, With Docker)}"
: "${SUPERSET_DB_PASSWORD:?is not set: generate .env first (README, With Docker)}"
: "${TELEMETRY_DB_PASSWORD:?is not set: generate .env first (README, With Docker)}"
: "${TELEMETRY_READER_PASSWORD:?is not set: generate .env first (README, With Docker)}"

# The entrypoint's temporary server listens on its socket only; PGPASSWORD is set by it.
psql=(psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --no-password)

"${psql[@]}" --dbname postgres <<'SQL'
\getenv airflow_pw AIRFLOW_DB_PASSWORD
\getenv mlflow_pw MLFLOW_DB_PASSWORD
\getenv superset_pw SUPERSET_DB_PASSWORD
\getenv telemetry_pw TELEMETRY_DB_PASSWORD
\getenv reader_pw TELEMETRY_READER_PASSWORD

CREATE ROLE airflow LOGIN PASSWORD :'airflow_pw';
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE ROLE superset LOGIN PASSWORD :'superset_pw';
CREATE ROLE telemetry LOGIN PASSWORD :'telemetry_pw';
CREATE ROLE telemetry_reader LOGIN PASSWORD :'reader_pw';

CREATE DATABASE airflow OWNER airflow;
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE superset OWNER superset;
CREATE DATABASE telemetry OWNER telemetry;

-- Each role reaches its own database only (PUBLIC may connect by default).
REVOKE CONNECT ON DATABASE airflow FROM PUBLIC;
REVOKE CONNECT ON DATABASE mlflow FROM PUBLIC;
REVOKE CONNECT ON DATABASE superset FROM PUBLIC;
REVOKE CONNECT ON DATABASE telemetry FROM PUBLIC;

ALTER ROLE telemetry_reader SET default_transaction_read_only = on;
GRANT CONNECT ON DATABASE telemetry TO telemetry_reader;
SQL

"${psql[@]}" --dbname telemetry <<'SQL'
GRANT USAGE ON SCHEMA public TO telemetry_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO telemetry_reader;
-- Tables the writer creates later (the migrations run when a producer, consumer or
-- DAG first starts) are readable by the dashboards too.
ALTER DEFAULT PRIVILEGES FOR ROLE telemetry IN SCHEMA public GRANT SELECT ON TABLES TO telemetry_reader;
SQL

echo "f1: roles and databases ready (airflow, mlflow, superset, telemetry, telemetry_reader)"

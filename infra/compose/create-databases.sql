-- One login role per server, each owning its own databases and nothing else: `prefect` (the Prefect server's
-- database) and `mlflow` (MLflow's tracking store and its user store). The postgres image runs this file once, as
-- the superuser, on the first start of an empty volume; run it again to set new passwords:
--   docker compose -f infra/compose.yaml exec postgres psql -v ON_ERROR_STOP=1 -U influence -d postgres \
--     -f /docker-entrypoint-initdb.d/create-databases.sql
-- The passwords come from the container's environment through psql's \getenv, never from a command line.
\getenv prefect_password PREFECT_DB_PASSWORD
\getenv mlflow_password MLFLOW_DB_PASSWORD
\if :{?prefect_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'PREFECT_DB_PASSWORD is not set'; END $$;
\endif
\if :{?mlflow_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'MLFLOW_DB_PASSWORD is not set'; END $$;
\endif

SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'prefect') AS create_prefect,
       NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlflow') AS create_mlflow \gset
\if :create_prefect
  CREATE ROLE prefect;
\endif
\if :create_mlflow
  CREATE ROLE mlflow;
\endif
ALTER ROLE prefect WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'prefect_password';
ALTER ROLE mlflow WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'mlflow_password';

SELECT NOT EXISTS (SELECT FROM pg_database WHERE datname = 'prefect') AS create_prefect_db,
       NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow') AS create_mlflow_db,
       NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow_auth') AS create_mlflow_auth_db \gset
\if :create_prefect_db
  CREATE DATABASE prefect OWNER prefect;
\endif
\if :create_mlflow_db
  CREATE DATABASE mlflow OWNER mlflow;
\endif
\if :create_mlflow_auth_db
  CREATE DATABASE mlflow_auth OWNER mlflow;
\endif
-- no other role may connect (the owners and the superuser still can)
REVOKE ALL ON DATABASE postgres, prefect, mlflow, mlflow_auth FROM PUBLIC;

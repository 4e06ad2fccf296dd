-- The MLflow tracking store and MLflow's user store, beside the Prefect database (POSTGRES_DB) of the same server.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;

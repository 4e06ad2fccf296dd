"""WHAT the user sees outside the artifacts: figures (``figures``), the MLflow runs (``mlflow_runs``, the only
module that talks to MLflow) and the Prefect artifacts (``prefect_artifacts``).
"""

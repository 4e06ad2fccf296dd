"""THE RULES every stage shares: the workspace's paths and stage results (``workspace``), the ``Experiment`` a
stage reads through (``experiment``), the training recipes (``recipes``) and the retraining engine
(``retraining``). No Prefect, DVC command or MLflow here.
"""

"""WHEN a stage runs again: its fingerprint and skipping, kept versions here and in the object store
(``stage_cache``, ``object_store``), and the same dependencies written into ``dvc.yaml`` (``dvc_yaml``).
"""

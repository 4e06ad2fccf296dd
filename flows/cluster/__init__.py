"""WHERE work runs beyond this process (the ``cluster`` settings section): task runners (``runners``), shards on
Dask (``shards``), a worker's workspace fetched from the object store (``worker_workspace``), deployments from a
git commit (``git_deployments``).
"""

"""The pipeline around the :mod:`influence` library: Prefect flows, DVC versioning, MLflow reports.

The top level holds the flows and what starts them::

    cli.py          python -m flows.cli run | stage | check | dvc-yaml | explain | deploy-git
    pipeline.py     @flow pipeline (every stage, in order) and @flow retrainings
    attribution.py  @flow attribution (the GPU stages) and @flow shards
    explain.py      @flow explain (new sentences, answered from the saved indexes)
    tasks.py        the Prefect tasks the flows share

Below it, one folder per layer; a folder imports only the folders below it (``tests/test_layers.py``):

    definition/   WHAT the pipeline is: settings, the stage table (declarations only), what a stage may read
    guards/       WHAT an operator can rely on: the workspace lock, waits, stopping, what a run form may reach
    experiment/   THE RULES stages share: workspace, Experiment, training recipes, the retraining engine
    versioning/   WHICH data a run used: reading the data version, and DVC's commands
    reporting/    WHAT the user sees: figures, MLflow runs, Prefect artifacts
    stages/       WHAT each stage computes: one module per stage (run, score, plan, report_section)
    incremental/  WHEN a stage runs again: fingerprints, kept versions, the object store, dvc.yaml
    answers/      WHAT a new query gets: the explain flow's library calls
    cluster/      WHERE work runs beyond this process: task runners, shards, worker workspaces, git deployments

Where to add what (docs/extending.md walks through each): a method (``influence/methods/``, then
``flows/stages/<name>.py`` with ``score`` and one row of the stage table), a stage (``flows/stages/<name>.py``
and one row), a solver (``influence/solvers/``), a model family (``influence/models/`` and ``model.family``),
a flow (a top-level module), a deployment (``prefect.yaml``).
"""

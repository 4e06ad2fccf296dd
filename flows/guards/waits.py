"""Every wait of a run has an end: the limits, from the environment, and what happens when one is reached.

- the workspace (:mod:`flows.guards.workspace_lock`): ``$INFLUENCE_WORKSPACE_WAIT_SECONDS``, default 600 s;
- the DVC slot of a workspace (an ``flock`` in ``.dvc/tmp``): ``$INFLUENCE_DVC_SLOT_SECONDS``,
  default 900 s;
- the GPU stages run as another deployment (``gpu_deployment``), queueing included:
  ``$INFLUENCE_GPU_STAGES_SECONDS``, default 6 hours; past it the child run is cancelled.

A wait that reaches its limit fails the run with a message naming what it waited for.
"""

from __future__ import annotations

import os

WORKSPACE_ENV, WORKSPACE_SECONDS = "INFLUENCE_WORKSPACE_WAIT_SECONDS", 600.0
DVC_SLOT_ENV, DVC_SLOT_SECONDS = "INFLUENCE_DVC_SLOT_SECONDS", 900.0
GPU_STAGES_ENV, GPU_STAGES_SECONDS = "INFLUENCE_GPU_STAGES_SECONDS", 6 * 3600.0


def seconds(variable: str, default: float) -> float:
    """The limit ``$variable`` sets (seconds, at least 0), else ``default``; a bad value is named."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${variable}={raw!r} is not a number of seconds (e.g. {default:.0f})") from None
    if not 0 <= value < float("inf"):
        raise ValueError(f"${variable}={raw!r} must be a finite number of seconds, at least 0")
    return value


def cancel_flow_run(flow_run_id) -> None:
    """Ask the Prefect server to cancel a flow run (one that outlived its wait)."""
    from prefect import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message="its parent stopped waiting for it"), force=True)

"""The ``tracin_last`` stage: TracIn over the finetuning checkpoints, on the classifier's last layer."""

from __future__ import annotations

from typing import Any

from flows.experiment.experiment import Experiment
from flows.stages.entry import attribute_queries


def score(x: Experiment, mode: str) -> Any:
    """``[Q, N]`` last-layer TracIn scores of ``mode``'s queries over the finetuning examples."""
    return attribute_queries(x, mode, method="tracin", params="last", checkpoints=x.checkpoints(mode), batch_size=x.batch(512))

"""The ``grad_cos`` stage: the cosine of the query's and each example's gradients (``attribution.if_params``)."""

from __future__ import annotations

from typing import Any

from flows.experiment.experiment import Experiment
from flows.stages.entry import attribute_queries


def score(x: Experiment, mode: str) -> Any:
    """``[Q, N]`` gradient cosines of ``mode``'s queries and the finetuning examples."""
    return attribute_queries(x, mode, method="grad_cos", params=list(x.settings.attribution.if_params), batch_size=x.batch(512))

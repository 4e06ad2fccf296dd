"""The ``gradients`` stage: per-example training gradients cached on disk, per mode (its shards can run on a cluster)."""

from __future__ import annotations

from flows.experiment import recipes
from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult
from flows.stages.entry import stage


def gradient_cache_arguments(x: Experiment, mode: str) -> dict:
    """The arguments of the ``gradients`` stage's cache of ``mode`` (``GradientCache.build``, ``open``, ``gradient_shard``)."""
    from influence.gradients.layout import select_parameters

    model = x.finetuned(mode)
    return {"task": x.query_task, "model": model, "data": x.split("train"),
            "names": select_parameters(model, x.settings.attribution.if_params), "kind": "train_loss",
            "batch_size": x.batch(256), "device": x.device}


@stage("gradients")
def run(x: Experiment, result: StageResult) -> None:
    """Cache per-example training gradients (influence-function parameters) on disk, per mode."""
    from influence.gradients.cache import GradientCache

    for mode in x.settings.finetune.modes:
        cache = recipes.resume_or_replace(GradientCache(x.out_dir(mode)).build, **gradient_cache_arguments(x, mode))
        result.metrics[f"{mode}.parameters"] = float(cache.manifest["n_parameters"])
        result.outputs[mode] = x.relative(x.out_dir(mode))

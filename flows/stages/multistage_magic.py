"""The ``multistage_magic`` stage: multi-stage MAGIC, exact metagradients of the queries through both recorded runs
(pretraining, then finetuning) over the pretraining sentences."""

from __future__ import annotations

from typing import Any

from flows.experiment.experiment import Experiment


MAGIC_QUERY_GROUP = 8  # queries per multi-stage MAGIC call: the library's query batch (DEFAULT_BATCHED_QUERIES)


def score(x: Experiment, mode: str) -> Any:
    """Multi-stage MAGIC of the queries over the pretraining sentences, through both recorded runs of ``mode``.

    The queries go in groups of :data:`MAGIC_QUERY_GROUP`, the query batch the library's reverse pass takes
    anyway; each group's rows are saved as they complete (``x.partial_dir(mode)``), so a run killed within a
    mode resumes at its first missing group. Each group replays both runs forward once more (a small part of its
    cost: the reverse passes dominate)."""
    import torch

    from flows.experiment.recipes import finetune_recipe, pretrain_recipe
    from influence.exceptions import CorruptedArtifactError
    from influence.methods.magic import TrainingRecipe
    from influence.methods.multistage_magic import multistage_magic_scores
    from influence.models.checkpoints import load_state, save_state

    queries, rows, runs = x.split("queries"), [], None
    for start in range(0, len(queries), MAGIC_QUERY_GROUP):
        part = x.partial_dir(mode) / f"queries-{start:06d}.safetensors"
        try:
            rows.append(load_state(part)["scores"])
            continue
        except CorruptedArtifactError:  # not computed yet (or unreadable)
            pass
        if runs is None:  # both recorded runs, read once for every group left
            runs = (x.pretrained(), x.split("pretrain"), x.finetuned(mode), x.split("train"),
                    TrainingRecipe(**pretrain_recipe(x)), TrainingRecipe(**finetune_recipe(x, mode)))
        pretrained, pretrain_data, finetuned, train_data, pretraining, finetuning = runs
        end = min(start + MAGIC_QUERY_GROUP, len(queries))
        group = queries if (start, end) == (0, len(queries)) else queries.subset(list(range(start, end)))
        scores = multistage_magic_scores(
            x.pretrain_task, pretrained, pretrain_data, x.query_task, finetuned, train_data, group,
            pretraining=pretraining, finetuning=finetuning, shared=x.shared(), device=x.device, batch_size=x.batch(256)).cpu()
        save_state({"scores": scores}, part)
        rows.append(scores)
    return torch.cat(rows)

"""The ``tracin_we`` stage: TracIn-WE scores over the finetuning checkpoints, with word-level terms of the top pairs."""

from __future__ import annotations

from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult
from flows.stages.entry import stage


@stage("tracin_we")
def run(x: Experiment, result: StageResult) -> None:
    """TracIn-WE scores over the finetuning checkpoints, per mode, with word-level terms of the top pairs."""
    from influence.api import attribute, tracin_we_words

    train, queries, k, family = x.split("train"), x.split("queries"), x.settings.attribution.top_k, x.family
    options = {"embedding_module": family.embedding_module, "ignore_ids": x.ignored_ids}
    for mode in x.settings.finetune.modes:
        model, checkpoints = x.finetuned(mode), x.checkpoints(mode)
        scores = attribute(x.query_task, model, train, queries, method="tracin_we", checkpoints=checkpoints,
                           batch_size=x.batch(256), device=x.device, **options)
        result.outputs[mode] = x.write_scores(mode, scores)
        terms: dict[str, list] = {}
        for q in range(scores.shape[0]):
            order = scores[q].argsort(descending=True)
            for z in list(order[:k].tolist()) + list(order[-k:].tolist()):
                pairs = tracin_we_words(x.query_task, model, queries[q], train[z], checkpoints=checkpoints, **options)
                words = family.words(train[z]["tokens"].tolist(), dict(pairs))
                terms[f"{queries.ids[q]}|{train.ids[z]}"] = [[w, t] for w, t in words]
        x.write_json(f"{mode}_words.json", terms)


def word_terms(x: Experiment, mode: str) -> dict[str, list]:
    """``{"<query id>|<example id>": [[word, term], ...]}`` of ``mode``'s top pairs, which the report shades."""
    return x.read_json("tracin_we", f"{mode}_words.json")

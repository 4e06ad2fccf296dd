"""The retraining engine of the evidence stages: plans, one retraining, their store and the verdicts.

Case deletion (finetuning or pretraining data) and the LDS all retrain: each *retraining*
(:class:`influence.evaluation.case_deletion.Retraining`: the removed examples and a seed) is
independent, is measured on the checked queries, and is saved under
``artifacts/retrainings/<context>/<key>.json`` as soon as it finishes, so an interrupted stage
resumes and the Prefect flow can run them as parallel tasks. The context is a digest of what a
retraining depends on besides its removals and seed; retrainings of another context are never reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from flows import training
from flows.experiment import Experiment
from flows.stage_table import METHOD_STAGES
from flows.workspace import StageResult


def retraining_seeds(x: Experiment) -> list[int]:
    """The seeds every retraining of the evidence stages is repeated with: ``seed, seed + 1, ...``."""
    return [x.settings.seed + i for i in range(x.settings.evaluation.seeds)]


def measure(x: Experiment, model: Any) -> torch.Tensor:
    """``[Q, 2]``: each checked query's loss and the probability the model gives its label (``exp(-loss)``)."""
    queries = x.checked_queries()
    with torch.no_grad():
        batch = torch.utils.data.default_collate([queries[i] for i in range(len(queries))])
        loss = x.train_task.train_loss(model, batch).double()
    return torch.stack([loss, torch.exp(-loss)], dim=1)


def runs_folder(x: Experiment, scope: str) -> Path:
    """``artifacts/retrainings/<context>/``: the saved retrainings of one training context.

    The folder belongs to no stage (every evidence stage reads and adds to it, and it survives their
    re-runs, so a stage re-run with more queries or seeds retrains only what is new).

    The context digests the finetuned model's bytes (which change with the data, the pretrained
    embedding, the code and the finetuning settings), the encoded training set and queries, the
    settings that enter the retraining, and the scope (``"finetune"``: removals from the finetuning
    set, the finetuning retrained; ``"pretrain"``: removals from the pretraining set, both stages re-run).
    """
    s, e = x.settings, x.settings.evaluation
    digest = hashlib.sha256(scope.encode())
    files = [x.path("finetune", e.mode, "model.safetensors"), x.path("features", "train.safetensors"),
             x.path("features", "queries.safetensors")]
    sections: list[Any] = [s.finetune.model_dump(mode="json")]
    if scope == "pretrain":
        files += [x.path("pretrain", "model.safetensors"), x.path("features", "pretrain.safetensors")]
        sections.append(s.pretrain.model_dump(mode="json"))
    for path in files:
        digest.update(path.read_bytes())
    digest.update(json.dumps([sections, e.mode, e.queries, s.seed], sort_keys=True).encode())
    return x.ws.artifacts / "retrainings" / digest.hexdigest()[:16]


def retrain(x: Experiment, retraining: Any, scope: str = "finetune", num_threads: int | None = None,
            runs: Path | None = None) -> dict:
    """One retraining, measured and saved as ``<runs>/<key>.json`` (read back when already there).

    ``scope="finetune"``: the finetuning of ``evaluation.mode`` is re-run without the removed
    finetuning examples. ``scope="pretrain"``: pretraining is re-run without the removed pretraining
    sentences, then the finetuning (on its whole train split) from that new embedding. A retraining
    keeps the data order of the full run of its seed and leaves the removed examples out of their
    batches, so it differs from that run by the removal alone. The baseline of the run's own seed is
    the finetuned model itself (its training is deterministic).

    Args:
        x: the experiment of the evidence stage.
        retraining: an :class:`influence.evaluation.case_deletion.Retraining`.
        scope: ``"finetune"`` or ``"pretrain"``.
        num_threads: torch intra-op threads of the training (retrainings side by side share the cores).
        runs: :func:`runs_folder` of ``scope``, when the caller has it already.

    Returns:
        ``{"key", "seed", "removed", "measured": [Q][2]}``.
    """
    from influence.storage import read_json, write_json

    path = (runs or runs_folder(x, scope)) / f"{retraining.key}.json"
    if path.is_file():
        return read_json(path)
    mode, removed = x.settings.evaluation.mode, list(retraining.removed)
    if not removed and retraining.seed == x.settings.seed:
        model = x.finetuned(mode)
    elif scope == "pretrain":
        pretrained, _ = training.pretrain(x, x.split("pretrain"), seed=retraining.seed, num_threads=num_threads,
                                          exclude=removed)
        model, _ = training.finetune(x, mode, x.split("train"), None, seed=retraining.seed, pretrained=pretrained,
                                     num_threads=num_threads)
    else:
        model, _ = training.finetune(x, mode, x.split("train"), None, seed=retraining.seed, num_threads=num_threads,
                                     exclude=removed)
    found = {"key": retraining.key, "seed": retraining.seed, "removed": len(removed), "measured": measure(x, model).tolist()}
    write_json(path, found)
    return found


def measure_all(x: Experiment, retrainings: list, scope: str = "finetune") -> dict[str, torch.Tensor]:
    """Run (or read back) every retraining, one after another: ``{key: [Q, 2]}``."""
    runs = runs_folder(x, scope)
    measured = {}
    for i, retraining in enumerate(retrainings):
        print(f"{x.stage}: retraining {i + 1}/{len(retrainings)} (seed {retraining.seed}, {len(retraining.removed)} left out)")
        measured[retraining.key] = torch.tensor(retrain(x, retraining, scope, runs=runs)["measured"])
    return measured


def deletion_plan(x: Experiment) -> Any:
    """The case-deletion check's retrainings, from the checked methods' scores."""
    from influence.evaluation.case_deletion import plan_deletion

    e = x.settings.evaluation
    n_train = len(x.split("train"))
    scores = {method: x.checked_scores(METHOD_STAGES[method]) for method in e.methods}
    ks = sorted({max(1, round(f * n_train)) for f in e.k_fractions})
    return plan_deletion(scores, n_train=n_train, k=ks, kinds=e.kinds, random_repeats=e.random_repeats,
                         seeds=retraining_seeds(x), seed=x.settings.seed)


def pretrain_deletion_plan(x: Experiment) -> Any:
    """The pretraining-data case deletion's retrainings, from the multi-stage scores."""
    from influence.evaluation.case_deletion import plan_deletion

    e = x.settings.evaluation
    n_pretrain = len(x.split("pretrain"))
    ks = sorted({max(1, round(f * n_pretrain)) for f in e.pretrain_k_fractions})
    return plan_deletion({"multistage": x.checked_scores("multistage")}, n_train=n_pretrain, k=ks, kinds=e.kinds,
                         random_repeats=e.random_repeats, seeds=retraining_seeds(x), seed=x.settings.seed)


def lds_plan(x: Experiment) -> tuple[torch.Tensor, list]:
    """The LDS subsets and their retrainings: ``([M, N] subset masks, [Retraining])``, every subset with every seed."""
    from influence.evaluation.case_deletion import Retraining
    from influence.evaluation.lds import random_subsets

    e = x.settings.evaluation
    masks = random_subsets(len(x.split("train")), e.lds_fraction, e.lds_subsets, x.settings.seed)
    return masks, [Retraining(tuple((~mask).nonzero().flatten().tolist()), seed)
                   for mask in masks for seed in retraining_seeds(x)]


def planned(x: Experiment) -> list:
    """The retrainings of the evidence stage ``x.stage`` (``deletion``, ``pretrain_deletion`` or ``lds``)."""
    if x.stage == "lds":
        return lds_plan(x)[1]
    return (deletion_plan(x) if x.stage == "deletion" else pretrain_deletion_plan(x)).retrainings()


def deletion_results(x: Experiment, plan: Any, measured: dict[str, torch.Tensor]) -> StageResult:
    """Verdicts of a case-deletion check from its retrainings' measurements ``{key: [Q, 2]}`` (``deletion.json``,
    and the plan's sizes in ``plan.json``)."""
    methods = x.settings.evaluation.methods if x.stage == "deletion" else ["multistage"]
    result = StageResult(x.stage)
    checks = plan.results(measured, extra_name="probability")
    report = [dict(check.to_dict(), fraction=check.k / plan.n_train) for check in checks]
    for check, row in zip(checks, report):
        name = f"{check.method}.{check.kind}.k{check.k}"
        result.metrics.update({
            f"{name}.delta_top": row["mean_top"], f"{name}.delta_random": row["mean_random"],
            f"{name}.difference": row["mean_top"] - row["mean_random"],
            f"{name}.interval_low": row["interval_low"], f"{name}.interval_high": row["interval_high"],
            f"{name}.passed": float(row["passed"]),
            f"{name}.probability_top": row["extra_mean_top"], f"{name}.probability_random": row["extra_mean_random"],
        })
    for method in methods:
        mine = [c for c in checks if c.method == method]
        result.metrics[f"{method}.passed_fraction"] = sum(c.passed for c in mine) / len(mine)
    result.metrics["retrainings"] = float(len(measured))
    result.outputs["deletion"] = x.write_json("deletion.json", report)
    x.write_json("plan.json", {"n_train": plan.n_train, "retrainings": len(plan.retrainings()), "ks": plan.ks, "seeds": plan.seeds})
    return result


__all__ = [
    "deletion_plan", "deletion_results", "lds_plan", "measure", "measure_all", "planned", "pretrain_deletion_plan",
    "retrain", "retraining_seeds", "runs_folder",
]

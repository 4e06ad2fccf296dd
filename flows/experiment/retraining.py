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

from flows.experiment import recipes as training
from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult


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

    The context digests the finetuned models' bytes (which change with the data, the pretrained
    embedding, the code and the finetuning settings), the encoded training set and queries, the
    settings that enter the retraining, and the scope (``"finetune"``: removals from the finetuning
    set, the finetuning of ``evaluation.mode`` retrained; ``"pretrain"``: removals from the pretraining
    set, pretraining re-run and then the finetuning of every mode of :func:`scope_modes`).
    """
    s, e = x.settings, x.settings.evaluation
    digest = hashlib.sha256(scope.encode())
    modes = scope_modes(x, scope)
    files = [x.path("finetune", mode, "model.safetensors") for mode in modes]
    files += [x.path("features", "train.safetensors"), x.path("features", "queries.safetensors")]
    sections: list[Any] = [s.finetune.model_dump(mode="json")]
    if scope == "pretrain":
        files += [x.path("pretrain", "model.safetensors"), x.path("features", "pretrain.safetensors")]
        sections.append(s.pretrain.model_dump(mode="json"))
    for path in files:
        digest.update(path.read_bytes())
    digest.update(json.dumps(retraining_code(), sort_keys=True).encode())  # a fix of the retraining code: new records
    checked = e.mode if modes == [e.mode] else modes  # a one-mode context keeps the digest it always had
    digest.update(json.dumps([sections, checked, e.queries, s.seed] + ([e.retrain_group] if e.retrain_group > 1 else []),
                             sort_keys=True).encode())
    return x.ws.artifacts / "retrainings" / digest.hexdigest()[:16]


def retraining_code() -> dict[str, str]:
    """``{function or file: sha256}`` of the code a retraining runs and measures with (:func:`retrain_group` and what
    it calls: this module's functions, the training recipes, the library's batched training), part of the context."""
    from flows.definition.code_deps import files_digest, function_closure

    functions, modules = function_closure([retrain_group, retrain, measure])
    return {**functions, **files_digest(modules)}


def save_record(runs: Path, record: dict) -> Path:
    """Write a retraining's record as ``<runs>/<key>.json`` with the sha256 of its content (``sha256``)."""
    from influence.storage import sha256_bytes, write_json

    body = {k: v for k, v in record.items() if k != "sha256"}
    return write_json(runs / f"{record['key']}.json", {**body, "sha256": sha256_bytes(_canonical(body))})


def read_record(path: Path) -> dict | None:
    """The record saved at ``path`` (:func:`save_record`), or None when there is none or its content does not match
    its sha256 (it is then computed again)."""
    import logging

    from influence.storage import read_json, sha256_bytes

    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except (OSError, ValueError):
        record = None
    body = {k: v for k, v in record.items() if k != "sha256"} if isinstance(record, dict) else None
    if body is None or record.get("sha256") != sha256_bytes(_canonical(body)) or body.get("key") != path.stem:
        logging.getLogger(__name__).warning("retraining record %s is damaged (its sha256 does not match): computing it again", path)
        return None
    return body


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def scope_modes(x: Experiment, scope: str) -> list[str]:
    """The finetuned models a retraining of ``scope`` trains and measures: ``[evaluation.mode]`` for
    ``"finetune"``, :meth:`~flows.experiment.experiment.Experiment.pretrain_checked_modes` for ``"pretrain"``."""
    return x.pretrain_checked_modes() if scope == "pretrain" else [x.settings.evaluation.mode]


def _found(retraining: Any, measured: dict[str, torch.Tensor], scope: str) -> dict:
    """A retraining's saved record. ``measured``: ``{mode: [Q, 2]}``; the finetuning scope keeps its one mode's
    ``[Q][2]`` under ``measured``, the pretraining scope one per mode under ``measured_by_mode``."""
    found = {"key": retraining.key, "seed": retraining.seed, "removed": len(retraining.removed)}
    if scope == "pretrain":
        found["measured_by_mode"] = {mode: value.tolist() for mode, value in measured.items()}
    else:
        (value,) = measured.values()
        found["measured"] = value.tolist()
    return found


def retrain(x: Experiment, retraining: Any, scope: str = "finetune", num_threads: int | None = None,
            runs: Path | None = None) -> dict:
    """One retraining, measured and saved as ``<runs>/<key>.json`` (read back when already there).

    ``scope="finetune"``: the finetuning of ``evaluation.mode`` is re-run without the removed
    finetuning examples. ``scope="pretrain"``: pretraining is re-run without the removed pretraining
    sentences, then the finetuning of each mode of :func:`scope_modes` (on its whole train split) from
    that new embedding. A retraining
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
        ``{"key", "seed", "removed", "measured": [Q][2]}`` (finetuning scope) or
        ``{"key", "seed", "removed", "measured_by_mode": {mode: [Q][2]}}`` (pretraining scope).
    """
    runs = runs or runs_folder(x, scope)
    saved = read_record(runs / f"{retraining.key}.json")
    if saved is not None:
        return saved
    removed, modes = list(retraining.removed), scope_modes(x, scope)
    if not removed and retraining.seed == x.settings.seed:
        models = {mode: x.finetuned(mode) for mode in modes}
    elif scope == "pretrain":
        pretrained, _ = training.pretrain(x, x.split("pretrain"), seed=retraining.seed, num_threads=num_threads,
                                          exclude=removed)
        models = {mode: training.finetune(x, mode, x.split("train"), None, seed=retraining.seed, pretrained=pretrained,
                                          num_threads=num_threads)[0] for mode in modes}
    else:
        models = {mode: training.finetune(x, mode, x.split("train"), None, seed=retraining.seed,
                                          num_threads=num_threads, exclude=removed)[0] for mode in modes}
    found = _found(retraining, {mode: measure(x, model) for mode, model in models.items()}, scope)
    save_record(runs, found)
    return found


MAX_STACKED_PARAMETERS = 8_000_000  # parameters of all members of a group together (x4 with gradients and Adam's moments)


def stacked_group_size(requested: int, n_parameters: int) -> int:
    """How many retrainings of a model with ``n_parameters`` are trained together: ``requested`` at most, and
    no more than :data:`MAX_STACKED_PARAMETERS` stacked parameters (a transformer like MiniLM: one at a time)."""
    return max(1, min(requested, MAX_STACKED_PARAMETERS // max(1, n_parameters)))


def groups(x: Experiment, retrainings: list, scope: str = "finetune") -> list[list]:
    """The retrainings in the groups that are trained together.

    At most ``evaluation.retrain_group`` each, fewer for a large model (:func:`stacked_group_size` of the
    largest model the scope trains). A group holds retrainings of one seed (they share its initial state
    and data order), in plan order; the full-data baseline of the run's own seed is alone (it is the
    finetuned model itself). The groups depend on the whole plan, the settings and the models only, never
    on what is saved already, so a re-run after a kill recomputes an unfinished group with the same
    members (and the same bits).
    """
    models = [x.finetuned(mode) for mode in scope_modes(x, scope)] + ([x.pretrained()] if scope == "pretrain" else [])
    largest = max(sum(p.numel() for p in model.parameters()) for model in models)
    size, own = stacked_group_size(x.settings.evaluation.retrain_group, largest), x.settings.seed
    alone = [[r] for r in retrainings if not r.removed and r.seed == own]
    rest = [r for r in retrainings if r.removed or r.seed != own]
    found: list[list] = []
    for seed in sorted({r.seed for r in rest}):
        mine = [r for r in rest if r.seed == seed]
        found += [mine[i:i + size] for i in range(0, len(mine), size)]
    return alone + found


def pretrain_without(x: Experiment, data: Any, removals: list[list[int]], seed: int,
                     num_threads: int | None = None) -> list[Any]:
    """Pretrain one fresh masked-word model per removal set, all together (``train_without``); the models, in order.

    Each equals :func:`pretrain` with ``exclude=removal`` up to floating-point rounding: same initial
    state (seeded by ``seed``), same data order, the removed sentences left out of their batches.
    """
    from influence.models.batched_training import train_without

    p = x.settings.pretrain
    model = x.new_language_model(seed)
    trained = train_without(model, x.pretrain_task, data, removals, epochs=p.epochs, batch_size=p.batch_size,
                            learning_rate=p.learning_rate, seed=seed, l2=p.l2, group_size=len(removals),
                            num_threads=num_threads)
    return [_loaded(x.new_language_model(seed), state) for state in trained.states]


def finetune_without(x: Experiment, mode: str, data: Any, removals: list[list[int]], seed: int,
                     num_threads: int | None = None, pretrained: list[Any] | None = None) -> list[Any]:
    """Finetune one fresh classifier of ``mode`` per removal set of ``data``, all together; the models, in order.

    Each equals :func:`flows.experiment.recipes.finetune` with ``exclude=removal`` up to floating-point rounding:
    from the stage's pretrained model, or with ``pretrained`` (one per removal set) from each member's own
    (its embedding carried in, and in ``"updated"`` mode its own proximity anchor).
    """
    from influence.models.batched_training import train_without

    sources = [x.pretrained()] * len(removals) if pretrained is None else list(pretrained)
    fresh = [x.new_classifier(seed, source) for source in sources]
    arguments = training._finetune_arguments(x, mode, fresh[0], sources[0], seed)
    if pretrained is not None:
        proximities = [x.regularizer(mode, model, source).proximity for model, source in zip(fresh, sources)]
        arguments["proximity"] = None if proximities[0] is None else proximities
        arguments["initial_states"] = [model.state_dict() for model in fresh]
    trained = train_without(fresh[0], x.train_task, data, removals, **arguments, group_size=len(removals),
                            num_threads=num_threads)
    return [_loaded(model, state) for model, state in zip(fresh, trained.states)]


def _loaded(model: Any, state: dict) -> Any:
    model.load_state_dict(state)
    return model.eval()


def retrain_group(x: Experiment, group: list, scope: str = "finetune", num_threads: int | None = None,
                  runs: Path | None = None) -> list[dict]:
    """A group of retrainings of one seed (:func:`groups`), trained together, measured and saved (read back when all are).

    ``scope="finetune"``: the finetuning of ``evaluation.mode`` without each member's examples, one batched
    run (:func:`finetune_without`). ``scope="pretrain"``: pretraining without each member's
    sentences, batched, then for each mode of :func:`scope_modes` the members' finetunings from their own
    pretrained embeddings, batched. Every member equals :func:`retrain` of it up to floating-point
    rounding. A group of one is :func:`retrain`.

    Returns:
        :func:`retrain`'s records, in the group's order.
    """
    runs = runs or runs_folder(x, scope)
    paths = [runs / f"{r.key}.json" for r in group]
    saved = [read_record(path) for path in paths]
    if all(record is not None for record in saved):
        return saved
    if len(group) == 1:
        return [retrain(x, group[0], scope, num_threads=num_threads, runs=runs)]
    seeds = {r.seed for r in group}
    if len(seeds) != 1:
        raise ValueError(f"a retraining group holds one seed, not {sorted(seeds)}")
    seed, removals = group[0].seed, [list(r.removed) for r in group]
    models: dict[str, list[Any]] = {}
    if scope == "pretrain":
        pretrained = pretrain_without(x, x.split("pretrain"), removals, seed, num_threads=num_threads)
        for mode in scope_modes(x, scope):
            models[mode] = finetune_without(x, mode, x.split("train"), [[] for _ in group], seed,
                                            num_threads=num_threads, pretrained=pretrained)
    else:
        mode = x.settings.evaluation.mode
        models[mode] = finetune_without(x, mode, x.split("train"), removals, seed, num_threads=num_threads)
    found = []
    for i, (retraining, record) in enumerate(zip(group, saved)):
        found.append(_found(retraining, {mode: measure(x, members[i]) for mode, members in models.items()}, scope))
        if record is None:
            save_record(runs, found[-1])
    return found


def measure_all(x: Experiment, retrainings: list, scope: str = "finetune") -> dict[str, dict[str, torch.Tensor]]:
    """Run (or read back) every retraining, group after group (:func:`groups`): ``{mode: {key: [Q, 2]}}`` over
    the modes of :func:`scope_modes`."""
    runs = runs_folder(x, scope)
    measured: dict[str, dict[str, torch.Tensor]] = {mode: {} for mode in scope_modes(x, scope)}
    done = 0
    for group in groups(x, retrainings, scope):
        done += len(group)
        print(f"{x.stage}: retrainings {done - len(group) + 1}-{done}/{len(retrainings)} (seed {group[0].seed})")
        for found in retrain_group(x, group, scope, runs=runs):
            by_mode = found.get("measured_by_mode") or {x.settings.evaluation.mode: found["measured"]}
            for mode in measured:
                measured[mode][found["key"]] = torch.tensor(by_mode[mode])
    return measured


def plans_retrainings(plans: dict[str, Any]) -> list:
    """The distinct retrainings of ``{mode: plan}``, in plan order: a removal set two modes share (the random
    ones, the baseline) is retrained once."""
    unique: dict[str, Any] = {}
    for plan in plans.values():
        unique.update({r.key: r for r in plan.retrainings() if r.key not in unique})
    return list(unique.values())


def deletion_results(x: Experiment, plans: dict[str, Any], measured: dict[str, dict[str, torch.Tensor]],
                     methods: list[str], by_mode: bool) -> StageResult:
    """Verdicts of a case-deletion check from its plans ``{mode: plan}`` and its retrainings' measurements
    ``{mode: {key: [Q, 2]}}`` (``deletion.json``, each row with its mode, and the plans' sizes in ``plan.json``).

    Args:
        methods: the methods checked (each gets its ``passed_fraction``).
        by_mode: the metrics start with the mode (``updated.multistage.proponents.k60.passed``: a check of several
            modes); otherwise not (one mode).
    """
    result = StageResult(x.stage)
    report, sizes = [], {}
    for mode, plan in plans.items():
        prefix = f"{mode}." if by_mode else ""
        checks = plan.results(measured[mode], extra_name="probability")
        rows = [dict(check.to_dict(), fraction=check.k / plan.n_train, mode=mode) for check in checks]
        report += rows
        _verdict_metrics(result, checks, rows, prefix, methods)
        sizes = {"n_train": plan.n_train, "ks": plan.ks, "seeds": plan.seeds}
    retrainings = len(next(iter(measured.values())))  # every mode measured every retraining
    result.metrics["retrainings"] = float(retrainings)
    result.outputs["deletion"] = x.write_json("deletion.json", report)
    x.write_json("plan.json", {**sizes, "retrainings": retrainings, "modes": list(plans)})
    return result


def _verdict_metrics(result: StageResult, checks: list, rows: list[dict], prefix: str, methods: list[str]) -> None:
    for check, row in zip(checks, rows):
        name = f"{prefix}{check.method}.{check.kind}.k{check.k}"
        result.metrics.update({
            f"{name}.delta_top": row["mean_top"], f"{name}.delta_random": row["mean_random"],
            f"{name}.difference": row["mean_top"] - row["mean_random"],
            f"{name}.interval_low": row["interval_low"], f"{name}.interval_high": row["interval_high"],
            f"{name}.passed": float(row["passed"]),
            f"{name}.probability_top": row["extra_mean_top"], f"{name}.probability_random": row["extra_mean_random"],
        })
    for method in methods:
        mine = [c for c in checks if c.method == method]
        result.metrics[f"{prefix}{method}.passed_fraction"] = sum(c.passed for c in mine) / len(mine)


__all__ = [
    "MAX_STACKED_PARAMETERS", "deletion_results", "finetune_without", "groups", "measure", "measure_all", "plans_retrainings",
    "pretrain_without", "read_record", "retrain", "retrain_group", "retraining_code", "retraining_seeds", "runs_folder",
    "save_record", "scope_modes", "stacked_group_size",
]

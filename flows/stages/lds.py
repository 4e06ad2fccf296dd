"""The ``lds`` stage: the linear datamodeling score of every checked method, against retraining on random subsets."""

from __future__ import annotations

from pathlib import Path

import torch

from flows.definition.stage_table import METHOD_STAGES
from flows.experiment import retraining
from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult
from flows.stages.entry import stage


def lds_plan(x: Experiment) -> tuple[dict[str, torch.Tensor], list]:
    """The LDS subsets of each protocol and their retrainings: ``({protocol: [M, N] subset masks}, [Retraining])``.

    Protocols: ``"half"`` (``evaluation.lds_subsets`` random subsets keeping ``lds_fraction``) and, unless
    ``lds_small_subsets`` is 0, ``"small"`` (that many subsets each leaving out 1% to 5%,
    ``lds_small_removals``). Every subset is retrained with every seed, in the order of the protocols'
    masks then seeds.
    """
    from influence.evaluation.case_deletion import Retraining
    from influence.evaluation.lds import random_subsets, small_removal_subsets

    e, n = x.settings.evaluation, len(x.split("train"))
    masks = {"half": random_subsets(n, e.lds_fraction, e.lds_subsets, x.settings.seed)}
    if e.lds_small_subsets:
        low, high = e.lds_small_removals
        masks["small"] = small_removal_subsets(n, low, high, e.lds_small_subsets, x.settings.seed + 1)
    return masks, [Retraining(tuple((~mask).nonzero().flatten().tolist()), seed)
                   for protocol in masks.values() for mask in protocol for seed in retraining.retraining_seeds(x)]


def plan(x: Experiment) -> list:
    """The stage's retrainings, in plan order (the Prefect flow runs them as parallel tasks first)."""
    return lds_plan(x)[1]


@stage("lds")
def run(x: Experiment, result: StageResult) -> None:
    """Linear datamodeling score of every checked method (Park et al. 2023): per query, the Spearman
    correlation between the losses its scores predict for random subsets and those measured after
    retraining on them (with every seed), averaged over the checked queries; for two protocols, half
    subsets and small removals of 1% to 5% (``evaluation.lds_small_subsets``)."""
    from influence.evaluation.lds import lds_per_query

    e = x.settings.evaluation
    protocols, retrainings = lds_plan(x)
    measured = retraining.measure_all(x, retrainings)[e.mode]
    losses = torch.stack([measured[r.key][:, 0] for r in retrainings]).reshape(-1, e.seeds, len(x.checked_queries())).mean(dim=1)
    outputs = dict(zip(protocols, losses.split([len(m) for m in protocols.values()])))  # protocol -> [M, Q]
    found = {"subsets": len(protocols["half"]), "fraction": e.lds_fraction, "seeds": e.seeds, "queries": int(losses.shape[1]),
             "methods": {}}
    if "small" in protocols:
        found["small"] = {"subsets": len(protocols["small"]), "removed": list(e.lds_small_removals)}
    for method in e.methods:
        scores = x.checked_scores(METHOD_STAGES[method])
        found["methods"][method] = {}
        for protocol, masks in protocols.items():
            per_query = lds_per_query(scores, masks, outputs[protocol])
            mean = float(per_query[~per_query.isnan()].mean())
            suffix = "" if protocol == "half" else "_small"
            found["methods"][method].update({f"lds{suffix}": mean, f"per_query{suffix}": per_query.tolist()})
            result.metrics[f"{method}.lds{suffix}"] = mean
    result.outputs["lds"] = x.write_json("lds.json", found)
    result.metrics["retrainings"] = float(len(retrainings))


def report_section(x: Experiment, results: dict[str, StageResult], folder: Path) -> dict:
    """The report's LDS table: each checked method's score for each protocol, and per query."""
    found = x.read_json("lds", "lds.json")
    small = found.get("small")
    half_name = f"LDS ({100 * found['fraction']:.0f}% subsets)"
    small_name = f"LDS ({100 * small['removed'][0]:g}-{100 * small['removed'][1]:g}% removed)" if small else None
    rows = []
    for m, v in found["methods"].items():
        row = {"method": m, half_name: v["lds"], "per query": ", ".join(f"{x:.2f}" for x in v["per_query"])}
        if small:
            row[small_name] = v["lds_small"]
            row["per query (small removals)"] = ", ".join(f"{x:.2f}" for x in v["per_query_small"])
        rows.append(row)
    text = (f"{found['subsets']} random subsets of {100 * found['fraction']:.0f}% of the finetuning train split"
            + (f", and {small['subsets']} that each leave out {100 * small['removed'][0]:g}% to {100 * small['removed'][1]:g}% "
               "of it (the small-removal protocol of the MAGIC paper, where a first-order prediction is meant to hold)"
               if small else "")
            + f", each retrained with {found['seeds']} seed(s); per query, the Spearman correlation between the loss "
              f"a method's scores predict for each subset (plus the sum of the scores of the examples it leaves out) "
              f"and the loss measured after retraining, averaged over {found['queries']} queries. "
              "1 = the method ranks the subsets exactly as retraining does; 0 = no better than chance.")
    columns = ["method", half_name] + ([small_name] if small else []) + ["per query"] + (["per query (small removals)"] if small else [])
    return {"evaluation": [{"title": "Linear datamodeling score", "text": text, "rows": rows, "columns": columns}]}

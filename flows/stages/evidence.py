"""What the two case-deletion stages (``deletion``, ``pretrain_deletion``) share: the check itself (retrain, or read
the retrainings back, then the verdicts) and their part of the report (the verdict rows and the deletion curves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.experiment import retraining
from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult

CAPTION = ("Mean change of the query loss after removing each query's top-k examples, against k, for each method and "
           "for k random examples (bars: 95% intervals; hollow: not passed).")


def run_check(x: Experiment, result: StageResult, plans: dict[str, Any], methods: list[str], by_mode: bool) -> None:
    """Retrain (or read back) every retraining of ``plans`` (``{mode: plan}``) and record the verdicts."""
    from flows.definition import stage_table

    measured = retraining.measure_all(x, retraining.plans_retrainings(plans), stage_table.row(x.stage).retrains)
    found = retraining.deletion_results(x, plans, measured, methods, by_mode)
    result.metrics.update(found.metrics)
    result.outputs.update(found.outputs)


def report_section(x: Experiment, stage: str, data: str, figure: Path) -> dict:
    """The verdict rows of the check ``stage`` (its examples: ``data``) and its deletion-curve figure at ``figure``."""
    from flows.reporting import figures

    checks = x.read_json(stage, "deletion.json")
    rows = [{"data": data, "method": c["method"], "mode": c.get("mode", x.settings.evaluation.mode), "removed": c["kind"],
             "k": f"{c['k']} ({100 * c['fraction']:.1f}%)", "mean_top": c["mean_top"], "mean_random": c["mean_random"],
             "difference": c["difference"], "interval_95": f"[{c['interval_low']:.4g}, {c['interval_high']:.4g}]",
             "probability_top": c.get("extra_mean_top", float("nan")),
             "probability_random": c.get("extra_mean_random", float("nan")), "passed": c["passed"]} for c in checks]
    if len({c.get("mode") for c in checks}) > 1:  # the pretraining check of several modes: a line per method and mode
        checks = [dict(c, method=f"{c['method']} ({c['mode']})") for c in checks]
    curves = (f"Case-deletion curves ({data} data)", CAPTION, figures.deletion_curves(checks, figure))
    return {"deletion": rows, "figures": [curves]}

"""The ``mislabel`` stage: flip a seeded share of the training labels, retrain, rank by self-influence."""

from __future__ import annotations

from pathlib import Path

from flows.experiment import recipes
from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult
from flows.stages.entry import stage


@stage("mislabel")
def run(x: Experiment, result: StageResult) -> None:
    """Mislabel detection: flip a seeded share of the training labels, retrain, rank by self-influence."""
    from influence.api import self_influence
    from influence.data.datasets import TextClassificationDataset
    from influence.evaluation.mislabel import detection_curve, flip_labels

    e, a, train = x.settings.evaluation, x.settings.attribution, x.split("train")
    noisy_labels, flipped = flip_labels(train.labels, e.mislabel_fraction, num_classes=x.num_classes, seed=x.settings.seed)
    noisy = TextClassificationDataset(train.tokens, noisy_labels, train.ids)
    model, _ = recipes.finetune(x, e.mode, noisy, checkpoint_dir=x.out_dir("checkpoints"))
    if e.mislabel_method == "tracin":
        scores = self_influence(x.query_task, model, noisy, method="tracin", params=x.params(e.mislabel_params),
                                batch_size=x.batch(512),
                                checkpoints=x.checkpoints(e.mode, x.out_dir("checkpoints")), device=x.device)
    else:
        scores = self_influence(x.query_task, model, noisy, method="if", params=list(a.if_params), batch_size=x.batch(512),
                                **x.solver("self_influence"), regularizer=x.regularizer(e.mode, model), device=x.device,
                                hessian_data=x.hessian_sample(noisy, a.hessian_examples))
    curve = detection_curve(scores.detach().cpu().double(), flipped)
    result.outputs["mislabel"] = x.write_json("mislabel.json", {
        "method": e.mislabel_method, "fraction": e.mislabel_fraction, "flipped": flipped.tolist(), "curve": curve.to_dict()})
    table = curve.to_dict()  # the curve as rows too, a data series of dvc.yaml's plots
    x.write_json("curve.json", [{"inspected": i, "found": f, "random": r}
                                for i, f, r in zip(table["inspected"], table["found"], table["random_found"])])
    result.metrics.update({"auc": curve.auc, "random_auc": curve.to_dict()["random_auc"], "flipped": float(curve.n_flipped)})
    for share in (0.05, 0.1, 0.2):
        result.metrics[f"found_at_{round(share * 100)}pct"] = curve.found_at(share)


CAPTION = ("Share of the planted label flips found while inspecting the training set in decreasing order of "
           "self-influence, against a random order.")


def report_section(x: Experiment, results: dict[str, StageResult], folder: Path) -> dict:
    """The report's mislabel-detection table and curve."""
    from flows.reporting import figures

    found = x.read_json("mislabel", "mislabel.json")
    curve = found["curve"]
    rows = []
    for share in (0.05, 0.1, 0.2, 0.3):
        i = min(range(len(curve["inspected"])), key=lambda j: abs(curve["inspected"][j] - share))
        rows.append({"inspected": f"{100 * curve['inspected'][i]:.0f}%", "flipped labels found": curve["found"][i],
                     "random order": curve["random_found"][i]})
    section = {
        "title": "Mislabel detection",
        "text": f"{curve['n_flipped']} of {curve['n_examples']} finetuning labels ({100 * found['fraction']:.0f}%) were "
                f"flipped at random and the model retrained on them; inspecting the training examples by decreasing "
                f"self-influence ({found['method']}) finds the flipped ones at the rates below. "
                f"Area under the curve {curve['auc']:.3f} (random order {curve['random_auc']:.3f}).",
        "rows": rows, "columns": ["inspected", "flipped labels found", "random order"],
    }
    curve_figure = figures.mislabel_curve(found["curve"], folder / "mislabel.png", label=found["method"])
    return {"evaluation": [section], "figures": [("Mislabel detection", CAPTION, curve_figure)]}

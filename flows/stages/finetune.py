"""The ``finetune`` stage: the classifier finetuned in each embedding mode, with checkpoints for TracIn."""

from __future__ import annotations

from flows.experiment import recipes
from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult
from flows.stages.entry import stage


@stage("finetune")
def run(x: Experiment, result: StageResult) -> None:
    """Finetune the classifier in each embedding mode, with checkpoints for TracIn."""
    from influence.models.checkpoints import save_state
    from influence.models.metrics import evaluate_accuracy

    x.write_json("model.json", x.classifier_config())
    for mode in x.settings.finetune.modes:
        model, trained = recipes.finetune(x, mode, x.split("train"), x.out_dir(mode, "checkpoints"))
        save_state(model, x.out_dir(mode) / "model.safetensors")
        for split in ("train", "validation", "test"):
            result.metrics[f"{mode}.accuracy_{split}"] = evaluate_accuracy(model, x.split(split), batch_size=x.batch(256))
        result.metrics.update({f"{mode}.loss_epoch_{i}": float(v) for i, v in enumerate(trained.losses)})
        result.metrics[f"{mode}.final_loss"] = float(trained.losses[-1])
        result.metrics[f"{mode}.checkpoints"] = float(len(trained.checkpoints))
        result.outputs[mode] = x.relative(x.out_dir(mode))

"""The ``pretrain`` stage: the language model pretrained on the pretraining sentences."""

from __future__ import annotations

from flows.experiment import recipes
from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult
from flows.stages.entry import stage


@stage("pretrain")
def run(x: Experiment, result: StageResult) -> None:
    """Pretrain the masked-word model on the pretraining sentences (the news, or the user's corpus)."""
    from influence.models.checkpoints import save_state

    model, trained = recipes.pretrain(x, x.split("pretrain"), checkpoint_dir=x.out_dir("checkpoints"))
    x.write_json("model.json", x.language_model_config())  # the architecture, beside the weights
    result.outputs = {"model": x.relative(save_state(model, x.out_dir() / "model.safetensors"))}
    result.metrics.update({f"loss_epoch_{i}": float(v) for i, v in enumerate(trained.losses)})
    result.metrics["final_loss"] = float(trained.losses[-1])

"""The training recipes of the two stages: one definition each, for the stages and their retrainings.

The pretraining and finetuning stages call these with a checkpoint folder; the evidence stages call
them again to retrain without some examples (``exclude``: the data order of the whole run is kept)
or with another seed. A recipe takes its model, task, objective and optimiser settings from the
:class:`~flows.experiment.experiment.Experiment`, so a retraining differs from the stage's run by what it
is asked to change, nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flows.experiment.experiment import Experiment

log = logging.getLogger(__name__)


def progress(stage: str):
    """A training-log callback that prints one line per epoch (Prefect records printed lines)."""

    def report(event: dict) -> None:
        if event.get("event") == "epoch":
            print(f"{stage}: epoch {event['epoch']} loss {event['loss']:.4f} ({event['seconds']:.1f} s)")
        elif event.get("event") in ("resumed", "loaded"):
            print(f"{stage}: {event['event']} at step {event['step']}")

    return report


def resume_or_replace(call, **kwargs):
    """Run ``call(**kwargs)``, which resumes (or reuses) the artifact its folder holds; when that
    artifact was made with other arguments (an earlier run with other settings), replace it."""
    from influence.exceptions import CacheMismatchError

    try:
        return call(**kwargs, overwrite=False)
    except CacheMismatchError as exc:
        log.warning("replacing a stale artifact: %s", exc)
        return call(**kwargs, overwrite=True)


def pretrain(x: Experiment, data: Any, checkpoint_dir: Path | None = None, seed: int | None = None,
             num_threads: int | None = None, exclude: list[int] | None = None) -> tuple[Any, Any]:
    """Pretrain a fresh masked-word model on ``data``; ``(model, training result)``.

    Args:
        x: the experiment (``pretrain`` settings, vocabulary).
        data: the pretraining sentences.
        checkpoint_dir: where checkpoints and the resume state go (every 100 steps); ``None``: nowhere.
        seed: initialisation and data-order seed (default ``settings.seed``).
        num_threads: torch intra-op threads of this training (retrainings run side by side).
        exclude: sentences left out, the data order of the whole run kept.
    """
    from influence.models.training import train

    p = x.settings.pretrain
    seed = x.settings.seed if seed is None else seed
    model = x.new_language_model(seed)
    trained = resume_or_replace(
        train, model=model, task=x.pretrain_task, dataset=data, epochs=p.epochs,
        batch_size=p.batch_size, learning_rate=p.learning_rate, seed=seed, l2=p.l2,
        checkpoint_dir=checkpoint_dir, checkpoint_every=100 if checkpoint_dir is not None else None,
        log=progress("pretrain") if checkpoint_dir is not None else None, num_threads=num_threads,
        exclude=exclude,
    )
    return model.eval(), trained


def finetune(x: Experiment, mode: str, data: Any, checkpoint_dir: Path | None, seed: int | None = None,
             pretrained: Any = None, num_threads: int | None = None, exclude: list[int] | None = None) -> tuple[Any, Any]:
    """Finetune a fresh classifier (pretrained embedding) on ``data`` in ``mode``; ``(model, training result)``.

    Args:
        x: the experiment (``finetune`` settings, the mode's trainable parameters and penalty).
        mode: ``"fixed"`` or ``"updated"``.
        data: the finetuning examples.
        checkpoint_dir: where checkpoints (every ``finetune.checkpoint_every`` steps) go; ``None``: nowhere.
        seed: initialisation and data-order seed (default ``settings.seed``).
        pretrained: the pretrained model to start from (default: the pretraining stage's).
        num_threads: torch intra-op threads of this training.
        exclude: indices of ``data`` left out, the data order of the whole run kept.
    """
    from influence.models.training import train

    ft = x.settings.finetune
    pretrained = x.pretrained() if pretrained is None else pretrained
    model = x.new_classifier(seed, pretrained)
    result = resume_or_replace(
        train, model=model, task=x.train_task, dataset=data, **_finetune_arguments(x, mode, model, pretrained, seed),
        checkpoint_dir=checkpoint_dir, checkpoint_every=ft.checkpoint_every if checkpoint_dir is not None else None,
        num_threads=num_threads, exclude=exclude,
    )
    return model.eval(), result


def _finetune_arguments(x: Experiment, mode: str, model: Any, pretrained: Any, seed: int | None) -> dict[str, Any]:
    """``train``'s optimisation arguments of a finetuning run in ``mode`` (Adam, the mode's parameters and penalty)."""
    ft = x.settings.finetune
    penalty = x.regularizer(mode, model, pretrained)
    return {"epochs": ft.epochs, "batch_size": ft.batch_size, "learning_rate": ft.learning_rate,
            "seed": x.settings.seed if seed is None else seed, "optimizer": "adam", "l2": penalty.l2,
            "trainable": x.trainable(mode, model), "l2_names": list(penalty.l2_names), "proximity": penalty.proximity}


def pretrain_recipe(x: Experiment) -> dict[str, Any]:
    """The pretraining stage's run as the fields of a :class:`~influence.methods.magic.TrainingRecipe` (what
    multi-stage MAGIC replays): the fresh language model's initial state and the very arguments :func:`pretrain` trains with."""
    p = x.settings.pretrain
    model = x.new_language_model(None)
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return {"initial_state": state, "epochs": p.epochs, "batch_size": p.batch_size, "learning_rate": p.learning_rate,
            "seed": x.settings.seed, "optimizer": "adam", "l2": p.l2}


def finetune_recipe(x: Experiment, mode: str) -> dict[str, Any]:
    """The finetuning stage's run in ``mode`` as the fields of a :class:`~influence.methods.magic.TrainingRecipe`
    (what MAGIC replays): the fresh classifier's initial state and the very arguments :func:`finetune` trains with."""
    pretrained = x.pretrained()
    model = x.new_classifier(None, pretrained)
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return {"initial_state": state, **_finetune_arguments(x, mode, model, pretrained, None)}


__all__ = ["finetune", "finetune_recipe", "pretrain", "pretrain_recipe", "progress", "resume_or_replace"]

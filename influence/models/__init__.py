"""Small models used by the pipeline and their training loop with checkpoints.

- :mod:`influence.models.text`: ``TextClassifier``, ``CbowLanguageModel``, ``transfer_embedding``.
- :mod:`influence.models.training`: ``train`` (frozen parameters, L2 and proximity penalties,
  checkpoints with learning rates, resume), ``Proximity``, ``Regularizer``, ``evaluate_accuracy``,
  ``mean_loss``.
- :mod:`influence.models.checkpoints`: safetensors state dicts, resumable training states and the
  checkpoint manifest.
"""

from influence.models.checkpoints import (
    CheckpointInfo,
    load_metadata,
    load_model_state,
    load_state,
    load_training_state,
    read_manifest,
    save_state,
    save_training_state,
    write_manifest,
)
from influence.models.text import CbowLanguageModel, TextClassifier, transfer_embedding
from influence.models.training import (
    Proximity,
    Regularizer,
    TrainResult,
    collate_dataset,
    evaluate_accuracy,
    mean_loss,
    train,
)

__all__ = [
    "CbowLanguageModel",
    "CheckpointInfo",
    "Proximity",
    "Regularizer",
    "TextClassifier",
    "TrainResult",
    "collate_dataset",
    "evaluate_accuracy",
    "load_metadata",
    "load_model_state",
    "load_state",
    "load_training_state",
    "mean_loss",
    "read_manifest",
    "save_state",
    "save_training_state",
    "train",
    "transfer_embedding",
    "write_manifest",
]

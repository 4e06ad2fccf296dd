"""Small models used by the pipeline and their training loop with checkpoints.

- :mod:`influence.models.text`: ``TextClassifier``, ``CbowLanguageModel``, ``transfer_embedding``.
- :mod:`influence.models.training`: ``train`` (frozen parameters, L2 and proximity penalties,
  checkpoints with learning rates, resume).
- :mod:`influence.models.training_run`: the checkpoint folder of one run (checksummed, resumable).
- :mod:`influence.models.checkpoints`: safetensors state dicts, resumable training states and the
  checkpoint manifest.
- :mod:`influence.models.metrics`: ``evaluate_accuracy``, ``mean_loss``.

The penalties (``Proximity``, ``Regularizer``) live in :mod:`influence.regularizers` and are
re-exported here.
"""

from influence.batches import collate_dataset
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
from influence.models.metrics import evaluate_accuracy, mean_loss
from influence.models.text import CbowLanguageModel, TextClassifier, transfer_embedding
from influence.models.training import TrainResult, train
from influence.regularizers import Proximity, Regularizer

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

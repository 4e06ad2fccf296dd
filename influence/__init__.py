"""Training-data attribution for PyTorch models: influence functions, multi-stage influence,
TracIn and TracIn-WE, MAGIC and multi-stage MAGIC.

Describe a model with a :class:`Task` (per-example training loss and query measurement), then::

    scores = influence.attribute(task, model, train_data, query_data, method="if")  # [m, n]

Every score is oriented the same way: positive means that removing the training example would
make the query worse (a proponent).

Long loops show tqdm progress bars on stderr when stderr is a terminal; ``INFLUENCE_PROGRESS=0`` or
``influence.enable_progress(False)`` turns them off, ``1`` or ``True`` on (:mod:`influence.progress`).
"""

from influence.api import METHODS, TrainingRecipe, attribute, multistage, multistage_magic, self_influence, tracin_we_words
from influence.progress import enable as enable_progress
from influence.task import ClassificationTask, LanguageModelingTask, Task

__all__ = [
    "METHODS",
    "ClassificationTask",
    "LanguageModelingTask",
    "Task",
    "TrainingRecipe",
    "attribute",
    "enable_progress",
    "multistage",
    "multistage_magic",
    "self_influence",
    "tracin_we_words",
]

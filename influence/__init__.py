"""Training-data attribution for PyTorch models: influence functions, multi-stage influence,
TracIn and TracIn-WE, MAGIC and multi-stage MAGIC.

Describe a model with a :class:`Task` (per-example training loss and query measurement), then::

    scores = influence.attribute(task, model, train_data, query_data, method="if")  # [m, n]

Every score is oriented the same way: positive means that removing the training example would
make the query worse (a proponent).
"""

from influence.api import METHODS, TrainingRecipe, attribute, multistage, multistage_magic, self_influence, tracin_we_words
from influence.task import ClassificationTask, LanguageModelingTask, Task

__all__ = [
    "METHODS",
    "ClassificationTask",
    "LanguageModelingTask",
    "Task",
    "TrainingRecipe",
    "attribute",
    "multistage",
    "multistage_magic",
    "self_influence",
    "tracin_we_words",
]

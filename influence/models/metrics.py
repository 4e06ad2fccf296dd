"""Quality of a trained model on a dataset: accuracy and mean loss, in batches, without gradients."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from influence.batches import collate_dataset, num_examples, rows, to_device
from influence.task import Task, split_inputs_labels
from influence.validation import check_batch_size


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: Dataset | Mapping[str, Tensor], batch_size: int = 512) -> float:
    """Fraction of examples whose arg-max logit is the label.

    Args:
        model: maps inputs ``[B, ...]`` to logits ``[B, C]``.
        dataset: examples with inputs and labels (``{"tokens": [L], "label": []}``).
        batch_size: examples per forward pass.

    Returns:
        Accuracy in ``[0, 1]``.
    """
    check_batch_size(batch_size)
    data = to_device(collate_dataset(dataset), _model_device(model))
    n = num_examples(data)
    correct = 0
    for start in range(0, n, batch_size):
        inputs, labels = split_inputs_labels(rows(data, slice(start, start + batch_size)))
        correct += int((model(inputs).argmax(dim=-1) == labels).sum())
    return correct / n


@torch.no_grad()
def mean_loss(task: Task, model: nn.Module, dataset: Dataset | Mapping[str, Tensor], batch_size: int = 512) -> float:
    """Mean of ``task.train_loss`` over a dataset (no penalties).

    Args:
        task: gives ``train_loss(model, batch) -> [B]``.
        model: the model.
        dataset: the examples.
        batch_size: examples per forward pass.

    Returns:
        The mean per-example loss.
    """
    check_batch_size(batch_size)
    data = to_device(collate_dataset(dataset), _model_device(model))
    n = num_examples(data)
    total = 0.0
    for start in range(0, n, batch_size):
        batch = rows(data, slice(start, start + batch_size))
        total += float(task.train_loss(model, batch).double().sum())
    return total / n


__all__ = ["evaluate_accuracy", "mean_loss"]

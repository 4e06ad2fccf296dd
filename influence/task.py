"""The user contract: how to compute a model's training loss and query measurement.

A :class:`Task` turns ``(model, batch)`` into per-example values. Every method in the library
(influence functions, multi-stage influence, TracIn, TracIn-WE) only talks to a model through a
task, so supporting a new model means writing one small subclass.

Batches are whatever the user's ``DataLoader`` yields; the ready-made tasks accept
``(inputs, labels)`` tuples or dicts with ``"inputs"``/``"tokens"`` and ``"labels"``/``"label"`` keys.

Per-example gradients are taken with ``torch.func.vmap`` over batches of one example, so
``train_loss`` and ``measurement`` must treat examples independently (no batch norm).

Sign convention: a score is positive (a *proponent*) when removing the training example would
make the query's measurement worse. ``higher_is_better`` tells which direction is worse.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from influence.batches import Batch, tensors
from influence.exceptions import invalid


class Task(abc.ABC):
    """Per-example training loss and query measurement of a model.

    Attributes:
        higher_is_better: ``True`` when a larger measurement is better (a margin, a log-probability),
            ``False`` when smaller is better (a loss). Scores are oriented so that positive always
            means "removing this training example makes the query worse".
    """

    higher_is_better: bool = False

    @abc.abstractmethod
    def train_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Training loss of every example in ``batch``.

        Args:
            model: the model, in the state whose gradients are wanted.
            batch: a batch of ``B`` training examples.

        Returns:
            Tensor of shape ``[B]``; the training objective is the mean of these values (plus any
            regulariser the caller adds).
        """

    def measurement(self, model: nn.Module, batch: Batch) -> Tensor:
        """The quantity of each query example that attribution explains. Defaults to its loss.

        Args:
            model: the model.
            batch: a batch of ``B`` query examples.

        Returns:
            Tensor of shape ``[B]``.
        """
        return self.train_loss(model, batch)

    def outputs(self, model: nn.Module, batch: Batch) -> Tensor:
        """Model outputs whose loss is convex, for Gauss-Newton products (``J^T H_out J``).

        Subclasses that support Gauss-Newton curvature override this together with
        :meth:`loss_from_outputs` so that ``loss_from_outputs(outputs(model, batch), batch)``
        equals ``train_loss(model, batch)``.

        Args:
            model: the model.
            batch: a batch of ``B`` training examples.

        Returns:
            Tensor ``[B, ...]`` (logits for the ready-made tasks).
        """
        raise invalid(
            "task", type(self).__name__,
            "a Task implementing outputs() and loss_from_outputs() for Gauss-Newton curvature",
        )

    def loss_from_outputs(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Per-example training loss computed from :meth:`outputs`.

        Args:
            outputs: ``[B, ...]`` as returned by :meth:`outputs`.
            batch: the same batch.

        Returns:
            Tensor ``[B]``.
        """
        raise invalid(
            "task", type(self).__name__,
            "a Task implementing outputs() and loss_from_outputs() for Gauss-Newton curvature",
        )

    def batch_size(self, batch: Batch) -> int:
        """Number of examples in ``batch`` (the size of the leading dimension of its tensors)."""
        for leaf in tensors(batch):
            return int(leaf.shape[0])
        raise invalid("batch", type(batch).__name__, "a tensor, tuple or dict holding tensors")


def describe_task(task: Task) -> dict[str, Any]:
    """The task's class and its simple attributes: what defines its loss and measurement.

    Recorded in the manifests of artifacts made with a task (gradient caches, training runs), so
    that reusing one with another task is refused.
    """
    attributes = {
        k: v for k, v in sorted(vars(task).items())
        if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))
    }
    return {"class": f"{type(task).__module__}.{type(task).__qualname__}", "attributes": attributes}


def split_inputs_labels(batch: Batch) -> tuple[Tensor, Tensor]:
    """Return ``(inputs, labels)`` from a ``(x, y)`` tuple or a dict with the usual keys."""
    if isinstance(batch, Mapping):
        inputs = next((batch[k] for k in ("inputs", "tokens", "input_ids", "x") if k in batch), None)
        labels = next((batch[k] for k in ("labels", "label", "y") if k in batch), None)
        if inputs is None or labels is None:
            raise invalid(
                "batch keys", sorted(batch), "'inputs'/'tokens'/'input_ids'/'x' and 'labels'/'label'/'y'"
            )
        return inputs, labels
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise invalid("batch", type(batch).__name__, "a (inputs, labels) tuple or a dict")


class ClassificationTask(Task):
    """Cross-entropy training loss; the query measurement is the loss or the margin.

    The model maps inputs ``[B, ...]`` to logits ``[B, C]``.

    Args:
        measurement: ``"loss"`` (cross-entropy of the true label; lower is better) or ``"margin"``
            (true-class logit minus the largest other logit; higher is better).
    """

    def __init__(self, measurement: Literal["loss", "margin"] = "loss") -> None:
        if measurement not in ("loss", "margin"):
            raise invalid("measurement", measurement, "'loss' or 'margin'")
        self.kind = measurement
        self.higher_is_better = measurement == "margin"

    def train_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.loss_from_outputs(self.outputs(model, batch), batch)

    def outputs(self, model: nn.Module, batch: Batch) -> Tensor:
        """Logits ``[B, C]``."""
        inputs, _ = split_inputs_labels(batch)
        return model(inputs)

    def loss_from_outputs(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Cross-entropy ``[B]`` of logits ``outputs`` ``[B, C]`` against the batch's labels."""
        _, labels = split_inputs_labels(batch)
        return F.cross_entropy(outputs, labels, reduction="none")

    def measurement(self, model: nn.Module, batch: Batch) -> Tensor:
        if self.kind == "loss":
            return self.train_loss(model, batch)
        inputs, labels = split_inputs_labels(batch)
        logits = model(inputs)
        true_logit = logits.gather(1, labels[:, None]).squeeze(1)
        others = logits.scatter(1, labels[:, None], float("-inf"))
        return true_logit - others.max(dim=1).values


class LanguageModelingTask(Task):
    """Mean token cross-entropy of a language model, per example.

    The model maps tokens ``[B, L]`` to logits ``[B, L, V]`` that predict the token at each position
    (masked-word models predict the word itself from its context; next-word models should be
    given targets shifted by the caller through ``shift=True``). Positions holding ``padding_idx``
    are ignored.

    Args:
        padding_idx: token id of padding.
        shift: predict token ``t + 1`` from the logits at ``t`` (causal language models).
    """

    def __init__(self, padding_idx: int = 0, shift: bool = False) -> None:
        self.padding_idx = padding_idx
        self.shift = shift

    def train_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.loss_from_outputs(self.outputs(model, batch), batch)

    def outputs(self, model: nn.Module, batch: Batch) -> Tensor:
        """Logits ``[B, L, V]``."""
        return model(batch if isinstance(batch, Tensor) else _first_tensor(batch))

    def loss_from_outputs(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Mean token cross-entropy ``[B]`` of logits ``outputs`` ``[B, L, V]`` (padding ignored)."""
        tokens = batch if isinstance(batch, Tensor) else _first_tensor(batch)
        logits = outputs
        targets = tokens
        if self.shift:
            logits, targets = logits[:, :-1], tokens[:, 1:]
        mask = (targets != self.padding_idx).to(logits.dtype)
        token_loss = F.cross_entropy(  # flattened: much faster than a [B, V, L] transpose
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        ).reshape(targets.shape)
        return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def _first_tensor(batch: Batch) -> Tensor:
    if isinstance(batch, Mapping):
        for key in ("tokens", "input_ids", "inputs", "x"):
            if key in batch:
                return batch[key]
    for leaf in tensors(batch):
        return leaf
    raise invalid("batch", type(batch).__name__, "a token tensor, tuple or dict holding one")

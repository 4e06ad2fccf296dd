"""Multi-stage MAGIC: exact metagradients through pretraining and then finetuning.

A query of a finetuned model depends on the pretraining examples only through the parameters
carried from the pretrained model into the classifier (``shared``: the word embedding ``W``).
Pretraining, as :func:`influence.models.training.train` ran it, maps the pretraining data weights
``w`` to ``W_pt(w)``; finetuning maps ``W_pt`` to the finetuned parameters, in either mode of the
multi-stage influence function:

- ``"fixed"``: ``W`` is frozen at ``W_pt`` and enters every finetuning step and the query directly;
- ``"updated"``: ``W`` starts at ``W_pt`` and is trained, anchored to ``W_pt`` by the proximity
  penalty ``(alpha/2)||W - W_pt||^2`` of every step.

Both runs are replayed (:mod:`influence.methods.magic`), and the chain rule is applied exactly, up to
floating point: reverse-mode through the finetuning run from each query's gradient gives
``d f / d W_pt`` (the adjoint of ``W``'s initial value, plus every step's derivative with respect to
the frozen ``W`` or to the anchor, plus the query's own gradient with respect to a frozen ``W``);
placed at the pretrained model's carried parameters, it is the adjoint of the pretraining run's final
state, and reverse-mode through pretraining gives ``d f / d w_i`` for every pretraining example.
Unlike the multi-stage influence function, nothing assumes either run reached an optimum.

Scores are oriented as every method: ``score(x, z) = s * (-d f(x) / d w_z)``, the first-order change
of the query's badness when pretraining example ``z`` is removed from pretraining (both runs then
re-run with their seeds, as ``train(exclude=...)`` retrains).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from influence.batches import num_examples
from influence.exceptions import invalid
from influence.gradients.per_example import gradient_matrix, measurement_sign
from influence.methods.magic import (
    DEFAULT_BATCHED_QUERIES,
    TrainingRecipe,
    _backward,
    _check_replay,
    _forward,
    _prepared,
    _query_adjoints,
)
from influence.methods.multistage import DEFAULT_SHARED, _check_shared
from influence.task import Task
from influence.validation import check_positive_int


def multistage_magic_scores(
    pretrain_task: Task,
    pretrained_model: nn.Module,
    pretrain_data: Dataset | Mapping[str, Tensor],
    finetune_task: Task,
    finetuned_model: nn.Module,
    finetune_data: Dataset | Mapping[str, Tensor],
    query_data: Dataset,
    *,
    pretraining: TrainingRecipe,
    finetuning: TrainingRecipe,
    shared: Mapping[str, str] | None = None,
    segment_steps: int | None = None,
    replay_tolerance: float = 1e-3,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    batch_size: int = 64,
    query_batch: int = DEFAULT_BATCHED_QUERIES,
) -> Tensor:
    """Multi-stage MAGIC scores of every (query, pretraining example) pair.

    Args:
        pretrain_task: the pretraining task (its ``train_loss`` is what pretraining minimised).
        pretrained_model: the pretrained model (not modified): the pretraining replay must end at it.
        pretrain_data: the ``n_pt`` pretraining examples, as ``train`` was given them.
        finetune_task: the finetuning task (its ``measurement`` is the query's ``f``).
        finetuned_model: the finetuned model (not modified): the finetuning replay must end at it.
        finetune_data: the finetuning examples, as ``train`` was given them.
        query_data: the ``m`` queries.
        pretraining: how the pretrained model was trained (:class:`~influence.methods.magic.TrainingRecipe`).
        finetuning: how the finetuned model was trained; its ``initial_state`` holds the carried
            parameters at their pretrained values, and in ``"updated"`` mode its ``proximity``
            anchors them to those values. A carried parameter outside ``finetuning.trainable`` is
            the ``"fixed"`` mode.
        shared: ``{finetuned name: pretrained name}`` of the carried parameters (default
            ``{"embedding.weight": "embedding.weight"}``).
        segment_steps, replay_tolerance, device, dtype, batch_size, query_batch: as in
            :func:`~influence.methods.magic.magic_scores` (for both runs).

    Returns:
        Tensor ``[m, n_pt]`` on ``device``; positive means removing the pretraining example makes the
        query worse.

    Raises:
        InvalidArgumentError: a bad argument, or a recipe whose replay does not end at its model.
    """
    check_positive_int("query_batch", query_batch)
    shared = _check_shared(DEFAULT_SHARED if shared is None else shared, finetuned_model, pretrained_model)
    if isinstance(finetuning, TrainingRecipe) and finetuning.proximity is not None:
        unknown = sorted(set(finetuning.proximity.reference) - set(shared))
        if unknown:
            raise invalid("finetuning.proximity names", unknown, f"carried parameters among {sorted(shared)}")

    # finetuning: d f / d W_pt per query
    ft_replay, ft_schedule, ft_segment, ft_data = _prepared(
        finetune_task, finetuned_model, finetune_data, finetuning, segment_steps, replay_tolerance, device, dtype,
        "finetuning", inputs=list(shared))
    ft_saved, ft_state = _forward(ft_replay, ft_schedule, ft_segment, desc="MAGIC finetuning replay")
    final = _check_replay(ft_replay, ft_state, finetuned_model, replay_tolerance, "finetuning")
    frozen = [name for name in shared if name in ft_replay.context]
    names = ft_replay.names + frozen
    queries = gradient_matrix(finetune_task, finetuned_model, query_data, names, kind="measurement",
                              batch_size=batch_size, device=device, dtype=final.dtype)  # [m, P_trained + P_frozen]
    k = len(ft_replay.names)
    trained_size = sum(t.numel() for t in ft_state[:k])
    _, initial_adjoints, context_grads = _backward(
        ft_replay, ft_schedule, ft_saved, ft_segment, num_examples(ft_data),
        _query_adjoints(queries[:, :trained_size], ft_state, k), batched_queries=query_batch,
        desc="MAGIC finetuning reverse pass")
    sensitivity: list[dict[str, Tensor]] = []
    for q in range(queries.shape[0]):
        total: dict[str, Tensor] = {}
        start = trained_size
        for name in frozen:  # the query's own gradient with respect to a frozen carried parameter
            size = ft_replay.context[name].numel()
            total[name] = queries[q, start:start + size].reshape(ft_replay.context[name].shape).clone()
            start += size
        for name in shared:
            if name in ft_replay.names:  # the adjoint of its initial value
                total[name] = total.get(name, 0) + initial_adjoints[q][ft_replay.names.index(name)]
            for key in (name, f"reference:{name}"):  # every step's use of it (frozen) or of the anchor
                if key in context_grads[q]:
                    total[name] = total.get(name, 0) + context_grads[q][key]
        sensitivity.append(total)

    # pretraining: from the adjoint of the carried parameters at its end to every example's weight
    pt_replay, pt_schedule, pt_segment, pt_data = _prepared(
        pretrain_task, pretrained_model, pretrain_data, pretraining, segment_steps, replay_tolerance, device, dtype,
        "pretraining")
    pt_saved, pt_state = _forward(pt_replay, pt_schedule, pt_segment, desc="MAGIC pretraining replay")
    _check_replay(pt_replay, pt_state, pretrained_model, replay_tolerance, "pretraining")
    missing = [pt for pt in shared.values() if pt not in pt_replay.names]
    if missing:
        raise invalid("pretraining.trainable", pretraining.trainable, f"a selection that trains the carried parameters {missing}")
    adjoints = []
    for total in sensitivity:
        pieces = [torch.zeros_like(s) for s in pt_state]
        for ft_name, pt_name in shared.items():
            value = total.get(ft_name)
            if isinstance(value, Tensor):
                pieces[pt_replay.names.index(pt_name)] = value.to(pieces[0].dtype)
        adjoints.append(pieces)
    meta, _, _ = _backward(pt_replay, pt_schedule, pt_saved, pt_segment, num_examples(pt_data), adjoints,
                           batched_queries=query_batch, desc="MAGIC pretraining reverse pass")
    return -meta * measurement_sign(finetune_task)


__all__ = ["multistage_magic_scores"]

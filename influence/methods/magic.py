"""MAGIC: exact metagradients of a query's measurement with respect to per-example data weights.

Ilyas & Engstrom 2025 ("MAGIC: Near-Optimal Data Attribution for Deep Learning"). Training, as
:func:`influence.models.training.train` runs it, is a sequence of optimizer steps
``s_{t+1} = Phi_t(s_t, w)`` on the state ``s_t`` (the trained parameters ``theta_t``; for Adam also its
moments ``m_t``, ``v_t``). Step ``t`` takes the batch ``B_t`` of ``train``'s seeded data order and the
objective

    L_t(theta, w) = sum_{i in B_t} w_i l(z_i; theta) / sum_{i in B_t} w_i + R(theta),

which at ``w = 1`` is ``train``'s batch mean and with ``w_i = 0`` is its batch without ``z_i`` (what
``train(exclude=...)`` retrains). The metagradient ``d f(theta_T) / d w_i`` at ``w = 1`` is computed
exactly, up to floating point, by reverse-mode differentiation through every step: the adjoint of
the state goes from ``T`` back to ``0`` by vector-Jacobian products of ``Phi_t`` (second-order
products through the gradient inside the step), and each step adds its batch's share to the
metagradients of its examples (an example seen in several epochs collects every share).

Memory: the states are saved every ``segment_steps`` steps on a forward replay (``ceil(sqrt(T))``
by default), and each segment is replayed again, backwards, from its saved state: about
``2 sqrt(T)`` states held instead of ``T``. Cost: two first-order replays of the run, and per step
one second-order graph and one vector-Jacobian product per query (``bench/magic_cost.py`` prints it
as a multiple of one training run).

The scores are the first-order change of each query's measurement when a training example is
removed from the whole run, oriented as every method (positive = proponent):
``score(x, z) = s * (-d f(x) / d w_z)``.

The replay is checked: it must end where the given trained model is (relative distance at most
``replay_tolerance``), so a recipe that does not reproduce the model (another seed, learning rate,
initial state, optimizer, or a model with dropout) is refused instead of attributed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from influence.batches import collate_dataset, num_examples, rows, to_device
from influence.exceptions import InvalidArgumentError, invalid
from influence.gradients.layout import select_parameters
from influence.gradients.per_example import functional_state, gradient_matrix, measurement_sign, task_function
from influence.progress import progress
from influence.regularizers import Proximity, Regularizer
from influence.task import Task
from influence.validation import check_int_at_least, check_positive_float, check_positive_int

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which train() uses
ADAM_EPS = 1e-8
DEFAULT_BATCHED_QUERIES = 8


@dataclass(frozen=True)
class TrainingRecipe:
    """What :func:`influence.models.training.train` was called with: enough to replay the run.

    Attributes:
        initial_state: the model's state dict before training (``{name: tensor}``; buffers may be
            left out).
        epochs, batch_size, learning_rate, seed, optimizer, l2, trainable, proximity, l2_names: the
            arguments of the same names of ``train``.
    """

    initial_state: Mapping[str, Tensor]
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    optimizer: Literal["adam", "sgd"] = "adam"
    l2: float = 0.0
    trainable: str | Sequence[str] | None = None
    proximity: Proximity | None = None
    l2_names: str | Sequence[str] | None = None

    def check(self) -> None:
        """Raise :class:`InvalidArgumentError` naming the first bad field."""
        if not isinstance(self.initial_state, Mapping) or not self.initial_state:
            raise invalid("training.initial_state", type(self.initial_state).__name__, "a non-empty state dict")
        check_int_at_least("training.epochs", self.epochs, 1)
        check_int_at_least("training.batch_size", self.batch_size, 1)
        check_positive_float("training.learning_rate", self.learning_rate)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise invalid("training.seed", self.seed, "an integer")
        if self.optimizer not in ("adam", "sgd"):
            raise invalid("training.optimizer", self.optimizer, "'adam' or 'sgd'")


def _permutation(n: int, seed: int, epoch: int) -> Tensor:
    from influence.models.training import _permutation as permutation  # the very order train() used

    return permutation(n, seed, epoch)


def _schedule(recipe: TrainingRecipe, n: int) -> list[Tensor]:
    """The example indices of every step, in training order (``train``'s batches)."""
    steps = []
    for epoch in range(recipe.epochs):
        order = _permutation(n, recipe.seed, epoch)
        steps.extend(order[start:start + recipe.batch_size] for start in range(0, n, recipe.batch_size))
    return steps


def _safe_sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` whose derivative is 0 where ``v == 0`` (there the moments, and their derivatives, are 0)."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def _adam_direction(m: Tensor, v: Tensor, correction2: float) -> Tensor:
    """``m / (sqrt(v / correction2) + eps)``, Adam's step before the learning rate, with derivative 0 where ``v == 0``.

    ``v == 0`` means every gradient of that coordinate so far was exactly 0 (a word no batch has held
    yet), so ``m == 0`` and the step is 0. Its derivative in ``m`` would be ``1 / eps`` there, and for
    an embedding row anchored by a proximity penalty to its own initial value (``updated`` mode) the
    replay's adjoints through those ``1 / eps`` factors overflow and cancel to NaN, although along
    every perturbation a retraining makes (initial value and anchor moved together, no example
    holding the word) the coordinate's gradient stays exactly 0. Zero is that derivative.
    """
    touched = v > 0
    return torch.where(touched, m / (_safe_sqrt(v) / math.sqrt(correction2) + ADAM_EPS), torch.zeros_like(m))


class _Replay:
    """The training run as a function of the data weights: ``Phi_t`` and its vector-Jacobian products.

    ``inputs`` names parameters of the model that the run does not train but whose values are
    differentiated (a frozen carried embedding): they are taken from the recipe's initial state and
    passed to every step as ``context``. When the recipe's proximity penalty anchors trained
    parameters, its reference is part of the context too (``"reference:<name>"``), so the run is
    also a function of its anchor.
    """

    def __init__(self, task: Task, model: nn.Module, data: Any, recipe: TrainingRecipe, device: Any, dtype: Any,
                 inputs: Sequence[str] = ()) -> None:
        self.recipe = recipe
        self.names = select_parameters(model, "all" if recipe.trainable is None else recipe.trainable)
        initial = {n: t for n, t in model.state_dict().items()}
        unknown = sorted(set(recipe.initial_state) - set(initial))
        if unknown:
            raise invalid("training.initial_state keys", unknown[:5], "names of the model's state dict")
        missing = [n for n in self.names if n not in recipe.initial_state]
        if missing:
            raise invalid("training.initial_state", f"without {missing[:5]}", "a state dict holding every trained parameter")
        selected, fixed = functional_state(model, self.names, device=device, dtype=dtype)
        for name, value in recipe.initial_state.items():
            target = selected if name in selected else fixed
            if name in target:
                target[name] = value.detach().to(device=target[name].device, dtype=target[name].dtype)
        self.theta0 = selected
        self.context = {name: fixed.pop(name) for name in inputs if name not in self.names}
        self.fn = task_function(task, model, "train_loss", fixed)
        covered = self.names if recipe.l2_names is None else [
            n for n in select_parameters(model, recipe.l2_names) if n in self.names]
        proximity = None if recipe.proximity is None else recipe.proximity.to(device)
        self.alpha = 0.0
        if proximity is not None and inputs:  # the anchor becomes an input of every step
            self.alpha = proximity.alpha
            dtype_of = next(iter(selected.values())).dtype
            self.context.update({f"reference:{n}": r.to(dtype=dtype_of) for n, r in proximity.reference.items()})
            proximity = None
        self.regularizer = Regularizer(l2=recipe.l2, proximity=proximity, l2_names=tuple(covered))
        self.data = data
        self.adam = recipe.optimizer == "adam"

    def initial_state(self) -> list[Tensor]:
        theta = [self.theta0[n] for n in self.names]
        if not self.adam:
            return theta
        return theta + [torch.zeros_like(t) for t in theta] + [torch.zeros_like(t) for t in theta]

    def step(self, state: list[Tensor], t: int, index: Tensor, weights: Tensor, create_graph: bool,
             context: dict[str, Tensor] | None = None) -> list[Tensor]:
        """``Phi_t(state, weights; context)``: one optimizer step (``t`` counts from 0) on the batch ``index``."""
        k = len(self.names)
        theta = dict(zip(self.names, state[:k]))
        context = self.context if context is None else context
        frozen = {n: v for n, v in context.items() if not n.startswith("reference:")}
        losses = self.fn({**frozen, **theta}, rows(self.data, index))
        objective = (weights * losses).sum() / weights.sum()
        if not self.regularizer.is_zero:
            objective = objective + self.regularizer(theta)
        anchored = [(theta[n[len("reference:"):]], v) for n, v in context.items()
                    if n.startswith("reference:") and n[len("reference:"):] in theta]
        if self.alpha and anchored:
            objective = objective + 0.5 * self.alpha * sum(((p - r) ** 2).sum() for p, r in anchored)
        grads = torch.autograd.grad(objective, state[:k], create_graph=create_graph, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(state[:k], grads)]
        lr = float(self.recipe.learning_rate)
        if not self.adam:
            return [p - lr * g for p, g in zip(state[:k], grads)]
        beta1, beta2 = ADAM_BETAS
        m = [beta1 * m + (1 - beta1) * g for m, g in zip(state[k:2 * k], grads)]
        v = [beta2 * v + (1 - beta2) * g * g for v, g in zip(state[2 * k:], grads)]
        correction1, correction2 = 1 - beta1 ** (t + 1), 1 - beta2 ** (t + 1)
        theta_next = [p - (lr / correction1) * _adam_direction(mi, vi, correction2) for p, mi, vi in zip(state[:k], m, v)]
        return theta_next + m + v


def _leaves(state: list[Tensor]) -> list[Tensor]:
    return [s.detach().requires_grad_(True) for s in state]


def _forward(replay: _Replay, schedule: list[Tensor], segment: int,
             desc: str = "MAGIC replay") -> tuple[dict[int, list[Tensor]], list[Tensor]]:
    """Replay the run once: ``(states saved every `segment` steps, final state)``; ``desc`` labels the progress bar."""
    saved: dict[int, list[Tensor]] = {}
    state = replay.initial_state()
    with torch.enable_grad():
        for t, index in enumerate(progress(schedule, desc=desc, unit="step")):
            if t % segment == 0:
                saved[t] = [s.detach() for s in state]
            ones = torch.ones(len(index), device=state[0].device, dtype=state[0].dtype)
            state = [s.detach() for s in replay.step(_leaves(state), t, index, ones, create_graph=False)]
    return saved, state


def _check_replay(replay: _Replay, state: list[Tensor], model: nn.Module, replay_tolerance: float, argument: str) -> Tensor:
    """The replayed final parameters, flat; refuse a replay that does not end at ``model``."""
    k = len(replay.names)
    trained = dict(model.named_parameters())
    final = torch.cat([s.reshape(-1) for s in state[:k]])
    target = torch.cat([trained[name].detach().to(final).reshape(-1) for name in replay.names])
    distance = float(torch.linalg.vector_norm(final - target) / torch.linalg.vector_norm(target).clamp_min(1e-30))
    if not distance <= replay_tolerance:
        raise InvalidArgumentError(
            f"the replayed training run ({argument}) ends {distance:.3g} (relative) away from the given model, above "
            f"replay_tolerance={replay_tolerance}: the training recipe (initial state, seed, epochs, batch size, "
            "learning rate, optimizer, penalties) does not reproduce this model"
        )
    return final


def _query_groups(m: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, m))) for start in range(0, m, max(1, size))]


def _backward(
    replay: _Replay, schedule: list[Tensor], saved: dict[int, list[Tensor]], segment: int, n: int,
    adjoints: list[list[Tensor]], batched_queries: int = DEFAULT_BATCHED_QUERIES, desc: str = "MAGIC reverse pass",
) -> tuple[Tensor, list[list[Tensor]], list[dict[str, Tensor]]]:
    """Reverse-mode through the whole run, from each query's adjoint of the final state.

    Args:
        adjoints: per query, the adjoint of the final state (one tensor per state tensor).
        batched_queries: queries whose vector-Jacobian products are computed in one vmapped call
            (``is_grads_batched``; memory grows with it); 1 computes them one by one.
        desc: the label of the progress bar (one tick per segment, from the last to the first).

    Returns:
        ``(metagradients [m, n] = d f / d w, adjoints of the initial state per query,
        d f / d context per query)``.
    """
    total, m = len(schedule), len(adjoints)
    like = adjoints[0][0]
    meta = torch.zeros(m, n, dtype=like.dtype, device=like.device)
    context_grads = [{name: torch.zeros_like(v) for name, v in replay.context.items()} for _ in range(m)]
    with torch.enable_grad():
        for first in progress(sorted(saved, reverse=True), desc=desc, unit="segment"):
            last = min(first + segment, total)
            states = [saved[first]]
            for t in range(first, last - 1):
                ones = torch.ones(len(schedule[t]), device=like.device, dtype=like.dtype)
                states.append([s.detach() for s in replay.step(_leaves(states[-1]), t, schedule[t], ones, create_graph=False)])
            for t in range(last - 1, first - 1, -1):
                index = schedule[t]
                inputs = _leaves(states[t - first])
                context = {name: v.detach().requires_grad_(True) for name, v in replay.context.items()}
                weights = torch.ones(len(index), device=like.device, dtype=like.dtype, requires_grad=True)
                outputs = replay.step(inputs, t, index, weights, create_graph=True, context=context)
                used = [(o, i) for i, o in enumerate(outputs) if o.requires_grad]
                wrt = inputs + [weights] + list(context.values())
                k = len(inputs)
                for group in _query_groups(m, batched_queries):
                    if len(group) > 1:  # the queries' vector-Jacobian products in one vmapped call
                        stacked = [torch.stack([adjoints[q][i] for q in group]) for _, i in used]
                        batched = torch.autograd.grad([o for o, _ in used], wrt, grad_outputs=stacked, retain_graph=True,
                                                      allow_unused=True, is_grads_batched=True)
                        per_query = [[None if g is None else g[j] for g in batched] for j in range(len(group))]
                    else:
                        per_query = [torch.autograd.grad([o for o, _ in used], wrt, retain_graph=True, allow_unused=True,
                                                         grad_outputs=[adjoints[group[0]][i] for _, i in used])]
                    for q, grads in zip(group, per_query):
                        adjoints[q] = [torch.zeros_like(s) if g is None else g.detach() for s, g in zip(inputs, grads[:k])]
                        if grads[k] is not None:
                            meta[q].index_add_(0, index.to(meta.device), grads[k].detach())
                        for name, g in zip(context, grads[k + 1:]):
                            if g is not None:
                                context_grads[q][name] += g.detach()
                del outputs, used
            del states
    return meta, adjoints, context_grads


def _query_adjoints(queries: Tensor, state: list[Tensor], k: int) -> list[list[Tensor]]:
    """Per query, the adjoint of the final state: the query gradient ``[m, P]`` over the trained
    parameters, unflattened; zeros for the optimizer's moments (they do not enter ``f``)."""
    shapes = [s.shape for s in state]
    adjoints = []
    for q in range(queries.shape[0]):
        pieces, start = [], 0
        for shape in shapes[:k]:
            size = math.prod(shape)
            pieces.append(queries[q, start:start + size].reshape(shape))
            start += size
        adjoints.append(pieces + [torch.zeros(shape, dtype=queries.dtype, device=queries.device) for shape in shapes[k:]])
    return adjoints


def magic_scores(
    task: Task,
    model: nn.Module,
    train_data: Dataset | Mapping[str, Tensor],
    query_data: Dataset,
    *,
    training: TrainingRecipe,
    segment_steps: int | None = None,
    replay_tolerance: float = 1e-3,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    batch_size: int = 64,
    query_batch: int = DEFAULT_BATCHED_QUERIES,
) -> Tensor:
    """MAGIC scores of every (query, training example) pair: ``s * (-d f(x) / d w_z)`` through the whole run.

    Args:
        task: gives the per-example training loss and the query measurement.
        model: the trained model (not modified): the replay must end at its parameters.
        train_data: the ``n`` training examples, as ``train`` was given them (same order).
        query_data: the ``m`` queries.
        training: how the model was trained (:class:`TrainingRecipe`).
        segment_steps: steps between saved states (default ``ceil(sqrt(T))``); memory is about
            ``T / segment_steps + segment_steps`` states.
        replay_tolerance: largest accepted ``||theta_T(replay) - theta(model)|| / ||theta(model)||``.
        device: device of the computation.
        dtype: floating dtype of the computation (default: the model's).
        batch_size: examples per batch of the queries' measurement gradients.
        query_batch: queries carried back through each step together (one vmapped vector-Jacobian
            product; memory grows with it); 1: one by one.

    Returns:
        Tensor ``[m, n]`` on ``device``; positive means removing ``z`` from training makes ``x`` worse.

    Raises:
        InvalidArgumentError: a bad argument, or a recipe whose replay does not end at ``model``.
    """
    check_positive_int("query_batch", query_batch)
    replay, schedule, segment, data = _prepared(task, model, train_data, training, segment_steps, replay_tolerance,
                                                device, dtype, "training")
    saved, state = _forward(replay, schedule, segment)
    final = _check_replay(replay, state, model, replay_tolerance, "training")
    queries = gradient_matrix(task, model, query_data, replay.names, kind="measurement", batch_size=batch_size,
                              device=device, dtype=final.dtype)
    meta, _, _ = _backward(replay, schedule, saved, segment, num_examples(data), _query_adjoints(queries, state, len(replay.names)),
                           batched_queries=query_batch)
    return -meta * measurement_sign(task)


def _prepared(task, model, train_data, training, segment_steps, replay_tolerance, device, dtype, argument, inputs=()):
    """``(replay, schedule, segment, data)`` of a recipe, arguments checked."""
    if not isinstance(training, TrainingRecipe):
        raise invalid(argument, type(training).__name__, "an influence.methods.magic.TrainingRecipe")
    training.check()
    check_positive_int("segment_steps", segment_steps, allow_none=True)
    check_positive_float("replay_tolerance", replay_tolerance)
    data = to_device(collate_dataset(train_data), device)
    replay = _Replay(task, model, data, training, device, dtype, inputs=inputs)
    schedule = _schedule(training, num_examples(data))
    return replay, schedule, segment_steps or max(1, math.ceil(math.sqrt(len(schedule)))), data


__all__ = ["TrainingRecipe", "magic_scores"]

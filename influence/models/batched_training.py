"""Counterfactual retraining in batches: many removal sets trained at once over one data order.

Case deletion and the LDS retrain a model many times, each time without some examples, keeping the
data order of the full run (:func:`influence.models.training.train` with ``exclude``). Those runs
differ only in which examples of each batch count, so ``R`` of them can be one computation: the
trainable parameters are stacked along a leading dimension ``R``, every step evaluates the shared
batch once per member with :func:`torch.func.vmap`, and member ``r``'s loss weighs example ``i``
by ``w_ri`` (1 kept, 0 removed)::

    L_r(theta_r) = sum_{i in B_t} w_ri l(z_i; theta_r) / sum_{i in B_t} w_ri + R(theta_r)

which is ``train(exclude=removed_r)``'s batch mean. The members' objectives are independent, so the
gradient of their sum with respect to the stack is each member's own gradient. The optimizer step
(Adam with torch's defaults, or plain SGD) is applied member by member along the stack, each with
its own step count; a member whose batch is all removed skips the step, as ``train`` does.

The result equals ``R`` calls of ``train(exclude=...)`` up to floating-point rounding (the batched
kernels sum in another order): ``tests/test_batched_training.py`` checks it in float64 to 1e-10 and
``bench/batched_retraining.py`` prints the speed-up over one run after another.

The model must draw no random numbers in training mode (no dropout) and hold no buffers that
training changes (no batch norm), as for MAGIC's replay and for per-example gradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from influence.batches import collate_dataset, num_examples, rows, to_device
from influence.exceptions import InvalidArgumentError, invalid
from influence.gradients.layout import select_parameters
from influence.gradients.per_example import functional_state, task_function
from influence.models.training import _permutation, check_proximity_shapes, check_schedule, intra_op_threads
from influence.progress import progress
from influence.regularizers import Proximity, Regularizer
from influence.task import Task
from influence.validation import check_int_at_least, check_positive_int

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which train() uses
ADAM_EPS = 1e-8
DEFAULT_GROUP = 16


@dataclass
class BatchedTrainResult:
    """What :func:`train_without` did.

    Attributes:
        states: one state dict per removal set, in their order: the model's state with the trained
            parameters replaced (load it with ``model.load_state_dict``).
        steps: optimizer steps each member took (fewer than the full run's when a batch was all removed).
        seconds: wall-clock time of the whole call.
        trainable: names of the trained parameters.
    """

    states: list[dict[str, Tensor]]
    steps: list[int]
    seconds: float
    trainable: list[str]


def _check_removals(removals: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    if isinstance(removals, (str, bytes)) or not isinstance(removals, Sequence) or not removals:
        raise invalid("removals", removals if isinstance(removals, (str, bytes)) else type(removals).__name__,
                      "a non-empty sequence of removal sets (sequences of example indices)")
    checked = []
    for r, removed in enumerate(removals):
        if isinstance(removed, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in removed):
            raise invalid(f"removals[{r}]", removed if isinstance(removed, (str, bytes)) else list(removed)[:5],
                          "a sequence of example indices (ints)")
        if len(set(removed)) != len(removed):
            raise invalid(f"removals[{r}]", sorted(removed)[:10], "distinct example indices")
        outside = [i for i in removed if not 0 <= i < n]
        if outside:
            raise invalid(f"removals[{r}]", outside[:5], f"indices in [0, {n})")
        checked.append(sorted(int(i) for i in removed))
    return checked


class _Members:
    """``R`` copies of the trainable parameters, stacked (``{name: [R, ...]}``), with their optimizer state."""

    def __init__(self, stacked: dict[str, Tensor], adam: bool) -> None:
        self.names = list(stacked)
        self.theta = {n: t.clone() for n, t in stacked.items()}
        self.adam = adam
        self.steps = torch.zeros(next(iter(stacked.values())).shape[0], dtype=torch.long)
        if adam:
            self.m = {n: torch.zeros_like(t) for n, t in self.theta.items()}
            self.v = {n: torch.zeros_like(t) for n, t in self.theta.items()}

    def step(self, grads: dict[str, Tensor], active: Tensor, lr: float) -> None:
        """One optimizer step of every active member (``active`` ``[R]`` bools); the others stay as they are."""
        self.steps += active.to(self.steps.dtype)
        uniform = bool(active.all()) and bool((self.steps == self.steps[0]).all())
        beta1, beta2 = ADAM_BETAS
        for name in self.names:
            theta, g = self.theta[name], grads[name]
            if uniform:  # every member at the same step: torch's own in-place Adam / SGD arithmetic
                if not self.adam:
                    theta.add_(g, alpha=-lr)
                    continue
                m, v, t = self.m[name], self.v[name], int(self.steps[0])
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(ADAM_EPS)
                theta.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
                continue
            shape = (-1,) + (1,) * (theta.dim() - 1)
            on = active.to(theta.device).reshape(shape)
            if not self.adam:
                theta.sub_(torch.where(on, lr * g, torch.zeros_like(g)))
                continue
            m, v = self.m[name], self.v[name]
            m.copy_(torch.where(on, torch.lerp(m, g, 1 - beta1), m))
            v.copy_(torch.where(on, v * beta2 + (1 - beta2) * g * g, v))
            t = self.steps.to(device=theta.device, dtype=theta.dtype).clamp_min(1).reshape(shape)
            denom = v.sqrt() / torch.sqrt(1 - beta2 ** t) + ADAM_EPS
            update = (lr / (1 - beta1 ** t)) * m / denom
            theta.sub_(torch.where(on, update, torch.zeros_like(update)))


def train_without(
    model: nn.Module,
    task: Task,
    dataset: Dataset | Mapping[str, Tensor],
    removals: Sequence[Sequence[int]],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    optimizer: Literal["adam", "sgd"] = "adam",
    l2: float = 0.0,
    trainable: str | Sequence[str] | None = None,
    proximity: Proximity | Sequence[Proximity] | None = None,
    l2_names: str | Sequence[str] | None = None,
    initial_states: Sequence[Mapping[str, Tensor]] | None = None,
    group_size: int = DEFAULT_GROUP,
    device: torch.device | str = "cpu",
    num_threads: int | None = None,
) -> BatchedTrainResult:
    """Train ``model`` once per removal set, ``group_size`` sets at a time, each as ``train(exclude=set)`` would.

    Args:
        model: the model in its initial state (not modified); every member starts from it unless
            ``initial_states`` says otherwise.
        task: gives ``train_loss(model, batch) -> [B]``.
        dataset: the ``n`` examples, as ``train`` takes them.
        removals: ``R`` removal sets, each a sequence of distinct example indices in ``[0, n)`` (an
            empty one is the full run).
        epochs, batch_size, learning_rate, seed, optimizer, l2, trainable, l2_names: as in
            :func:`influence.models.training.train`.
        proximity: as in ``train``, or one :class:`Proximity` per member (equal ``alpha`` and names;
            each member anchored to its own reference, e.g. its own pretrained embedding).
        initial_states: one state dict per member (the model's keys; e.g. classifiers carrying
            different pretrained embeddings): member ``r`` starts from ``initial_states[r]``,
            trainable and frozen parameters alike; ``None``: every member starts from ``model``.
        group_size: members trained together (memory: that many copies of the trainable parameters,
            their optimizer state and the batch's activations).
        device: where to train.
        num_threads: torch intra-op threads while training (``None``: leave the setting).

    Returns:
        A :class:`BatchedTrainResult` with ``R`` state dicts.

    Raises:
        InvalidArgumentError: a bad argument, or a model whose training step draws random numbers.
    """
    check_schedule(epochs, batch_size, seed, learning_rate, optimizer)
    check_positive_int("group_size", group_size)
    if num_threads is not None:
        check_int_at_least("num_threads", num_threads, 1)
    started = time.perf_counter()
    data = to_device(collate_dataset(dataset), device)
    n = num_examples(data)
    removal_sets = _check_removals(removals, n)
    names = select_parameters(model, "all" if trainable is None else trainable)
    covered = names if l2_names is None else [m for m in select_parameters(model, l2_names) if m in names]
    params = dict(model.named_parameters())
    proximities = _check_proximities(proximity, params, len(removal_sets), device)
    states = _check_initial_states(initial_states, model, len(removal_sets))
    was_training = model.training
    model.train()
    try:
        schedule = [(epoch, _permutation(n, seed, epoch).to(device)) for epoch in range(epochs)]
        trained, steps = [], []
        with intra_op_threads(num_threads):
            groups = range(0, len(removal_sets), group_size)
            for first in progress(groups, desc=f"retraining {len(removal_sets)} runs", unit="group"):
                group = removal_sets[first:first + group_size]
                kept = torch.ones(len(group), n, dtype=torch.bool, device=device)
                for r, removed in enumerate(group):
                    kept[r, removed] = False
                starts = None if states is None else states[first:first + group_size]
                base = {k: v.detach().clone() for k, v in (model.state_dict() if starts is None else starts[0]).items()}
                selected, fixed, varying = _stacked_start(model, names, starts, len(group), device)
                losses_of = torch.func.vmap(task_function(task, model, "train_loss", fixed), in_dims=(0, None))
                penalty_of = _penalty(l2, covered, proximities, first, len(group))
                members = _train_group(selected, varying, kept, schedule, losses_of, penalty_of, data, batch_size,
                                       float(learning_rate), optimizer == "adam")
                for r in range(len(group)):
                    state = dict(base if starts is None else {k: v.detach().clone() for k, v in starts[r].items()})
                    state.update({name: members.theta[name][r].detach().clone() for name in names})
                    trained.append(state)
                steps.extend(int(step) for step in members.steps)
    finally:
        model.train(was_training)
    return BatchedTrainResult(states=trained, steps=steps, seconds=time.perf_counter() - started, trainable=list(names))


def _check_proximities(proximity, params, count: int, device) -> list[Proximity] | None:
    """One :class:`Proximity` per member (moved to ``device``), or ``None``."""
    if proximity is None:
        return None
    many = not isinstance(proximity, Proximity)
    listed = list(proximity) if many else [proximity]
    if many and len(listed) != count:
        raise invalid("proximity", f"{len(listed)} penalties", f"one Proximity, or one per removal set ({count})")
    for p in listed:
        if not isinstance(p, Proximity):
            raise invalid("proximity", type(p).__name__, "a Proximity or a sequence of them")
        if p.alpha != listed[0].alpha or set(p.reference) != set(listed[0].reference):
            raise invalid("proximity", f"alpha {p.alpha} over {sorted(p.reference)}",
                          f"the same alpha and names for every member ({listed[0].alpha} over {sorted(listed[0].reference)})")
        check_proximity_shapes(p, params)
    moved = [p.to(device) for p in listed]
    return moved if many else moved * count


def _check_initial_states(initial_states, model: nn.Module, count: int) -> list[Mapping[str, Tensor]] | None:
    if initial_states is None:
        return None
    states = list(initial_states)
    if len(states) != count:
        raise invalid("initial_states", f"{len(states)} states", f"one per removal set ({count})")
    expected = set(model.state_dict())
    for r, state in enumerate(states):
        if not isinstance(state, Mapping) or set(state) != expected:
            shown = sorted(set(state) ^ expected)[:5] if isinstance(state, Mapping) else type(state).__name__
            raise invalid(f"initial_states[{r}]", shown, "a state dict with exactly the model's keys")
    return states


def _stacked_start(model: nn.Module, names: list[str], starts, size: int, device):
    """``(trainable {name: [R, ...]}, common fixed {name: tensor}, varying frozen {name: [R, ...]})``."""
    selected, fixed = functional_state(model, names, device=device)
    if starts is None:
        stacked = {n: t.unsqueeze(0).repeat(size, *([1] * t.dim())).contiguous() for n, t in selected.items()}
        return stacked, fixed, {}
    stacked = {n: torch.stack([s[n].detach().to(device=device, dtype=selected[n].dtype) for s in starts]) for n in names}
    varying = {}
    for name in list(fixed):
        values = [s[name].detach().to(device=device, dtype=fixed[name].dtype) for s in starts]
        if any(not torch.equal(values[0], v) for v in values[1:]):
            varying[name] = torch.stack(values)
            del fixed[name]
        else:
            fixed[name] = values[0]
    return stacked, fixed, varying


def _penalty(l2: float, covered: list[str], proximities: list[Proximity] | None, first: int, size: int):
    """``penalty_of(theta [R, ...]) -> [R]`` for the group's members, or ``None`` when there is no penalty."""
    if proximities is None:
        regularizer = Regularizer(l2=l2, l2_names=tuple(covered))
        return None if regularizer.is_zero else torch.func.vmap(regularizer)
    mine = proximities[first:first + size]
    alpha = mine[0].alpha
    if l2 == 0.0 and alpha == 0.0:
        return None
    references = {name: torch.stack([p.reference[name] for p in mine]) for name in mine[0].reference}

    def one(theta: dict[str, Tensor], reference: dict[str, Tensor]) -> Tensor:
        return Regularizer(l2=l2, proximity=Proximity(alpha, reference), l2_names=tuple(covered))(theta)

    batched = torch.func.vmap(one)
    return lambda theta: batched(theta, references)


def _train_group(selected, varying, kept, schedule, losses_of, penalty_of, data, batch_size, lr, adam) -> _Members:
    members = _Members(selected, adam)
    n = kept.shape[1]
    dtype = next(iter(selected.values())).dtype
    for _, order in progress(schedule, desc=f"{kept.shape[0]} runs at once", unit="epoch", leave=False):
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            weights = kept[:, index].to(dtype)  # [R, b]
            counts = weights.sum(dim=1)  # [R]
            active = counts > 0
            if not bool(active.any()):
                continue
            theta = {name: t.requires_grad_(True) for name, t in members.theta.items()}
            try:
                losses = losses_of({**varying, **theta}, rows(data, index))  # [R, b]
            except RuntimeError as err:
                if "randomness" in str(err):
                    raise InvalidArgumentError(
                        "the model draws random numbers in training mode (dropout?): batched retraining needs a "
                        "deterministic training step; turn dropout off or retrain one run at a time") from err
                raise
            objective = ((weights * losses).sum(dim=1) / counts.clamp_min(1)).sum()
            if penalty_of is not None:
                objective = objective + (penalty_of(theta) * active.to(dtype)).sum()
            grads = torch.autograd.grad(objective, list(theta.values()))
            with torch.no_grad():
                members.theta = {name: t.detach() for name, t in theta.items()}
                members.step(dict(zip(theta, grads)), active, lr)
    members.theta = {name: t.detach() for name, t in members.theta.items()}
    return members


__all__ = ["BatchedTrainResult", "train_without"]

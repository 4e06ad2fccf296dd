"""The penalty terms of a training objective, as functions of the parameters.

``Regularizer`` is ``R(params) = (l2 / 2) * sum_{n in l2_names} ||p[n]||^2 + Proximity``, the exact
penalty :func:`influence.models.training.train` adds to the loss. Influence code adds the very same
term to its Hessian (``Objective(regularizer=...)``), so the curvature is that of the objective
actually minimised. ``Proximity`` is ``(alpha / 2) * sum_n ||p[n] - reference[n]||^2``, the
penalty of the multi-stage paper's "embedding updated" finetuning (Chen et al. 2020).

Anything with the call signature of :data:`RegularizerLike` is accepted where a regulariser is;
:func:`add_penalties` sums several.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from influence.exceptions import invalid
from influence.validation import check_non_negative_float

RegularizerLike = Callable[[Mapping[str, Tensor]], Tensor]


@dataclass(frozen=True, eq=False)
class Proximity:
    """Proximity penalty ``(alpha / 2) * sum_name ||p_name - reference[name]||^2``.

    Args:
        alpha: strength, ``>= 0``.
        reference: ``name -> tensor`` of the anchor values (e.g. the pretrained embedding
            ``{"embedding.weight": [V, E]}``); stored detached.
    """

    alpha: float
    reference: Mapping[str, Tensor]

    def __post_init__(self) -> None:
        check_non_negative_float("alpha", self.alpha)
        if not self.reference:
            raise invalid("reference", dict(self.reference), "a non-empty dict of parameter tensors")
        for name, value in self.reference.items():
            if not isinstance(value, Tensor):
                raise invalid(f"reference[{name!r}]", type(value).__name__, "a torch.Tensor")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "reference", {n: v.detach() for n, v in self.reference.items()})

    @classmethod
    def from_model(cls, model: nn.Module, names: str | Sequence[str], alpha: float) -> "Proximity":
        """Anchor the parameters ``names`` (a selector of ``select_parameters``) at their current values."""
        from influence.gradients.layout import select_parameters

        params = dict(model.named_parameters())
        chosen = select_parameters(model, names)
        return cls(alpha, {n: params[n].detach().clone() for n in chosen})

    def to(self, device: torch.device | str) -> "Proximity":
        """The same penalty with the reference tensors on ``device``."""
        return Proximity(self.alpha, {n: v.to(device) for n, v in self.reference.items()})

    def penalty(self, params: Mapping[str, Tensor]) -> Tensor:
        """The penalty over the reference names present in ``params`` (a 0-dim tensor)."""
        terms = [
            ((params[n] - ref.to(dtype=params[n].dtype, device=params[n].device)) ** 2).sum()
            for n, ref in self.reference.items()
            if n in params
        ]
        if not terms:
            return _zero(params)
        return 0.5 * self.alpha * torch.stack(terms).sum()

    __call__ = penalty


@dataclass(frozen=True, eq=False)
class Regularizer:
    """The penalty terms of the training objective, as ``R(params) -> scalar``.

    ``R(p) = (l2 / 2) * sum_{n in l2_names} ||p[n]||^2 + proximity.penalty(p)``. Names absent from
    ``params`` are skipped, so ``R`` can be given every named parameter of the model (as
    :class:`influence.gradients.objective.Objective` does) or just the selected ones; either way
    its gradient and Hessian with respect to the given tensors are exact.

    Args:
        l2: L2 strength, ``>= 0``.
        proximity: optional proximity penalty.
        l2_names: names the L2 term covers (the trainable parameters); ``None``: every name given.
    """

    l2: float = 0.0
    proximity: Proximity | None = None
    l2_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_non_negative_float("l2", self.l2)
        object.__setattr__(self, "l2", float(self.l2))
        if self.l2_names is not None:
            object.__setattr__(self, "l2_names", tuple(self.l2_names))

    @property
    def is_zero(self) -> bool:
        """``True`` when the penalty is identically zero."""
        return self.l2 == 0.0 and (self.proximity is None or self.proximity.alpha == 0.0)

    def __call__(self, params: Mapping[str, Tensor]) -> Tensor:
        """Value of the penalty.

        Args:
            params: ``name -> tensor`` (any shapes; under ``torch.func`` transforms too).

        Returns:
            A 0-dim tensor.
        """
        total = _zero(params)
        if self.l2 != 0.0:
            names = params.keys() if self.l2_names is None else [n for n in self.l2_names if n in params]
            terms = [(params[n] ** 2).sum() for n in names]
            if terms:
                total = total + 0.5 * self.l2 * torch.stack(terms).sum()
        if self.proximity is not None and self.proximity.alpha != 0.0:
            total = total + self.proximity.penalty(params)
        return total


def _zero(params: Mapping[str, Tensor]) -> Tensor:
    first = next(iter(params.values()), None)
    if first is None:
        return torch.zeros(())
    return first.new_zeros(())


def add_penalties(*terms: RegularizerLike | None) -> RegularizerLike | None:
    """The sum of the given penalties (``None`` entries left out; ``None`` when none is left)."""
    present = [t for t in terms if t is not None]
    if len(present) <= 1:
        return present[0] if present else None

    def total(params: Mapping[str, Tensor]) -> Tensor:
        return sum(t(params) for t in present)

    return total


def with_proximity(regularizer: RegularizerLike | None, proximity: Proximity) -> RegularizerLike:
    """``regularizer`` plus ``proximity``: a :class:`Regularizer` without one gets it as its own term."""
    if isinstance(regularizer, Regularizer) and regularizer.proximity is None:
        return dataclasses.replace(regularizer, proximity=proximity)
    return add_penalties(regularizer, proximity)


__all__ = ["Proximity", "Regularizer", "RegularizerLike", "add_penalties", "with_proximity"]

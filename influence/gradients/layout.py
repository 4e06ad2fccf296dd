"""Which parameters an attribution looks at, and how they map to one flat vector.

Every vector the library handles (a gradient, a Hessian-vector product, a query-side vector)
is a flat tensor ``[P]`` (or ``[m, P]`` for ``m`` vectors at once) over a fixed, ordered set of
named parameters. :class:`ParameterLayout` records that order, shapes and offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from influence.exceptions import invalid


def select_parameters(model: nn.Module, params: str | Sequence[str] = "all") -> list[str]:
    """Names of the parameters an attribution uses, in the model's order.

    Args:
        model: the model.
        params: ``"all"`` (every parameter that requires grad), ``"last"`` (the parameters of the
            last module that owns parameters), ``"embedding"`` (the weights of every
            ``nn.Embedding``), or a list of module names or parameter names; a module name selects
            every parameter under it (``"encoder"`` selects ``"encoder.weight"``, ``"encoder.bias"``).

    Returns:
        Parameter names, e.g. ``["encoder.weight", "encoder.bias", "head.weight", "head.bias"]``.
    """
    named = [(n, p) for n, p in model.named_parameters()]
    if isinstance(params, str):
        if params == "all":
            names = [n for n, p in named if p.requires_grad]
        elif params == "last":
            owners = [n.rsplit(".", 1)[0] if "." in n else "" for n, _ in named if _.requires_grad]
            if not owners:
                raise invalid("params", params, "a model with at least one trainable parameter")
            last = owners[-1]
            names = [n for n, _ in named if (n.rsplit(".", 1)[0] if "." in n else "") == last]
        elif params == "embedding":
            names = [
                f"{mod_name}.weight" if mod_name else "weight"
                for mod_name, mod in model.named_modules()
                if isinstance(mod, nn.Embedding)
            ]
        else:
            names = _by_prefix(named, [params])
    else:
        names = _by_prefix(named, list(params))
    if not names:
        available = sorted({n.rsplit(".", 1)[0] for n, _ in named})
        raise invalid(
            "params", params, f"'all', 'last', 'embedding' or module names among {available}"
        )
    return names


def _by_prefix(named: list[tuple[str, nn.Parameter]], prefixes: list[str]) -> list[str]:
    all_names = [n for n, _ in named]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in all_names):
            available = sorted({n.rsplit(".", 1)[0] for n in all_names})
            raise invalid("params", prefix, f"a module or parameter name among {available}")
    return [n for n in all_names if any(n == p or n.startswith(p + ".") for p in prefixes)]


@dataclass(frozen=True)
class ParameterLayout:
    """Ordered names, shapes and offsets of parameters inside a flat vector ``[P]``."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module, names: Sequence[str]) -> "ParameterLayout":
        """Layout of the parameters ``names`` of ``model``."""
        params = dict(model.named_parameters())
        return cls(tuple(names), tuple(params[n].shape for n in names))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def numel(self) -> int:
        """``P``, the length of a flat vector."""
        return sum(self.sizes)

    def offsets(self) -> dict[str, tuple[int, int]]:
        """``name -> (start, stop)`` inside the flat vector."""
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes):
            out[name] = (start, start + size)
            start += size
        return out

    def flatten(self, tensors: dict[str, Tensor], batch_dims: int = 0) -> Tensor:
        """Concatenate ``{name: [*batch, *shape]}`` into ``[*batch, P]`` (differentiable, transform-safe)."""
        parts = []
        for name in self.names:
            t = tensors[name]
            parts.append(t.reshape(*t.shape[:batch_dims], -1))
        return torch.cat(parts, dim=-1)

    def flatten_copy(self, tensors: dict[str, Tensor], batch_dims: int = 0, dtype: torch.dtype | None = None) -> Tensor:
        """:meth:`flatten` of detached tensors into a new ``[*batch, P]`` buffer, cast to ``dtype`` if given.

        Copies each piece into place (several times faster than ``torch.cat`` on the CPU, and the
        cast costs no extra pass); not differentiable and not for use inside ``torch.func`` transforms.
        """
        first = tensors[self.names[0]]
        out = torch.empty(*first.shape[:batch_dims], self.numel, dtype=dtype or first.dtype, device=first.device)
        for (name, (start, stop)) in self.offsets().items():
            t = tensors[name]
            out[..., start:stop].copy_(t.reshape(*t.shape[:batch_dims], -1))
        return out

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split ``[*batch, P]`` into ``{name: [*batch, *shape]}``."""
        batch = flat.shape[:-1]
        out = {}
        for (name, (start, stop)), shape in zip(self.offsets().items(), self.shapes):
            out[name] = flat[..., start:stop].reshape(*batch, *shape)
        return out

    def block(self, flat: Tensor, names: Sequence[str]) -> Tensor:
        """The entries of ``flat`` ``[*batch, P]`` that belong to ``names``: ``[*batch, P_sub]``."""
        offsets = self.offsets()
        return torch.cat([flat[..., offsets[n][0]:offsets[n][1]] for n in names], dim=-1)

    def embed(self, sub: Tensor, names: Sequence[str]) -> Tensor:
        """Inverse of :meth:`block`: place ``sub`` ``[*batch, P_sub]`` into zeros ``[*batch, P]``."""
        out = sub.new_zeros(*sub.shape[:-1], self.numel)
        offsets, start = self.offsets(), 0
        for n in names:
            a, b = offsets[n]
            out[..., a:b] = sub[..., start:start + (b - a)]
            start += b - a
        return out

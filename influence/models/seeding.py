"""Seeded model initialisation that never touches torch's global random generator.

``torch.manual_seed(s); build()`` is the usual way to get a reproducible initialisation, but the
generator it seeds is shared by the whole process: two threads that each seed it and build a model
can interleave (one thread's draws land in the other's model), and any other thread drawing random
numbers meanwhile shifts the stream. :func:`seeded_init` gives the current thread a private
generator instead: every random draw made inside it without an explicit ``generator=`` (the
``torch.nn.init`` functions, ``Tensor.uniform_``/``normal_`` and friends, ``torch.rand*``) takes it.

A private CPU generator seeded with ``s`` yields the same stream as the global one seeded with
``s``, so ``with seeded_init(s): build()`` gives the weights ``torch.manual_seed(s); build()``
gives, bit for bit, and leaves the global generator as it was. The redirection is a
:class:`torch.overrides.TorchFunctionMode`, whose stack is per thread: other threads are unaffected.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from influence.validation import check_int_at_least

_TENSOR_DRAWS = ("uniform_", "normal_", "bernoulli_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_")
_TORCH_DRAWS = ("rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson",
                "rand_like", "randn_like", "randint_like")


@functools.lru_cache(maxsize=1)
def _builtin_draws() -> frozenset:
    found = {getattr(torch.Tensor, name) for name in _TENSOR_DRAWS}
    return frozenset(found | {getattr(torch, name) for name in _TORCH_DRAWS if hasattr(torch, name)})


@functools.lru_cache(maxsize=4096)
def _takes_generator(func: Any) -> bool:
    try:
        return "generator" in inspect.signature(func).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def draws_random(func: Any) -> bool:
    """Whether ``func`` (as torch dispatches it to a mode) draws from a generator it accepts as ``generator=``:
    the tensor methods and ``torch.*`` samplers, and any Python function with a ``generator`` parameter (the
    ``torch.nn.init`` functions, which torch dispatches as a whole before their inner draws, and the
    wrappers a library may install in their place, as transformers does while it builds a model)."""
    return func in _builtin_draws() or (inspect.isfunction(func) and _takes_generator(func))


class _PrivateGenerator(TorchFunctionMode):
    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if kwargs.get("generator") is None and draws_random(func) and not _generator_in(func, args):
            kwargs["generator"] = self.generator
        return func(*args, **kwargs)


def _generator_in(func: Any, args: tuple) -> bool:
    """Whether a Python function's positional ``args`` already reach its ``generator`` parameter."""
    if not inspect.isfunction(func):
        return False  # torch's samplers take ``generator`` by keyword only
    names = list(inspect.signature(func).parameters)
    return names.index("generator") < len(args)


@contextmanager
def seeded_init(seed: int) -> Iterator[torch.Generator]:
    """Inside the block, this thread's random draws without an explicit generator come from a private CPU
    generator seeded with ``seed`` (yielded); torch's global generator is neither read nor advanced.

    For building models on the CPU (the tensors a module's ``reset_parameters`` fills); a draw into a CUDA
    tensor would need a CUDA generator and raises. Draws made inside compiled C++ code that does not take
    a generator (dropout in a forward pass) are not redirected: use it for initialisation.
    """
    seed = check_int_at_least("seed", seed, 0)
    generator = torch.Generator().manual_seed(seed)
    with _PrivateGenerator(generator):
        yield generator


def build_seeded(build: Callable[[], Any], seed: int) -> Any:
    """``build()`` inside :func:`seeded_init` of ``seed``: the same weights as ``torch.manual_seed(seed); build()``,
    with the global generator untouched, safe on any number of threads at once."""
    with seeded_init(seed):
        return build()

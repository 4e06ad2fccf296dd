"""Content fingerprints of models, datasets and tensors: what an artifact on disk was made from.

A fingerprint is a sha256 over names, dtypes, shapes and raw bytes, so it changes with any value
and never with object identity. Manifests record them and refuse reuse when they differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from influence.batches import named_leaves


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of a tensor (any dtype), in C order, read on the CPU."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def tensors_digest(named: Iterable[tuple[str, object]]) -> str:
    """sha256 over ``(name, value)`` pairs: each tensor's name, dtype, shape and bytes; other values' repr."""
    digest = hashlib.sha256()
    for name, value in named:
        if isinstance(value, Tensor):
            digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
            digest.update(tensor_bytes(value))
        else:
            digest.update(f"{name}|{value!r}|".encode())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every parameter and buffer of ``model``."""
    return tensors_digest((n, t) for n, t in model.state_dict(keep_vars=False).items() if isinstance(t, Tensor))


def dataset_fingerprint(dataset: Dataset) -> str:
    """sha256 over the length of ``dataset`` and every example's leaves (tensors and other values)."""
    n = len(dataset)
    return tensors_digest([("N", n), *((f"{i}.{path}", leaf) for i in range(n)
                                       for path, leaf in named_leaves(dataset[i], sort_keys=True))])


__all__ = ["dataset_fingerprint", "model_fingerprint", "tensor_bytes", "tensors_digest"]

"""Half-precision gradients: which dtypes are accepted and their products with float32 results.

The attribution methods take ``gradient_dtype`` (``torch.bfloat16`` or ``torch.float16``): per-example
gradients are computed in the computation dtype, rounded once to ``gradient_dtype`` (relative error
``2^-9`` for bfloat16, ``2^-12`` for float16 within its range) and held and multiplied in it: half
the memory and bandwidth of float32, and the half-precision matrix units (tensor cores, AMX). The
products accumulate in float32 inside the matrix multiply (cuBLAS with a float32 output where torch
offers it; for bfloat16 elsewhere oneDNN, whose result is rounded once to bfloat16; float16 without a
float32-output kernel is widened exactly to float32 first, since a float16 result overflows above
65,504) and are returned in float32. Curvature fits and inverse-Hessian solves never run in half precision.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from influence.exceptions import invalid

GRADIENT_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


def check_gradient_dtype(value: object) -> torch.dtype | None:
    """``value`` if it is ``None`` (gradients in the computation dtype) or a half dtype, else raise."""
    if value is None or (isinstance(value, torch.dtype) and value in GRADIENT_DTYPES):
        return value
    raise invalid("gradient_dtype", value, "torch.bfloat16, torch.float16 or None (the computation dtype)")


def is_half(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is one of :data:`GRADIENT_DTYPES`."""
    return dtype in GRADIENT_DTYPES


@functools.lru_cache(maxsize=8)
def _has_float32_output_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has the float32-output half-precision ``torch.mm`` on ``device`` for ``dtype``, probed once
    on 2x2 operands. A missing kernel shows as ``TypeError`` (a torch whose ``mm`` takes no ``out_dtype``) or
    ``NotImplementedError`` (no kernel for the device, as on the CPU); the CUDA kernel's own checks (2-D operands of
    one dtype, float16 or bfloat16 to float32) hold for the probe, so any other error is real and raised."""
    probe = torch.ones(2, 2, dtype=dtype, device=device)
    try:
        torch.mm(probe, probe, out_dtype=torch.float32)
    except (TypeError, NotImplementedError):
        return False
    return True


def product_t(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right^T`` ``[m, n]`` for ``left`` ``[m, P]`` and ``right`` ``[n, P]`` of one dtype.

    Half-precision operands accumulate in float32 and give a float32 result (without any rounding of the
    result where ``torch.mm`` takes ``out_dtype`` on the device: CUDA); other dtypes multiply as usual.
    """
    if not is_half(left.dtype):
        return left @ right.T
    if _has_float32_output_mm(left.device, left.dtype):
        return torch.mm(left, right.T, out_dtype=torch.float32)
    if left.dtype == torch.float16:  # a float16 result would overflow above 65,504: widen (exact) and multiply
        return left.float() @ right.float().T
    return (left @ right.T).float()


__all__ = ["GRADIENT_DTYPES", "check_gradient_dtype", "is_half", "product_t"]

"""Gradients over selected parameters: per-example gradients, projection, on-disk cache, objective."""

from influence.gradients.cache import GradientCache, gradient_shard
from influence.gradients.layout import ParameterLayout, select_parameters
from influence.gradients.objective import Objective
from influence.gradients.per_example import (
    gradient_matrix,
    iter_gradients,
    measurement_sign,
    per_example_gradients,
)
from influence.gradients.projection import RandomProjector

__all__ = [
    "GradientCache",
    "Objective",
    "ParameterLayout",
    "RandomProjector",
    "gradient_matrix",
    "gradient_shard",
    "iter_gradients",
    "measurement_sign",
    "per_example_gradients",
    "select_parameters",
]

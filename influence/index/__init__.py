"""Fit once, ask many times: an on-disk attribution index and its streamed top-k queries.

:class:`AttributionIndex` stores each training example preconditioned by a fitted inverse-Hessian
solver (or projected); :class:`RepresentationStore` is its shard layer, usable alone for rows made
elsewhere; :class:`TopK` is what a query returns.
"""

from influence.index.attribution import SOLVER_STATE, STATEFUL_SOLVERS, AttributionIndex
from influence.index.store import STORAGE_DTYPES, RepresentationStore, TopK

__all__ = ["SOLVER_STATE", "STATEFUL_SOLVERS", "STORAGE_DTYPES", "AttributionIndex", "RepresentationStore", "TopK"]

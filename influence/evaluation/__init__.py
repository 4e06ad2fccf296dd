"""Evaluation of attributions against retraining: case deletion and the linear datamodeling score."""

from influence.evaluation.case_deletion import DeletionResult, case_deletion, random_removals, top_k_indices
from influence.evaluation.lds import lds, lds_per_query, random_subsets, spearman

__all__ = ["DeletionResult", "case_deletion", "lds", "lds_per_query", "random_removals", "random_subsets", "spearman", "top_k_indices"]

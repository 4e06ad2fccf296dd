"""Evaluation of attributions: case deletion, the linear datamodeling score, mislabel detection."""

from influence.evaluation.case_deletion import (
    DeletionPlan,
    DeletionResult,
    Retraining,
    case_deletion,
    plan_deletion,
    random_removals,
    top_k_indices,
)
from influence.evaluation.lds import lds, lds_per_query, random_subsets, small_removal_subsets, spearman
from influence.evaluation.mislabel import MislabelCurve, detection_curve, flip_labels

__all__ = [
    "DeletionPlan", "DeletionResult", "MislabelCurve", "Retraining", "case_deletion", "detection_curve", "flip_labels",
    "lds", "lds_per_query", "plan_deletion", "random_removals", "random_subsets", "small_removal_subsets", "spearman", "top_k_indices",
]

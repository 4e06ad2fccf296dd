"""Attribution methods; each module holds one method and documents its formula.

- :mod:`~influence.methods.influence_function`: influence functions (``1/n`` included).
- :mod:`~influence.methods.multistage`: multi-stage influence of pretraining examples.
- :mod:`~influence.methods.tracin`: TracIn over checkpoints (``params="last"``: last-layer TracIn).
- :mod:`~influence.methods.tracin_we`: TracIn on the word-embedding gradient, sparse.
- :mod:`~influence.methods.similarity`: gradient dot product and cosine.
- :mod:`~influence.methods.magic`: MAGIC, exact metagradients through a replayed training run.
- :mod:`~influence.methods.multistage_magic`: multi-stage MAGIC, through pretraining and finetuning replayed.
"""

from influence.methods.influence_function import influence_scores, influence_self_scores
from influence.methods.magic import magic_scores
from influence.methods.multistage import multistage_scores
from influence.methods.multistage_magic import multistage_magic_scores
from influence.methods.similarity import grad_cos_scores, grad_dot_scores, similarity_scores
from influence.methods.tracin import tracin_scores, tracin_self_scores
from influence.methods.tracin_we import tracin_we_scores, tracin_we_self_scores, tracin_we_words

__all__ = [
    "grad_cos_scores",
    "grad_dot_scores",
    "influence_scores",
    "influence_self_scores",
    "magic_scores",
    "multistage_magic_scores",
    "multistage_scores",
    "similarity_scores",
    "tracin_scores",
    "tracin_self_scores",
    "tracin_we_scores",
    "tracin_we_self_scores",
    "tracin_we_words",
]

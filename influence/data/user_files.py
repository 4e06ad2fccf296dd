"""A user's own data: a labelled finetuning table and a pretraining corpus, read into the pipeline's rows.

- Finetuning: a CSV, JSON Lines (``.jsonl``) or Parquet file with a text column and a label column
  (any number of classes; labels may be strings or integers), optionally a grouping column whose
  values keep their rows in one split (a movie, an author, a conversation). The label names are
  the distinct labels of the file, sorted (numerically when all are integers); a label's id is its
  position. Rows keep the file's order; ids are ``<file stem>-<0-based row>``.
- Pretraining: a text file (``.txt``: documents separated by blank lines), or a CSV or JSON Lines
  file with one document per row in a text column, cut into sentences (as the built-in news) or into
  chunks of a fixed number of words.

Every problem is a :class:`~influence.exceptions.DataError` that names the file, the column and
what would be accepted, raised before any model is built.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from influence.data.prepare import build_pretraining_rows, check_fractions, clean_text, split_groups
from influence.data.text import tokenize
from influence.exceptions import DataError
from influence.validation import check_positive_int

TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
CORPUS_SUFFIXES = (".txt", ".csv", ".jsonl")


@dataclass(frozen=True)
class LabelledTable:
    """Where a user's finetuning examples are and which columns hold what.

    Attributes:
        path: the CSV, JSON Lines or Parquet file.
        text_column: the column of the texts.
        label_column: the column of the labels.
        group_column: rows sharing a value of this column go to the same split; ``""``: split by row.
    """

    path: Path
    text_column: str = "text"
    label_column: str = "label"
    group_column: str = ""


@dataclass(frozen=True)
class Corpus:
    """Where a user's pretraining documents are and how they are cut.

    Attributes:
        path: a ``.txt`` file (documents separated by blank lines), or a CSV / JSON Lines file.
        text_column: the column of the documents (CSV and JSON Lines).
        unit: ``"sentences"`` or ``"chunks"`` of ``chunk_words`` words.
        chunk_words: words per chunk.
    """

    path: Path
    text_column: str = "text"
    unit: Literal["sentences", "chunks"] = "sentences"
    chunk_words: int = 32


def _records(path: Path, suffixes: Sequence[str], what: str) -> list[dict]:
    """The rows of a CSV, JSON Lines or Parquet file as dicts."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise DataError(f"{path}: a {what} must be one of {', '.join(suffixes)} files, not {path.suffix or 'no suffix'}")
    if not path.is_file():
        raise DataError(f"{path}: file not found (the {what}; a relative path is read from the project folder)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as handle:
                return list(csv.DictReader(handle))
        if suffix == ".jsonl":
            rows = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    value = json.loads(line)
                    if not isinstance(value, dict):
                        raise DataError(f"{path}: line {number} is not a JSON object")
                    rows.append(value)
            return rows
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except (UnicodeDecodeError, csv.Error, json.JSONDecodeError, OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable {suffix[1:]} file ({error})") from error


def _column(path: Path, rows: list[dict], column: str, setting: str) -> list:
    if not rows:
        raise DataError(f"{path}: no rows")
    present = list(rows[0])
    if column not in present:
        raise DataError(f"{path}: no column {column!r} (the {setting} setting); the file has the columns {present}")
    return [row.get(column) for row in rows]


def _blank_rows(texts: Sequence, path: Path, column: str) -> None:
    blank = [i for i, t in enumerate(texts) if t is None or not str(t).strip()]
    if blank:
        raise DataError(
            f"{path}: column {column!r} is empty in {len(blank)} of {len(texts)} rows (0-based rows {blank[:10]}); "
            "every example needs a text: fill or drop those rows"
        )


def label_names(labels: Sequence) -> list[str]:
    """The distinct labels as names, sorted numerically when all are integers, else as strings."""
    values = {str(v).strip() for v in labels}
    if all(v.lstrip("-").isdigit() for v in values):
        return [str(v) for v in sorted(int(v) for v in values)]
    return sorted(values)


def build_labelled_rows(table: LabelledTable, *, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list[dict]:
    """A user's finetuning table as rows with ``id``, ``text``, ``label`` (class id), ``label_name``,
    ``group`` and ``split``, in the file's order.

    Args:
        table: the file and its columns.
        seed: the split seed; the same seed gives the same split.
        fractions: ``(train, validation, test)`` shares of the examples, dealt by whole groups.

    Raises:
        DataError: the file is missing or unreadable, a column is missing (the message lists the
            columns present), a text is empty, or the labels have fewer than two classes.
    """
    path = Path(table.path)
    bounds = np.cumsum(check_fractions(fractions))
    rows = _records(path, TABLE_SUFFIXES, "finetuning table")
    texts = _column(path, rows, table.text_column, "data.text_column")
    labels = _column(path, rows, table.label_column, "data.label_column")
    groups = _column(path, rows, table.group_column, "data.group_column") if table.group_column else None
    _blank_rows(texts, path, table.text_column)
    _blank_rows(labels, path, table.label_column)
    names = label_names(labels)
    if len(names) < 2:
        raise DataError(f"{path}: column {table.label_column!r} holds one class, {names}; classification needs at least two")
    ids = {name: i for i, name in enumerate(names)}
    group_of = [str(g) for g in groups] if groups is not None else [str(i) for i in range(len(rows))]
    sizes: dict[str, int] = {}
    for group in group_of:
        sizes[group] = sizes.get(group, 0) + 1
    split_of = split_groups(sizes, seed=seed, bounds=bounds)
    return [
        {"id": f"{path.stem}-{i}", "text": clean_text(str(text)), "label": ids[str(label).strip()],
         "label_name": str(label).strip(), "group": group, "split": split_of[group]}
        for i, (text, label, group) in enumerate(zip(texts, labels, group_of))
    ]


def _documents(corpus: Corpus) -> list[str]:
    path = Path(corpus.path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"{path}: file not found (the pretraining corpus; a relative path is read from the project folder)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text ({error})") from error
        return [d for d in (part.strip() for part in text.split("\n\n")) if d]
    rows = _records(path, CORPUS_SUFFIXES, "pretraining corpus")
    return [str(d) for d in _column(path, rows, corpus.text_column, "data.pretrain_text_column") if d and str(d).strip()]


def build_corpus_rows(corpus: Corpus, *, min_words: int = 5, max_words: int = 40) -> list[dict]:
    """A user's pretraining documents as rows ``{"id", "article", "text"}`` (``article``: the document's index).

    Sentences are cut and filtered as the built-in news are (:func:`build_pretraining_rows`); chunks
    are consecutive runs of ``corpus.chunk_words`` words (the last, shorter one kept when it has at
    least ``min_words``).

    Raises:
        DataError: the file is missing or unreadable, the text column is missing, or no sentence or
            chunk is left.
    """
    path = Path(corpus.path)
    documents = _documents(corpus)
    if corpus.unit == "sentences":
        rows = build_pretraining_rows(({"article": i, "text": d} for i, d in enumerate(documents)),
                                      min_words=min_words, max_words=max_words)
        rows = [dict(r, id=f"{path.stem}-{r['id'].removeprefix('news-')}") for r in rows]
    elif corpus.unit == "chunks":
        size = check_positive_int("data.chunk_words", corpus.chunk_words)
        rows = []
        for index, document in enumerate(documents):
            words = tokenize(clean_text(document))
            for number, start in enumerate(range(0, len(words), size)):
                chunk = words[start:start + size]
                if len(chunk) >= min(min_words, size):
                    rows.append({"id": f"{path.stem}-{index:04d}-{number:03d}", "article": index, "text": " ".join(chunk)})
    else:
        raise DataError(f"{path}: data.pretrain_unit = {corpus.unit!r}; accepted: 'sentences' or 'chunks'")
    if not rows:
        raise DataError(f"{path}: no {corpus.unit} of {min_words} words or more in {len(documents)} documents")
    return rows


__all__ = ["CORPUS_SUFFIXES", "TABLE_SUFFIXES", "Corpus", "LabelledTable", "build_corpus_rows", "build_labelled_rows",
           "label_names"]

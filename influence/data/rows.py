"""The row builders the built-in data and the user's files share: text cleaning, sentence splitting, pretraining rows,
the split fractions and the seeded assignment of whole groups to splits (so :mod:`influence.data.prepare` and
:mod:`influence.data.user_files` each import this module, not each other)."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from influence.data.text import tokenize
from influence.exceptions import invalid
from influence.validation import check_positive_int


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


__all__ = ["ABBREVIATIONS", "FINETUNE_SPLITS", "build_pretraining_rows", "check_fractions", "clean_text", "split_groups",
           "split_sentences"]

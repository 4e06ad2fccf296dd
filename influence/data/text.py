"""Tokenization and a word vocabulary that encodes texts to padded id tensors ``[N, L]``.

Tokens are lowercase runs of letters and digits, optionally joined by apostrophes
(``"don't"``, ``"cinema's"``); every other character separates tokens. Id 0 is padding
(``"<pad>"``) and id 1 stands for unknown words (``"<unk>"``), as the rest of the library expects.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from influence.exceptions import DataError, invalid
from influence.storage import atomic_write
from influence.validation import check_positive_int

__all__ = ["PAD", "PAD_TOKEN", "UNK", "UNK_TOKEN", "Vocabulary", "tokenize"]

PAD, UNK = 0, 1
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Split a text into lowercase word and number tokens.

    Args:
        text: any string.

    Returns:
        Tokens in order, e.g. ``tokenize("Don't stop: 3 films!") == ["don't", "stop", "3", "films"]``.
        Punctuation is dropped; curly apostrophes count as ``'``; ``"1.5"`` gives ``["1", "5"]``.
    """
    return _TOKEN.findall(text.translate(_APOSTROPHES).lower())


class Vocabulary:
    """A fixed list of words; a word's id is its position. Ids 0 and 1 are ``<pad>`` and ``<unk>``.

    Args:
        words: every word in id order, starting with ``"<pad>"`` and ``"<unk>"``.
    """

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        if words[:2] != [PAD_TOKEN, UNK_TOKEN]:
            raise invalid("words[:2]", words[:2], f"[{PAD_TOKEN!r}, {UNK_TOKEN!r}]")
        if len(set(words)) != len(words):
            duplicates = sorted(w for w, c in Counter(words).items() if c > 1)[:5]
            raise invalid("words", f"duplicates {duplicates}", "distinct words")
        self._words = words
        self._index = {word: i for i, word in enumerate(words)}

    @classmethod
    def build(
        cls, texts: Iterable[str], *, min_count: int = 1, max_size: int | None = None
    ) -> "Vocabulary":
        """Count the tokens of ``texts`` and keep the frequent ones.

        Words are ordered by count (descending), ties by the word itself, so the result depends
        only on the multiset of tokens, not on the order of ``texts``.

        Args:
            texts: the training texts.
            min_count: a word needs at least this many occurrences (>= 1).
            max_size: at most this many entries *including* ``<pad>`` and ``<unk>`` (>= 2);
                ``None`` keeps every word that passes ``min_count``.

        Returns:
            The vocabulary.
        """
        check_positive_int("min_count", min_count)
        if max_size is not None and (
            isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 2
        ):
            raise invalid("max_size", max_size, "None or an integer >= 2 (it counts <pad> and <unk>)")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(tokenize(text))
        for special in (PAD_TOKEN, UNK_TOKEN):
            counts.pop(special, None)
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            ranked = ranked[: max_size - 2]
        return cls([PAD_TOKEN, UNK_TOKEN, *ranked])

    def __len__(self) -> int:
        return len(self._words)

    def __contains__(self, word: object) -> bool:
        return word in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._words == other._words

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"

    def index(self, word: str) -> int:
        """Id of ``word``, or ``UNK`` (1) when it is not in the vocabulary."""
        return self._index.get(word, UNK)

    def encode(self, texts: Sequence[str], max_len: int) -> Tensor:
        """Tokenize and map texts to ids, truncating and right-padding to ``max_len``.

        Args:
            texts: ``N`` strings.
            max_len: ``L``, the number of positions per text (>= 1).

        Returns:
            LongTensor ``[N, L]``; unknown words are 1, padding is 0. A text without tokens is a
            row of zeros.
        """
        check_positive_int("max_len", max_len)
        if isinstance(texts, str):
            raise invalid("texts", texts[:40], "a sequence of strings, not one string")
        rows = []
        for text in texts:
            ids = [self._index.get(token, UNK) for token in tokenize(text)[:max_len]]
            rows.append(ids + [PAD] * (max_len - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), max_len)

    def words(self, ids: Sequence[int] | Tensor) -> list[str]:
        """Map ids to words one by one (padding included).

        Args:
            ids: ids ``[L]`` (a 1-D tensor or a sequence of ints).

        Returns:
            ``L`` words.
        """
        values = _as_id_list(ids)
        size = len(self._words)
        bad = [i for i in values if not 0 <= i < size]
        if bad:
            raise invalid("ids", bad[:5], f"ids in [0, {size})")
        return [self._words[i] for i in values]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Words of ``ids`` joined by spaces, padding dropped.

        Args:
            ids: ids ``[L]``, e.g. one row of :meth:`encode`'s output.

        Returns:
            The text, e.g. ``"a <unk> film"``.
        """
        return " ".join(w for i, w in zip(_as_id_list(ids), self.words(ids)) if i != PAD)

    def to_json(self, path: Path) -> None:
        """Write the vocabulary to ``path`` as JSON (``{"words": [...]}``, byte-stable)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"words": self._words}, ensure_ascii=False, indent=0)
        atomic_write(path, text + "\n")

    @classmethod
    def from_json(cls, path: Path) -> "Vocabulary":
        """Read a vocabulary written by :meth:`to_json`.

        Raises:
            DataError: the file is missing or is not such a JSON file (the message names it).
        """
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise DataError(f"{path}: vocabulary file not found") from error
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: not a readable vocabulary JSON file ({error})") from error
        words = payload.get("words") if isinstance(payload, dict) else None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DataError(f"{path}: expected an object with a 'words' list of strings")
        try:
            return cls(words)
        except ValueError as error:
            raise DataError(f"{path}: {error}") from error


def _as_id_list(ids: Sequence[int] | Tensor) -> list[int]:
    if isinstance(ids, Tensor):
        if ids.dim() != 1:
            raise invalid("ids.shape", tuple(ids.shape), "a 1-D tensor [L]")
        return [int(i) for i in ids.tolist()]
    return [int(i) for i in ids]

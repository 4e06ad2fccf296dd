"""Map-style torch datasets over token tensors, one example per row, each with a stable id.

An example is a dict without the batch dimension (``{"tokens": [L], "label": []}`` or
``{"tokens": [L]}``), so torch's default collate makes the batches the rest of the library
expects (``{"tokens": [B, L], "label": [B]}``). ``subset`` keeps the ids aligned with the rows,
which is what attribution scores are reported against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from influence.data.text import Vocabulary
from influence.exceptions import DataError, invalid

__all__ = ["TextClassificationDataset", "TokenDataset"]


def _check_tokens(tokens: Tensor) -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        dtype = getattr(tokens, "dtype", None)
        raise invalid("tokens", f"{shape} {dtype}", "a LongTensor [N, L]")


def _check_ids(ids: Sequence[str], n: int) -> list[str]:
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise invalid("len(ids)", len(ids), f"{n}, one id per row")
    if len(set(ids)) != n:
        raise invalid("ids", "with duplicates", "distinct ids")
    return ids


def _index_tensor(indices: Sequence[int] | Tensor, n: int) -> Tensor:
    index = torch.as_tensor(indices)
    if index.dtype == torch.bool:
        if index.shape != (n,):
            shape = tuple(index.shape)
            raise invalid("indices", f"a boolean mask of shape {shape}", f"a mask of shape ({n},)")
        return index.nonzero().reshape(-1)
    if index.is_floating_point() or index.is_complex():
        raise invalid("indices", f"a {index.dtype} tensor", "integer indices or a boolean mask")
    index = index.to(torch.long).reshape(-1)
    if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
        raise invalid("indices", f"range [{int(index.min())}, {int(index.max())}]", f"indices in [-{n}, {n})")
    return index % max(n, 1)


class TokenDataset(Dataset):
    """Token sequences for language modelling.

    Args:
        tokens: LongTensor ``[N, L]`` (padding id 0).
        ids: ``N`` distinct example ids.
    """

    def __init__(self, tokens: Tensor, ids: Sequence[str]) -> None:
        _check_tokens(tokens)
        self.tokens = tokens
        self.ids = _check_ids(ids, tokens.shape[0])

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping], vocabulary: Vocabulary, *, max_len: int) -> "TokenDataset":
        """Encode table rows with ``id`` and ``text`` columns (e.g. ``pretrain.csv``).

        Args:
            rows: ``N`` dicts.
            vocabulary: the vocabulary that encodes ``text``.
            max_len: ``L``.

        Returns:
            A dataset with tokens ``[N, L]``.
        """
        try:
            texts, ids = [str(r["text"]) for r in rows], [str(r["id"]) for r in rows]
        except KeyError as error:
            raise DataError(f"rows lack the column {error}; need 'id' and 'text'") from error
        return cls(vocabulary.encode(texts, max_len), ids)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """One example ``{"tokens": LongTensor [L]}``."""
        return {"tokens": self.tokens[index]}

    def collated(self) -> dict[str, Tensor]:
        """Every example as one batch ``{"tokens": [N, L]}`` (what torch's default collate makes, at once)."""
        return {"tokens": self.tokens}

    def subset(self, indices: Sequence[int] | Tensor) -> "TokenDataset":
        """The rows at ``indices`` (ints, negative allowed, no repeats; or a boolean mask ``[N]``).

        Returns:
            A new :class:`TokenDataset` with tokens ``[len(indices), L]``; ids follow the rows.
        """
        index = _index_tensor(indices, len(self))
        return TokenDataset(self.tokens[index], [self.ids[i] for i in index.tolist()])


class TextClassificationDataset(Dataset):
    """Token sequences with class labels.

    Args:
        tokens: LongTensor ``[N, L]`` (padding id 0).
        labels: LongTensor ``[N]``.
        ids: ``N`` distinct example ids.
    """

    def __init__(self, tokens: Tensor, labels: Tensor, ids: Sequence[str]) -> None:
        _check_tokens(tokens)
        n = tokens.shape[0]
        if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.dtype != torch.long:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise invalid("labels", f"{shape} {getattr(labels, 'dtype', None)}", f"a LongTensor [{n}]")
        self.tokens = tokens
        self.labels = labels
        self.ids = _check_ids(ids, n)

    @classmethod
    def from_rows(
        cls, rows: Sequence[Mapping], vocabulary: Vocabulary, *, max_len: int
    ) -> "TextClassificationDataset":
        """Encode table rows with ``id``, ``text`` and ``label`` columns (e.g. ``finetune.csv``).

        Args:
            rows: ``N`` dicts; ``label`` may be an int or its string (as :func:`read_table` gives).
            vocabulary: the vocabulary that encodes ``text``.
            max_len: ``L``.

        Returns:
            A dataset with tokens ``[N, L]`` and labels ``[N]``.
        """
        try:
            texts = [str(r["text"]) for r in rows]
            labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
            ids = [str(r["id"]) for r in rows]
        except KeyError as error:
            raise DataError(f"rows lack the column {error}; need 'id', 'text' and 'label'") from error
        except ValueError as error:
            raise DataError(f"rows have a non-integer label ({error})") from error
        return cls(vocabulary.encode(texts, max_len), labels.reshape(len(rows)), ids)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """One example ``{"tokens": LongTensor [L], "label": LongTensor []}``."""
        return {"tokens": self.tokens[index], "label": self.labels[index]}

    def collated(self) -> dict[str, Tensor]:
        """Every example as one batch ``{"tokens": [N, L], "label": [N]}`` (torch's default collate, at once)."""
        return {"tokens": self.tokens, "label": self.labels}

    def subset(self, indices: Sequence[int] | Tensor) -> "TextClassificationDataset":
        """The rows at ``indices`` (ints, negative allowed, no repeats; or a boolean mask ``[N]``).

        Returns:
            A new :class:`TextClassificationDataset` with tokens ``[len(indices), L]`` and labels
            ``[len(indices)]``; ids follow the rows.
        """
        index = _index_tensor(indices, len(self))
        return TextClassificationDataset(
            self.tokens[index], self.labels[index], [self.ids[i] for i in index.tolist()]
        )

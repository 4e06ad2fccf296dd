"""A user's own model family, as a user would write it: what ``model.factory`` points at in the tests.

Words are hashed into 256 ids (no vocabulary to build); stage 1 is a next-word model, stage 2
mean-pools the shared word vectors into a small MLP. ``make`` is the factory; the other functions
are the broken factories the bad-input tests name.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor, nn

from influence.models.family import ModelFamily
from influence.task import LanguageModelingTask

BUCKETS = 256


class NextWord(nn.Module):
    """Logits of the next word from the current one: ``[B, L] -> [B, L, V]``."""

    def __init__(self, vocab: int, width: int = 16) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.words(tokens)))


class MeanPool(nn.Module):
    """Mean of the word vectors (padding 0 masked), a tanh layer, a linear head: ``[B, L] -> [B, C]``."""

    def __init__(self, vocab: int, classes: int, width: int = 16) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        mask = (tokens != 0).to(self.words.weight.dtype).unsqueeze(-1)
        pooled = (self.words(tokens) * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return self.head(torch.tanh(self.hidden(pooled)))


class HashedWords(ModelFamily):
    name = "hashed-words"
    vocab_size = BUCKETS
    embedding_module = "words"
    pretrain_task = LanguageModelingTask(padding_idx=0, shift=True)

    def encode(self, texts, max_length: int) -> Tensor:
        rows = []
        for text in texts:
            ids = [1 + zlib.crc32(w.encode()) % (BUCKETS - 1) for w in self.split(text)][:max_length]
            rows.append(ids + [0] * (max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def split(self, text: str) -> list[str]:
        return text.lower().split()

    def token_strings(self, ids) -> list[str]:
        return [f"#{int(i)}" for i in ids]

    def language_model(self, config) -> nn.Module:
        return NextWord(BUCKETS)

    def classifier(self, config) -> nn.Module:
        return MeanPool(BUCKETS, int(config["num_classes"]))

    def shared(self) -> dict[str, str]:
        return {"words.weight": "words.weight"}


class Silent(HashedWords):
    """A tokenizer that finds no word in any text."""

    def split(self, text: str) -> list[str]:
        return []


def make() -> ModelFamily:
    return HashedWords()


def make_silent() -> ModelFamily:
    return Silent()


def make_wrong() -> nn.Module:
    return MeanPool(BUCKETS, 2)

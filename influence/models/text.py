"""Small text models used by the pipeline: a masked-word CBOW language model and a classifier.

Both are smooth (``tanh`` only, no ReLU or max-pooling) so that influence functions can take
second derivatives, treat every example independently (no batch norm, no dropout) so that
``torch.func.vmap`` over batches of one example gives per-example gradients, and work in
float64 after ``model.double()``.

Padding is handled by an explicit mask ``tokens != padding_idx``: a pad position contributes
nothing to any output, whatever the embedding row of the pad id holds. The embeddings are plain
``nn.Embedding`` modules *without* ``padding_idx``: with ``padding_idx`` set, torch's
reverse-over-reverse second derivative through an embedding followed by a convolution disagrees
with finite differences (forward-over-reverse stays right), so the mask does that job instead.
The pad row is initialised to zeros; being masked, it never receives a data gradient.

Parameters are initialised from torch's global random generator: seed it
(``torch.manual_seed``) before building a model for a reproducible initialisation, or build it
inside :func:`influence.models.seeding.seeded_init` (the same weights, from a private generator:
safe on parallel threads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from influence.exceptions import invalid
from influence.models.family import ModelFamily
from influence.validation import check_positive_int


def _check_tokens(tokens: Tensor) -> None:
    if tokens.dim() != 2:
        raise invalid("tokens.shape", tuple(tokens.shape), "a 2-D LongTensor [B, L]")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise invalid("tokens.dtype", tokens.dtype, "torch.long (token ids)")


def _embedding(vocab_size: int, embed_dim: int, padding_idx: int) -> nn.Embedding:
    check_positive_int("vocab_size", vocab_size)
    check_positive_int("embed_dim", embed_dim)
    if not 0 <= padding_idx < vocab_size:
        raise invalid("padding_idx", padding_idx, f"an id in [0, {vocab_size})")
    embedding = nn.Embedding(vocab_size, embed_dim)
    with torch.no_grad():
        embedding.weight[padding_idx].zero_()
    return embedding


class TextClassifier(nn.Module):
    """Convolutional bag-of-n-grams classifier: embedding -> conv(3) -> tanh -> masked mean -> linear.

    Args:
        vocab_size: number of token ids ``V``.
        embed_dim: embedding width ``E``.
        hidden_dim: number of convolution channels ``H``.
        num_classes: number of classes ``C``.
        padding_idx: token id of padding; those positions are masked out.

    Attributes:
        embedding: ``nn.Embedding(V, E)``.
        encoder: ``nn.Conv1d(E, H, kernel_size=3, padding=1)`` over the sequence.
        head: ``nn.Linear(H, C)``.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 32,
        hidden_dim: int = 32,
        num_classes: int = 2,
        padding_idx: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("hidden_dim", hidden_dim)
        check_positive_int("num_classes", num_classes)
        self.padding_idx = padding_idx
        self.embedding = _embedding(vocab_size, embed_dim, padding_idx)
        self.encoder = nn.Conv1d(embed_dim, hidden_dim, kernel_size=3, padding=1)
        self.head = nn.Linear(hidden_dim, num_classes)

    def features(self, tokens: Tensor) -> Tensor:
        """Sentence representation before the head.

        Args:
            tokens: token ids ``[B, L]``.

        Returns:
            Masked mean of the ``tanh`` convolution features, ``[B, H]``; all zeros for a sequence
            made only of padding.
        """
        _check_tokens(tokens)
        mask = (tokens != self.padding_idx).to(self.embedding.weight.dtype)  # [B, L]
        embedded = self.embedding(tokens) * mask.unsqueeze(-1)  # [B, L, E]
        hidden = torch.tanh(self.encoder(embedded.transpose(1, 2)))  # [B, H, L]
        total = (hidden * mask.unsqueeze(1)).sum(dim=2)  # [B, H]
        return total / mask.sum(dim=1, keepdim=True).clamp_min(1.0)

    def forward(self, tokens: Tensor) -> Tensor:
        """Class logits.

        Args:
            tokens: token ids ``[B, L]`` (padding ``padding_idx``).

        Returns:
            Logits ``[B, C]``.
        """
        return self.head(self.features(tokens))


class CbowLanguageModel(nn.Module):
    """Masked-word (CBOW) language model: predicts each word from the mean of its neighbours.

    The logits at position ``t`` depend only on the non-pad tokens at ``t - window .. t + window``
    other than ``t`` itself, so the model pairs with
    ``influence.task.LanguageModelingTask(padding_idx=0)`` (targets = the tokens themselves).

    Args:
        vocab_size: number of token ids ``V``.
        embed_dim: embedding width ``E``.
        hidden_dim: width ``H`` of the ``tanh`` layer.
        window: number of neighbours taken on each side.
        padding_idx: token id of padding; pad neighbours are left out of the mean.

    Attributes:
        embedding: ``nn.Embedding(V, E)``.
        context: ``nn.Linear(E, H)``.
        output: ``nn.Linear(H, V)``.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 32,
        hidden_dim: int = 64,
        window: int = 2,
        padding_idx: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("hidden_dim", hidden_dim)
        check_positive_int("window", window)
        self.padding_idx = padding_idx
        self.window = window
        self.embedding = _embedding(vocab_size, embed_dim, padding_idx)
        self.context = nn.Linear(embed_dim, hidden_dim)
        self.output = nn.Linear(hidden_dim, vocab_size)

    def context_vectors(self, tokens: Tensor) -> Tensor:
        """Mean embedding of each position's neighbours (the position itself and pads excluded).

        Args:
            tokens: token ids ``[B, L]``.

        Returns:
            ``[B, L, E]``; zeros where a position has no non-pad neighbour.
        """
        _check_tokens(tokens)
        w, length = self.window, tokens.shape[1]
        mask = (tokens != self.padding_idx).to(self.embedding.weight.dtype)  # [B, L]
        embedded = self.embedding(tokens) * mask.unsqueeze(-1)  # [B, L, E]
        padded = F.pad(embedded, (0, 0, w, w))  # [B, L + 2w, E]
        padded_mask = F.pad(mask, (w, w))  # [B, L + 2w]
        offsets = [d for d in range(-w, w + 1) if d != 0]
        total = sum(padded[:, w + d : w + d + length] for d in offsets)
        count = sum(padded_mask[:, w + d : w + d + length] for d in offsets)
        return total / count.clamp_min(1.0).unsqueeze(-1)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits of the word at every position given its context.

        Args:
            tokens: token ids ``[B, L]`` (padding ``padding_idx``).

        Returns:
            Logits ``[B, L, V]``; those at pad positions are meaningless (the task masks them).
        """
        return self.output(torch.tanh(self.context(self.context_vectors(tokens))))


def transfer_embedding(pretrained: CbowLanguageModel, classifier: TextClassifier) -> None:
    """Copy the pretrained embedding weights into the classifier (in place, no gradient).

    Args:
        pretrained: the language model whose ``embedding.weight`` ``[V, E]`` is copied.
        classifier: the classifier whose ``embedding.weight`` ``[V, E]`` is overwritten.

    Raises:
        InvalidArgumentError: the two embeddings differ in shape (another vocabulary or width).
    """
    source, target = pretrained.embedding.weight, classifier.embedding.weight
    if source.shape != target.shape:
        raise invalid(
            "classifier embedding shape",
            tuple(target.shape),
            f"the pretrained embedding shape {tuple(source.shape)} (same vocabulary and width)",
        )
    with torch.no_grad():
        target.copy_(source.to(dtype=target.dtype, device=target.device))


class CnnFamily(ModelFamily):
    """The built-in family: a word vocabulary, :class:`CbowLanguageModel` and :class:`TextClassifier`.

    The vocabulary is built from the training texts (:meth:`fit_tokenizer`); the word embedding is
    the shared parameter. Sizes come from the ``pretrain`` settings (``embed_dim``, ``hidden_dim``,
    ``window``) and ``finetune.hidden_dim``.

    Args:
        min_count: a word needs this many occurrences to enter the vocabulary.
        max_size: the largest vocabulary, ``<pad>`` and ``<unk>`` included.
    """

    name = "cnn"
    embedding_module = "embedding"

    def __init__(self, min_count: int = 1, max_size: int | None = None) -> None:
        from influence.data.text import PAD, UNK

        self.min_count, self.max_size = min_count, max_size
        self.pad_id, self.unknown_id, self.special_ids = PAD, UNK, (PAD,)
        self.vocabulary = None

    def fit_tokenizer(self, texts) -> None:
        from influence.data.text import Vocabulary

        self.vocabulary = Vocabulary.build(texts, min_count=self.min_count, max_size=self.max_size)

    def save_tokenizer(self, folder) -> None:
        self._vocabulary().to_json(folder / "vocab.json")

    def load_tokenizer(self, folder) -> None:
        from influence.data.text import Vocabulary

        self.vocabulary = Vocabulary.from_json(folder / "vocab.json")

    @property
    def vocab_size(self) -> int:
        return len(self._vocabulary())

    def _vocabulary(self):
        if self.vocabulary is None:
            raise invalid("CnnFamily.vocabulary", None, "a vocabulary: call fit_tokenizer or load_tokenizer first")
        return self.vocabulary

    def encode(self, texts, max_length: int) -> Tensor:
        return self._vocabulary().encode(list(texts), max_length)

    def token_strings(self, ids) -> list[str]:
        return self._vocabulary().words(list(ids))

    def is_continuation(self, token: str) -> bool:
        return False

    def language_model_config(self, pretrain) -> dict:
        return {"vocab_size": len(self._vocabulary()), "embed_dim": pretrain.embed_dim,
                "hidden_dim": pretrain.hidden_dim, "window": pretrain.window}

    def classifier_config(self, pretrained: nn.Module, num_classes: int, finetune) -> dict:
        vocab_size, embed_dim = pretrained.embedding.weight.shape
        return {"vocab_size": int(vocab_size), "embed_dim": int(embed_dim), "hidden_dim": finetune.hidden_dim,
                "num_classes": int(num_classes)}

    def language_model(self, config) -> CbowLanguageModel:
        return CbowLanguageModel(**{k: v for k, v in config.items() if k != "family"})

    def classifier(self, config) -> TextClassifier:
        return TextClassifier(**{k: v for k, v in config.items() if k != "family"})

    def shared(self) -> dict[str, str]:
        return {"embedding.weight": "embedding.weight"}

    @property
    def pretrain_task(self):
        from influence.task import LanguageModelingTask

        return LanguageModelingTask(padding_idx=self.pad_id)

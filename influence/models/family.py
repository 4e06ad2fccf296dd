"""The contract of a model family: the two models of a two-stage run, their tasks and their tokenizer.

A multi-stage run pretrains a *language model* on a corpus, carries some of its parameters (the
*shared* ones) into a *classifier* and finetunes that on labelled texts. A :class:`ModelFamily`
says how, for one architecture:

- its tokenizer: :meth:`~ModelFamily.fit_tokenizer` (a no-op for a fixed vocabulary),
  :meth:`~ModelFamily.encode` texts to ids ``[N, L]``, :meth:`~ModelFamily.token_strings` back,
  :meth:`~ModelFamily.save_tokenizer` / :meth:`~ModelFamily.load_tokenizer`, and which ids are
  never words (:attr:`~ModelFamily.special_ids`; plus :attr:`~ModelFamily.unknown_id`);
- its models: :meth:`~ModelFamily.language_model` and :meth:`~ModelFamily.classifier` build fresh
  ones from torch's global generator (the caller seeds it), in float32;
- which parameters are carried: :meth:`~ModelFamily.shared` maps classifier names to language-model
  names (same shapes); the classifier is built with those values copied in by :func:`carry_shared`;
- the tasks: :attr:`~ModelFamily.pretrain_task` (the language model's loss); the classifier's is
  cross-entropy on its logits ``[B, C]`` (``influence.task.ClassificationTask``);
- :attr:`~ModelFamily.embedding_module`: the classifier's token embedding (``nn.Embedding``), whose
  gradient TracIn-WE takes; :meth:`~ModelFamily.words` merges sub-word terms back into words;
- :attr:`~ModelFamily.max_batch`: the most examples per batch of per-example gradients (``None``:
  the pipeline's defaults), for models whose activations are large.

A user's own architecture is a subclass, returned by a function named in the settings
(``model.factory: "package.module:function"``), loaded and checked by :func:`load_factory`.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from influence.exceptions import invalid
from influence.task import Task


class ModelFamily(abc.ABC):
    """A two-stage architecture: tokenizer, language model, classifier, shared parameters, tasks.

    Subclasses implement the abstract members; the others have defaults that suit a fixed
    tokenizer. Every model the family builds maps token ids ``[B, L]`` (padding :attr:`pad_id`) to
    logits: ``[B, L, V]`` for the language model (or whatever its :attr:`pretrain_task` reads),
    ``[B, C]`` for the classifier; each example must be treated independently (no batch norm), and
    dropout must be off, so that per-example gradients and Hessians are those of the trained loss.
    """

    name: str = "custom"
    vocab_size: int | None = None
    max_batch: int | None = None
    pad_id: int = 0
    unknown_id: int | None = None
    special_ids: tuple[int, ...] = (0,)
    embedding_module: str = "embedding"

    # -- tokenizer --------------------------------------------------------------------------

    def fit_tokenizer(self, texts: Sequence[str]) -> None:
        """Build the tokenizer from the training texts (default: nothing to build)."""

    def save_tokenizer(self, folder: Path) -> None:
        """Write what :meth:`load_tokenizer` needs under ``folder`` (default: nothing)."""

    def load_tokenizer(self, folder: Path) -> None:
        """Read back what :meth:`save_tokenizer` wrote (default: nothing)."""

    @abc.abstractmethod
    def encode(self, texts: Sequence[str], max_length: int) -> Tensor:
        """Token ids of ``texts``, truncated and padded with :attr:`pad_id`: ``[N, max_length]`` long."""

    @abc.abstractmethod
    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The surface string of each token id (sub-words keep their marker, e.g. ``"##ly"``)."""

    def words(self, ids: Sequence[int], terms: Mapping[int, float]) -> list[tuple[str, float]]:
        """Per-token terms of a text (``{token id: term}``) as per-word terms, in text order.

        Sub-word tokens are merged back into their word (a token that :meth:`is_continuation`
        joins the one before); a word's term is the sum of its tokens' terms, a token id that occurs
        in several words giving each an equal share, so the terms still add up to ``sum(terms)``.

        Args:
            ids: the text's token ids ``[L]`` (padding and special ids are skipped).
            terms: ``{token id: term}`` (e.g. TracIn-WE's word terms of one pair).

        Returns:
            ``[(word, term)]`` for the words holding at least one id of ``terms``, each word once,
            sorted by decreasing term.
        """
        skip = set(self.special_ids) | {self.pad_id}
        kept = [i for i in ids if i not in skip]
        groups: list[tuple[str, list[int]]] = []
        for token, string in zip(kept, self.token_strings(kept)):
            if groups and self.is_continuation(string):
                word, members = groups[-1]
                groups[-1] = (word + self.continuation_text(string), members + [token])
            else:
                groups.append((string, [token]))
        merged: dict[str, list[int]] = {}
        for word, members in groups:
            merged.setdefault(word, []).extend(members)
        holders: dict[int, int] = {}
        for members in merged.values():
            for token in set(members):
                holders[token] = holders.get(token, 0) + 1
        found = []
        for word, members in merged.items():
            held = [t for t in set(members) if t in terms]
            if held:
                found.append((word, float(sum(terms[t] / holders[t] for t in held))))
        return sorted(found, key=lambda item: item[1], reverse=True)

    def is_continuation(self, token: str) -> bool:
        """Whether ``token`` continues the word before it (WordPiece: a ``"##"`` prefix)."""
        return token.startswith("##")

    def continuation_text(self, token: str) -> str:
        """The text a continuation token adds to its word."""
        return token[2:]

    # -- models -----------------------------------------------------------------------------

    def language_model_config(self, pretrain: Any) -> dict[str, Any]:
        """The language model's architecture (JSON, saved beside its weights as ``model.json``).

        Args:
            pretrain: the ``pretrain`` settings (a family with sizes of its own may ignore them).
        """
        return {"family": self.name}

    def classifier_config(self, pretrained: nn.Module, num_classes: int, finetune: Any) -> dict[str, Any]:
        """The classifier's architecture (JSON): ``num_classes`` outputs on top of ``pretrained``.

        Args:
            pretrained: the trained language model.
            num_classes: the number of classes of the finetuning data.
            finetune: the ``finetune`` settings (a family may ignore them).
        """
        return {"family": self.name, "num_classes": int(num_classes)}

    @abc.abstractmethod
    def language_model(self, config: Mapping[str, Any]) -> nn.Module:
        """A fresh stage-1 model of architecture ``config`` (initialised from torch's global generator)."""

    @abc.abstractmethod
    def classifier(self, config: Mapping[str, Any]) -> nn.Module:
        """A fresh stage-2 model of architecture ``config`` (its shared parameters get overwritten)."""

    @abc.abstractmethod
    def shared(self) -> dict[str, str]:
        """``{classifier parameter name: language-model parameter name}`` carried from pretraining."""

    @property
    @abc.abstractmethod
    def pretrain_task(self) -> Task:
        """The language model's training loss."""


def carry_shared(family: ModelFamily, pretrained: nn.Module, classifier: nn.Module) -> None:
    """Copy the shared parameters of ``pretrained`` into ``classifier`` (in place, no gradient).

    Raises:
        InvalidArgumentError: a shared name is missing from either model or the shapes differ.
    """
    source, target = dict(pretrained.named_parameters()), dict(classifier.named_parameters())
    with torch.no_grad():
        for ft_name, pt_name in family.shared().items():
            if ft_name not in target or pt_name not in source:
                raise invalid("shared parameter", f"{ft_name} <- {pt_name}",
                              f"classifier names among {sorted(target)[:8]}... and language-model names among "
                              f"{sorted(source)[:8]}...")
            if target[ft_name].shape != source[pt_name].shape:
                raise invalid(f"shape of {ft_name!r}", tuple(target[ft_name].shape),
                              f"the shape of the pretrained {pt_name!r}, {tuple(source[pt_name].shape)}")
            target[ft_name].copy_(source[pt_name].to(dtype=target[ft_name].dtype, device=target[ft_name].device))


REQUIRED = ("encode", "token_strings", "language_model", "classifier", "shared", "pretrain_task")


def load_factory(spec: str) -> ModelFamily:
    """The family a user's factory returns: ``spec`` is ``"package.module:function"``, called without arguments.

    Raises:
        InvalidArgumentError: ``spec`` is malformed, its module does not import, the function is
            missing or not callable, or it returns something other than a :class:`ModelFamily`
            (each message names ``model.factory`` and what would be accepted).
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise invalid("model.factory", spec, "'package.module:function', a function returning a ModelFamily")
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to see
        raise invalid("model.factory", spec, f"a module that imports (importing {module_name!r} failed: "
                      f"{type(exc).__name__}: {exc}); is it installed or on the project folder's path?") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        found = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise invalid("model.factory", spec, f"a function of {module_name!r}, among {found}")
    family = function()
    if not isinstance(family, ModelFamily):
        raise invalid(f"model.factory {spec!r} returned", type(family).__name__,
                      "an instance of influence.models.family.ModelFamily (implementing " + ", ".join(REQUIRED) + ")")
    return family


def check_encoded(family: ModelFamily, ids: Sequence[Any], tokens: Tensor, where: str) -> None:
    """Refuse texts that ``family``'s tokenizer turned into no token (only padding and special ids).

    Args:
        family: the family whose :meth:`~ModelFamily.encode` made ``tokens``.
        ids: the texts' ids, in the order of ``tokens``' rows.
        tokens: ``[N, L]`` ids.
        where: the split or file the texts came from (named in the error).

    Raises:
        DataError: naming the split, the first texts' ids and the tokenizer.
    """
    from influence.exceptions import DataError

    special = torch.tensor(sorted(set(family.special_ids) | {family.pad_id}), dtype=tokens.dtype)
    empty = (tokens.unsqueeze(-1) != special).all(dim=-1).sum(dim=1) == 0
    if bool(empty.any()):
        bad = [ids[i] for i in empty.nonzero().flatten().tolist()[:5]]
        raise DataError(f"{where}: the {family.name!r} family's tokenizer ({type(family).__module__}."
                        f"{type(family).__qualname__}.encode) yielded no tokens for {int(empty.sum())} of "
                        f"{len(ids)} texts (first ids {bad}); a tokenizer must give every non-empty text at least one "
                        f"token other than padding and the special ids {sorted(set(family.special_ids))}")


__all__ = ["ModelFamily", "REQUIRED", "carry_shared", "check_encoded", "load_factory"]

"""The experiment the pipeline runs, in one object: its data, models, tasks, modes, solvers and outputs.

:class:`Experiment` is built from the settings and the workspace (for a stage, through
:meth:`Experiment.for_stage`, which lets the stage see only what its row of the stage table
declares). It owns every rule of the experiment that the stages share:

- the model recipes: a fresh masked-word model and classifier (seeded), the pretrained model and
  each mode's finetuned classifier read back with the architecture saved beside their weights
  (``model.json``), the number of classes and the label names read from the data;
- the tasks: the finetuning loss, the query measurement, the pretraining loss;
- the finetuning modes of the multi-stage paper: which parameters train, which the L2 term covers
  and the proximity penalty of ``updated`` (:meth:`regularizer` is the whole penalty of a mode's
  objective, the one its training minimised and its Hessian carries);
- the solver of each attribution stage, with the damping rule stated once (:meth:`solver`);
- the checkpoints, the device, and reading and writing stage outputs (a stage reads only the
  outputs of the stages its row lists as inputs).
"""

from __future__ import annotations

import logging
import random
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from flows.declared import declared_settings
from flows.stage_table import stage as table_row
from flows.workspace import Workspace

log = logging.getLogger(__name__)
INIT_LOCK = threading.Lock()  # torch's global generator seeds model initialisation: one thread at a time


class UndeclaredInputError(LookupError):
    """A stage read an output or a dataset that its row of ``flows/stage_table.py`` does not list."""


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """A sorted seeded sample of ``min(k, n)`` indices out of ``range(n)``."""
    return sorted(random.Random(seed).sample(range(n), min(k, n)))


def _built(build, seed: int | None = None):
    """``build()`` under :data:`INIT_LOCK`, after ``torch.manual_seed(seed)`` when a seed is given: every
    model is built under the lock, since an unseeded build also draws from the global generator."""
    with INIT_LOCK:
        if seed is not None:
            torch.manual_seed(seed)
        return build()


class Experiment:
    """Everything a stage needs to know about the experiment, built from settings and workspace.

    Args:
        settings: the run's settings (for a stage: only those its row declares).
        ws: the workspace.
        stage: the stage this object serves (its own outputs go to ``artifacts/<stage>``), or
            ``None`` for unrestricted use (tests, notebooks).
    """

    def __init__(self, settings: Any, ws: Workspace, stage: str | None = None) -> None:
        self.settings = settings
        self.ws = ws
        self.stage = stage
        self._splits: dict[str, Any] = {}
        self._pretrained: Any = None

    @classmethod
    def for_stage(cls, stage: str, settings: Any, ws: Workspace) -> "Experiment":
        """The experiment as stage ``stage`` may see it: the settings, outputs and data its row declares."""
        row = table_row(stage)
        return cls(declared_settings(settings, stage, row.params), ws, stage)

    # -- stage outputs ----------------------------------------------------------------------

    def _check_input(self, stage: str) -> None:
        if self.stage is None or stage == self.stage:
            return
        row = table_row(self.stage)
        if stage not in row.inputs:
            raise UndeclaredInputError(
                f"stage {self.stage!r} read the outputs of stage {stage!r}, which its row of flows/stage_table.py "
                f"does not list in inputs {list(row.inputs)}: add it there (then: python -m flows.cli dvc-yaml)"
            )

    def out_dir(self, *parts: str) -> Path:
        """``artifacts/<this stage>/<parts>``, created."""
        path = self.ws.stage_dir(self.stage).joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def path(self, stage: str, *parts: str) -> Path:
        """``artifacts/<stage>/<parts>``: an output of ``stage``, which must be an input of this stage."""
        self._check_input(stage)
        return self.ws.artifacts.joinpath(stage, *parts)

    def relative(self, path: Path) -> str:
        """``path`` relative to the project folder (what stage results record)."""
        return str(Path(path).relative_to(self.ws.root))

    def dataset_path(self, name: str) -> Path:
        """``data/prepared/<name>.csv``, which this stage's row must list in ``data``."""
        if self.stage is not None and name not in table_row(self.stage).data:
            raise UndeclaredInputError(
                f"stage {self.stage!r} read the dataset {name!r}, which its row of flows/stage_table.py does not "
                f"list in data: add it there (then: python -m flows.cli dvc-yaml)"
            )
        return self.ws.dataset(name)

    def write_scores(self, mode: str, scores: torch.Tensor) -> str:
        """Write ``[n_query, n_train]`` scores as ``artifacts/<stage>/<mode>.safetensors`` (float32); its path."""
        from influence.models.checkpoints import save_state

        return self.relative(save_state({"scores": scores.float().contiguous()}, self.out_dir() / f"{mode}.safetensors"))

    def scores(self, stage: str, mode: str) -> torch.Tensor:
        """``[n_query, n]`` float32 scores of ``stage`` in ``mode``."""
        from influence.models.checkpoints import load_state

        return load_state(self.path(stage, f"{mode}.safetensors"))["scores"]

    def checked_scores(self, stage: str) -> torch.Tensor:
        """``[evaluation.queries, n]``: the scores of ``stage`` for the checked queries of ``evaluation.mode``."""
        e = self.settings.evaluation
        return self.scores(stage, e.mode)[: e.queries]

    def write_json(self, name: str, obj: Any) -> str:
        """Write ``artifacts/<stage>/<name>`` as JSON (atomically); its path relative to the project."""
        from influence.storage import write_json

        return self.relative(write_json(self.out_dir() / name, obj))

    def read_json(self, stage: str, name: str) -> Any:
        """The JSON output ``name`` of ``stage``."""
        from influence.storage import read_json

        return read_json(self.path(stage, name))

    # -- data -------------------------------------------------------------------------------

    def split(self, name: str) -> Any:
        """The encoded dataset of one split (``pretrain``, ``train``, ``validation``, ``test``, ``queries``)."""
        if name not in self._splits:
            from safetensors.torch import load_file

            from influence.data.datasets import TextClassificationDataset, TokenDataset

            tensors = load_file(str(self.path("features", f"{name}.safetensors")))
            ids = self.read_json("features", f"{name}_ids.json")
            self._splits[name] = (TextClassificationDataset(tensors["tokens"], tensors["labels"], ids)
                                  if "labels" in tensors else TokenDataset(tensors["tokens"], ids))
        return self._splits[name]

    @cached_property
    def vocabulary(self) -> Any:
        from influence.data.text import Vocabulary

        return Vocabulary.from_json(self.path("features", "vocab.json"))

    @cached_property
    def label_names(self) -> list[str]:
        """Name of each class id, as the finetuning data gives them (``labels.json`` of the features stage)."""
        return list(self.read_json("features", "labels.json")["names"])

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def user_data(self) -> dict[str, Any]:
        """The user's files the data stage reads instead of the built-in data: ``{"finetune": LabelledTable,
        "pretrain": Corpus}``, each only when its ``data.*_source`` is ``"file"`` (paths from the project folder)."""
        from influence.data.user_files import Corpus, LabelledTable

        d, root, found = self.settings.data, self.ws.root, {}
        if d.finetune_source == "file":
            found["finetune"] = LabelledTable(root / d.finetune_file, d.text_column, d.label_column, d.group_column)
        if d.pretrain_source == "file":
            found["pretrain"] = Corpus(root / d.pretrain_file, d.pretrain_text_column, d.pretrain_unit, d.chunk_words)
        return found

    def checked_queries(self) -> Any:
        """The queries the evidence stages check: the first ``evaluation.queries``."""
        return self.split("queries").subset(list(range(self.settings.evaluation.queries)))

    def hessian_sample(self, data: Any, examples: int) -> Any:
        """A seeded sample of ``examples`` of ``data`` whose mean loss defines a Hessian."""
        return data.subset(sample_indices(len(data), examples, self.settings.seed))

    # -- tasks ------------------------------------------------------------------------------

    @property
    def train_task(self) -> Any:
        """The finetuning loss (cross-entropy)."""
        from influence.task import ClassificationTask

        return ClassificationTask()

    @property
    def query_task(self) -> Any:
        """The finetuning task whose measurement (``attribution.measurement``) each query explains."""
        from influence.task import ClassificationTask

        return ClassificationTask(measurement=self.settings.attribution.measurement)

    @property
    def pretrain_task(self) -> Any:
        """The pretraining loss: masked-word cross-entropy, padding ignored."""
        from influence.data.text import PAD
        from influence.task import LanguageModelingTask

        return LanguageModelingTask(padding_idx=PAD)

    # -- models -----------------------------------------------------------------------------

    def language_model_config(self) -> dict[str, int]:
        """Architecture of a new masked-word model: the vocabulary and the ``pretrain`` settings."""
        p = self.settings.pretrain
        return {"vocab_size": len(self.vocabulary), "embed_dim": p.embed_dim, "hidden_dim": p.hidden_dim, "window": p.window}

    def new_language_model(self, seed: int | None = None) -> Any:
        """A freshly initialised masked-word model (initialisation seeded by ``seed``, default ``settings.seed``)."""
        from influence.models.text import CbowLanguageModel

        config = self.language_model_config()
        return _built(lambda: CbowLanguageModel(**config), self.settings.seed if seed is None else seed)

    def pretrained(self) -> Any:
        """The pretraining stage's model (architecture from its ``model.json``), in eval mode.

        Read once per experiment object and shared by its callers, which only read it.
        """
        if self._pretrained is None:
            from influence.models.checkpoints import load_state
            from influence.models.text import CbowLanguageModel

            config = self.read_json("pretrain", "model.json")
            model = _built(lambda: CbowLanguageModel(**config))
            model.load_state_dict(load_state(self.path("pretrain", "model.safetensors")))
            self._pretrained = model.eval()
        return self._pretrained

    def classifier_config(self, pretrained: Any = None) -> dict[str, int]:
        """Architecture of a new classifier: the pretrained embedding's shape, ``finetune.hidden_dim``, the data's classes."""
        pretrained = self.pretrained() if pretrained is None else pretrained
        vocab_size, embed_dim = pretrained.embedding.weight.shape
        return {"vocab_size": int(vocab_size), "embed_dim": int(embed_dim),
                "hidden_dim": self.settings.finetune.hidden_dim, "num_classes": self.num_classes}

    def new_classifier(self, seed: int | None = None, pretrained: Any = None) -> Any:
        """A fresh classifier (seeded by ``seed``, default ``settings.seed``) with the pretrained embedding copied in."""
        from influence.models.text import TextClassifier, transfer_embedding

        pretrained = self.pretrained() if pretrained is None else pretrained
        config = self.classifier_config(pretrained)
        model = _built(lambda: TextClassifier(**config), self.settings.seed if seed is None else seed)
        transfer_embedding(pretrained, model)
        return model

    def finetuned(self, mode: str) -> Any:
        """The finetuning stage's classifier of ``mode`` (architecture from its ``model.json``), in eval mode."""
        from influence.models.checkpoints import load_state
        from influence.models.text import TextClassifier

        config = self.read_json("finetune", "model.json")
        model = _built(lambda: TextClassifier(**config))
        model.load_state_dict(load_state(self.path("finetune", mode, "model.safetensors")))
        return model.eval()

    def shared(self, classifier: Any, pretrained: Any) -> dict[str, str]:
        """``{classifier parameter: pretrained parameter}`` carried from pretraining: the word embedding's weight."""
        from influence.gradients.layout import select_parameters

        return dict(zip(select_parameters(classifier, "embedding"), select_parameters(pretrained, "embedding")))

    # -- finetuning modes -------------------------------------------------------------------

    def trainable(self, mode: str, model: Any) -> list[str]:
        """Parameters trained in ``mode``: all but the shared embedding (``fixed``) or all (``updated``)."""
        shared = set(self.shared(model, self.pretrained()))
        return [n for n, _ in model.named_parameters() if mode == "updated" or n not in shared]

    def regularizer(self, mode: str, model: Any, pretrained: Any = None) -> Any:
        """The whole penalty of ``mode``'s finetuning objective.

        ``(l2/2)·||θ||²`` over the parameters above the embedding in both modes, plus in ``updated``
        ``(alpha/2)·||W − W_pretrained||²`` on the embedding (the proximity penalty is the embedding's
        regulariser). Training adds exactly this to its loss; influence Hessians add exactly this.
        """
        from influence.regularizers import Proximity, Regularizer

        pretrained = self.pretrained() if pretrained is None else pretrained
        shared = self.shared(model, pretrained)
        above = tuple(n for n, _ in model.named_parameters() if n not in shared)
        proximity = None
        if mode == "updated":
            weights = dict(pretrained.named_parameters())
            proximity = Proximity(alpha=self.settings.finetune.alpha,
                                  reference={ft: weights[pt].detach().clone() for ft, pt in shared.items()})
        return Regularizer(l2=self.settings.finetune.l2, proximity=proximity, l2_names=above)

    def pretrain_regularizer(self) -> Any:
        """The penalty of the pretraining objective: ``(l2/2)·||θ||²`` over every parameter."""
        from influence.regularizers import Regularizer

        return Regularizer(l2=self.settings.pretrain.l2)

    # -- solvers ----------------------------------------------------------------------------

    def solver(self, which: str = "finetune") -> dict[str, Any]:
        """``{"solver", "damping", "solver_options"}`` of an inverse Hessian.

        ``which``: ``"finetune"`` (``attribution.solver``), ``"pretrain"`` (``attribution.pretrain_solver``)
        or ``"self_influence"`` (the finetuning Hessian with Arnoldi: self-influence solves one
        right-hand side per training example, which only a factorised solver makes cheap).

        The damping rule, once: ``λ = attribution.damping`` (finetuning) or
        ``attribution.pretrain_damping`` (pretraining), added to the Hessian of the regularised
        objective, which already holds the L2 term.
        """
        a = self.settings.attribution
        if which == "pretrain":
            name, damping, gauss_newton = a.pretrain_solver, a.pretrain_damping, a.pretrain_gauss_newton
        else:
            name, damping, gauss_newton = ("arnoldi" if which == "self_influence" else a.solver), a.damping, a.gauss_newton
        options: dict[str, Any] = {"gauss_newton": gauss_newton}
        if name == "cg":
            options["max_iterations"] = a.cg_iterations
        elif name == "arnoldi":
            options.update(n_iterations=a.arnoldi_iterations, top_k=a.arnoldi_rank, seed=self.settings.seed)
        return {"solver": name, "damping": damping, "solver_options": options}

    # -- checkpoints and device -------------------------------------------------------------

    def checkpoints(self, mode: str, folder: Path | None = None) -> list[tuple[str, float]]:
        """``[(path, learning rate)]`` of the finetuning checkpoints of ``mode`` (or in ``folder``), checksums checked."""
        from influence.models.checkpoints import read_manifest

        folder = self.path("finetune", mode, "checkpoints") if folder is None else folder
        return [(str(c.path), float(c.learning_rate)) for c in read_manifest(folder)]

    @cached_property
    def device(self) -> str:
        """``attribution.device``, with ``auto`` = CUDA when present; ``cuda`` without a CUDA device falls back to the CPU."""
        requested = self.settings.attribution.device
        if requested == "cpu":
            return "cpu"
        if torch.cuda.is_available():
            return "cuda"
        if requested == "cuda":
            log.warning("attribution.device is 'cuda' but this machine has no CUDA device: running on the CPU")
        return "cpu"


__all__ = ["Experiment", "UndeclaredInputError", "sample_indices"]

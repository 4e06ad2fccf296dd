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

import contextlib
import logging
import random
import sys
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from flows.definition.declared import declared_settings
from flows.definition import stage_table
from flows.experiment.workspace import Workspace

log = logging.getLogger(__name__)


class UndeclaredInputError(LookupError):
    """A stage read an output or a dataset that its row of ``flows/definition/stage_table.py`` does not list."""


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """A sorted seeded sample of ``min(k, n)`` indices out of ``range(n)``."""
    return sorted(random.Random(seed).sample(range(n), min(k, n)))


def _built(build, seed: int | None = None):
    """``build()`` with its initialisation drawn from a private generator seeded by ``seed`` (0 for a model whose
    weights are loaded next): the weights ``torch.manual_seed(seed); build()`` gives, while torch's global
    generator is never seeded nor read, so retrainings on parallel threads cannot shift each other's draws."""
    from influence.models.seeding import build_seeded

    return build_seeded(build, 0 if seed is None else seed)


PARTIAL = ".partial"  # in a score stage's folder: the pieces of a mode's scores while it computes them


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
        row = stage_table.row(stage)
        return cls(declared_settings(settings, stage, row.params), ws, stage)

    # -- stage outputs ----------------------------------------------------------------------

    def _check_input(self, stage: str) -> None:
        if self.stage is None or stage == self.stage:
            return
        row = stage_table.row(self.stage)
        if stage not in row.inputs:
            raise UndeclaredInputError(
                f"stage {self.stage!r} read the outputs of stage {stage!r}, which its row of flows/definition/stage_table.py "
                f"does not list in inputs {list(row.inputs)}: add it there (then: python -m flows.cli dvc-yaml)"
            )

    def out_dir(self, *parts: str) -> Path:
        """``artifacts/<this stage>/<parts>``, created."""
        path = self.ws.stage_dir(self.stage).joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def partial_dir(self, mode: str) -> Path:
        """``artifacts/<this stage>/.partial/<mode>``, created: where a score stage keeps the finished pieces of one
        mode's scores while it computes them (a killed run of the same inputs finds them in its staging folder);
        removed once every mode's scores are written (:func:`flows.stages.entry.score_stage`)."""
        return self.out_dir(PARTIAL, mode)

    def path(self, stage: str, *parts: str) -> Path:
        """``artifacts/<stage>/<parts>``: an output of ``stage``, which must be an input of this stage (or this
        stage's own output, in its staging folder while it runs)."""
        self._check_input(stage)
        if stage == self.stage:
            return self.ws.stage_dir(stage).joinpath(*parts)
        return self.ws.artifacts.joinpath(stage, *parts)

    def relative(self, path: Path) -> str:
        """``path`` relative to the project folder (what stage results record)."""
        return str(Path(path).relative_to(self.ws.root))

    def dataset_path(self, name: str) -> Path:
        """``data/prepared/<name>.csv``, which this stage's row must list in ``data``."""
        if self.stage is not None and name not in stage_table.row(self.stage).data:
            raise UndeclaredInputError(
                f"stage {self.stage!r} read the dataset {name!r}, which its row of flows/definition/stage_table.py does not "
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

    def checked_scores(self, stage: str, mode: str | None = None) -> torch.Tensor:
        """``[evaluation.queries, n]``: the scores of ``stage`` for the checked queries of ``mode`` (default
        ``evaluation.mode``)."""
        e = self.settings.evaluation
        return self.scores(stage, mode or e.mode)[: e.queries]

    def pretrain_checked_modes(self) -> list[str]:
        """The finetuned models the pretraining case deletion checks: ``evaluation.pretrain_modes``, or
        ``[evaluation.mode]`` when that is empty."""
        e = self.settings.evaluation
        return list(e.pretrain_modes) or [e.mode]

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

    # -- the model family -------------------------------------------------------------------

    def new_family(self) -> Any:
        """The family ``model.family`` names, its tokenizer not yet built (the features stage builds it)."""
        m = self.settings.model
        return _make_family({"family": m.family, "factory": m.factory, "mask_every": m.mask_every}, self.ws,
                            self.settings.data)

    def family_spec(self, family: Any) -> dict[str, Any]:
        """What ``features/family.json`` records of ``family``: its kind, how to build it again, and for a
        custom one its module's md5 (so that editing the module re-runs every stage after this one)."""
        from influence.storage import file_digest

        m = self.settings.model
        spec = {"family": m.family, "factory": m.factory if m.family == "custom" else "",
                "mask_every": m.mask_every if m.family == "minilm" else None, "name": family.name}
        if m.family == "custom":
            source = Path(sys.modules[type(family).__module__].__file__)
            spec["module_md5"] = file_digest(source, "md5")
        return spec

    @cached_property
    def family(self) -> Any:
        """The features stage's family (``family.json``) with its tokenizer read back."""
        family = _make_family(self.read_json("features", "family.json"), self.ws)
        family.load_tokenizer(self.path("features"))
        return family

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
        from flows.guards.run_form import check_user_file
        from influence.data.user_files import Corpus, LabelledTable

        d, root, found = self.settings.data, self.ws.root, {}
        if d.finetune_source == "file":  # checked again here: dvc repro and the library calls come this way too
            path = check_user_file("data.finetune_file", d.finetune_file, root)
            found["finetune"] = LabelledTable(path, d.text_column, d.label_column, d.group_column)
        if d.pretrain_source == "file":
            path = check_user_file("data.pretrain_file", d.pretrain_file, root)
            found["pretrain"] = Corpus(path, d.pretrain_text_column, d.pretrain_unit, d.chunk_words)
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
        """The pretraining loss: the family's (masked-word cross-entropy, padding ignored)."""
        return self.family.pretrain_task

    # -- models -----------------------------------------------------------------------------

    def language_model_config(self) -> dict[str, Any]:
        """Architecture of a new language model: the family's, sized by the ``pretrain`` settings where it uses them."""
        return self.family.language_model_config(self.settings.pretrain)

    def new_language_model(self, seed: int | None = None) -> Any:
        """A freshly initialised language model (initialisation seeded by ``seed``, default ``settings.seed``)."""
        config = self.language_model_config()
        return _built(lambda: self.family.language_model(config), self.settings.seed if seed is None else seed)

    def pretrained(self) -> Any:
        """The pretraining stage's model (architecture from its ``model.json``), in eval mode.

        Read once per experiment object and shared by its callers, which only read it.
        """
        if self._pretrained is None:
            from influence.models.checkpoints import load_state

            config = self.read_json("pretrain", "model.json")
            model = _built(lambda: self.family.language_model(config))
            model.load_state_dict(load_state(self.path("pretrain", "model.safetensors")))
            self._pretrained = model.eval()
        return self._pretrained

    def classifier_config(self, pretrained: Any = None) -> dict[str, Any]:
        """Architecture of a new classifier: the family's, on the pretrained model, with the data's classes."""
        pretrained = self.pretrained() if pretrained is None else pretrained
        return self.family.classifier_config(pretrained, self.num_classes, self.settings.finetune)

    def new_classifier(self, seed: int | None = None, pretrained: Any = None) -> Any:
        """A fresh classifier (seeded by ``seed``, default ``settings.seed``) with the pretrained shared parameters copied in."""
        from influence.models.family import carry_shared

        pretrained = self.pretrained() if pretrained is None else pretrained
        config = self.classifier_config(pretrained)
        model = _built(lambda: self.family.classifier(config), self.settings.seed if seed is None else seed)
        carry_shared(self.family, pretrained, model)
        return model

    def finetuned(self, mode: str) -> Any:
        """The finetuning stage's classifier of ``mode`` (architecture from its ``model.json``), in eval mode."""
        from influence.models.checkpoints import load_state

        config = self.read_json("finetune", "model.json")
        model = _built(lambda: self.family.classifier(config))
        model.load_state_dict(load_state(self.path("finetune", mode, "model.safetensors")))
        return model.eval()

    def shared(self) -> dict[str, str]:
        """``{classifier parameter: pretrained parameter}`` carried from pretraining (the family's)."""
        return self.family.shared()

    @property
    def ignored_ids(self) -> tuple[int, ...]:
        """Token ids TracIn-WE leaves out: the family's special ids (padding aside: it has no gradient) and unknown word."""
        f = self.family
        return tuple(i for i in f.special_ids if i != f.pad_id) + ((f.unknown_id,) if f.unknown_id is not None else ())

    def batch(self, size: int) -> int:
        """``size`` examples per batch, capped by the family's ``max_batch`` (a transformer's activations)."""
        cap = self.family.max_batch
        return size if cap is None else min(size, cap)

    def params(self, names: list[str]) -> Any:
        """A parameter selection from a settings list: ``["all"]`` is ``"all"``, else the module names."""
        return "all" if list(names) == ["all"] else list(names)

    def multistage_theta(self, mode: str, model: Any, shared: dict[str, str]) -> list[str]:
        """The finetuning parameters besides ``shared`` that multi-stage influence solves over: those of
        ``attribution.if_params`` trained in ``mode`` (the CNN's default: the encoder and the head)."""
        from influence.gradients.layout import select_parameters

        trained = set(self.trainable(mode, model))
        return [n for n in select_parameters(model, list(self.settings.attribution.if_params)) if n in trained and n not in shared]

    def multistage_shared(self, classifier: Any) -> dict[str, str]:
        """The carried parameters multi-stage influence traces: ``attribution.shared_params`` (empty: all)."""
        from influence.exceptions import invalid
        from influence.gradients.layout import select_parameters

        carried, chosen = self.shared(), list(self.settings.attribution.shared_params)
        if not chosen:
            return carried
        names = select_parameters(classifier, chosen)
        stray = [n for n in names if n not in carried]
        if stray:
            raise invalid("attribution.shared_params", chosen, f"modules whose parameters are carried from pretraining, "
                          f"not {stray[:5]}; carried: {sorted({n.rsplit('.', 1)[0] for n in carried})[:12]}...")
        return {n: carried[n] for n in names}

    # -- finetuning modes -------------------------------------------------------------------

    def trainable(self, mode: str, model: Any) -> list[str]:
        """Parameters trained in ``mode``: all but the shared embedding (``fixed``) or all (``updated``)."""
        shared = set(self.shared())
        return [n for n, _ in model.named_parameters() if mode == "updated" or n not in shared]

    def regularizer(self, mode: str, model: Any, pretrained: Any = None, shared: dict[str, str] | None = None) -> Any:
        """The whole penalty of ``mode``'s finetuning objective (its proximity over ``shared``, default all carried).

        ``(l2/2)·||θ||²`` over the parameters above the embedding in both modes, plus in ``updated``
        ``(alpha/2)·||W − W_pretrained||²`` on the embedding (the proximity penalty is the embedding's
        regulariser). Training adds exactly this to its loss; influence Hessians add exactly this.
        """
        from influence.regularizers import Proximity, Regularizer

        pretrained = self.pretrained() if pretrained is None else pretrained
        carried = self.shared()
        shared = carried if shared is None else shared
        above = tuple(n for n, _ in model.named_parameters() if n not in carried)
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

        ``which``: ``"finetune"`` (``attribution.solver``), ``"pretrain"`` (``attribution.pretrain_solver``),
        ``"multistage"`` (``attribution.multistage_solver``, the finetuning half of multi-stage influence)
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
            name = {"self_influence": "arnoldi", "multistage": a.multistage_solver}.get(which, a.solver)
            damping, gauss_newton = a.damping, a.gauss_newton
        options: dict[str, Any] = {"gauss_newton": gauss_newton}
        if name == "cg":
            options["max_iterations"] = a.cg_iterations
        elif name == "arnoldi":
            options.update(n_iterations=a.arnoldi_iterations, top_k=a.arnoldi_rank, seed=self.settings.seed,
                           complement=a.arnoldi_complement)
        return {"solver": name, "damping": damping, "solver_options": options}

    # -- checkpoints and device -------------------------------------------------------------

    def checkpoints(self, mode: str, folder: Path | None = None) -> list[tuple[str, float]]:
        """``[(path, learning rate)]`` of the finetuning checkpoints of ``mode`` (or in ``folder``), checksums checked."""
        from influence.models.checkpoints import read_manifest

        folder = self.path("finetune", mode, "checkpoints") if folder is None else folder
        return [(str(c.path), float(c.learning_rate)) for c in read_manifest(folder)]

    @cached_property
    def device(self) -> str:
        """``attribution.device``, with ``auto`` = CUDA when present; ``cuda`` without a CUDA device falls back to the CPU.
        On CUDA, ``attribution.tf32`` sets whether matmuls and convolutions may use TensorFloat-32."""
        requested = self.settings.attribution.device
        if requested == "cpu":
            return "cpu"
        if torch.cuda.is_available():
            tf32 = self.settings.attribution.tf32  # attribution.tf32: TensorFloat-32 matmuls, or full float32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            return "cuda"
        if requested == "cuda":
            log.warning("attribution.device is 'cuda' but this machine has no CUDA device: running on the CPU")
        return "cpu"


def _make_family(spec: dict[str, Any], ws: Workspace, data: Any = None) -> Any:
    """The family ``spec`` (``family.json``) describes; ``data``: the data settings that size a new vocabulary."""
    kind = spec["family"]
    if kind == "cnn":
        from influence.models.text import CnnFamily

        return CnnFamily(data.vocab_min_count, data.vocab_max_size) if data is not None else CnnFamily()
    if kind == "minilm":
        from influence.data.sources import extract_minilm
        from influence.models.minilm import MiniLMFamily

        return MiniLMFamily(extract_minilm(ws.raw), mask_every=int(spec["mask_every"]))
    from flows.guards.run_form import ReachError, check_factory
    from influence.models.family import load_factory

    factory = str(spec["factory"])
    file = check_factory(factory, ws.root)  # a family.json may come from the object store: checked before any import
    if file is None:  # a module the operator lists: imported from the environment
        return load_factory(factory)
    module = factory.partition(":")[0]
    loaded = sys.modules.get(module)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "/").resolve() != file:
        raise ReachError(f"model.factory={factory!r}: a module {module!r} from elsewhere ({getattr(loaded, '__file__', None)}) "
                         f"is imported already in this process, so {file} would not be; rename the module")
    with _user_data_on_path(ws.root):
        return load_factory(factory)


@contextlib.contextmanager
def _user_data_on_path(root: Path):
    """``data/user`` first on ``sys.path`` for a while (a factory module lives there, :func:`flows.guards.run_form.check_factory`)."""
    from flows.definition.stage_table import USER_DATA

    added = [str(p) for p in (root / USER_DATA,) if str(p) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for path in added:
            if path in sys.path:
                sys.path.remove(path)


__all__ = ["Experiment", "UndeclaredInputError", "sample_indices"]

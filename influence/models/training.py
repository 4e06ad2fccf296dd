"""A deterministic training loop with frozen parameters, explicit penalties, checkpoints and resume.

The objective minimised by :func:`train` is::

    mean_i task.train_loss(z_i) + (l2 / 2) * sum_{trainable p} ||p||^2
                                + (alpha / 2) * sum_{p in reference} ||p - p_ref||^2

The penalties are added to the loss explicitly (no optimizer weight decay), and
:class:`Regularizer` is that exact penalty as a function of a ``{name: tensor}`` dict, so that
influence code adds the very same term to its Hessian (``TrainResult.regularizer``). The second
term with a :class:`Proximity` is the finetuning mode of Chen et al. 2020 ("Multi-stage influence
function") where the embedding is updated but kept close to its pretrained value.

Determinism: the data are collated once; epoch ``e`` visits them in the order
``torch.randperm(n, generator=torch.Generator().manual_seed(f(seed, e)))``, so a run depends only
on the seed, the dataset and the model's initial state: bit for bit on the CPU; on CUDA up to the
atomics of the embedding backward unless ``torch.use_deterministic_algorithms(True)``.

Checkpoints (only with ``checkpoint_dir``): the full state dict every ``checkpoint_every``
optimizer steps and after the last step, as ``step-<8-digit step>.safetensors``, listed in
``manifest.json`` with the learning rate of the steps *preceding* each checkpoint (the interval
since the previous checkpoint), which is what TracIn weighs that checkpoint's gradients by. No
checkpoint is written at step 0.

Resume: the manifest records the run's arguments (with hashes of the dataset, of the initial
model state and of the proximity reference). Alongside every checkpoint and at every epoch end,
``resume.safetensors`` holds the model, the optimizer state and the position in the data. Calling
:func:`train` again with the same arguments and a model in the same initial state continues from
it and ends with bit-identical weights; if the run had completed, the final checkpoint is loaded
and nothing is trained. Other arguments raise :class:`CacheMismatchError` unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from influence.exceptions import CacheMismatchError, CorruptedArtifactError, invalid
from influence.gradients.layout import select_parameters
from influence.models.checkpoints import (
    MANIFEST_NAME,
    CheckpointInfo,
    load_model_state,
    load_training_state,
    read_manifest_document,
    save_state,
    save_training_state,
    write_manifest,
)
from influence.task import Batch, Task, split_inputs_labels, to_device

RESUME_NAME = "resume.safetensors"


# -- penalties --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Proximity:
    """Proximity penalty ``(alpha / 2) * sum_name ||p_name - reference[name]||^2``.

    Args:
        alpha: strength, ``>= 0``.
        reference: ``name -> tensor`` of the anchor values (e.g. the pretrained embedding
            ``{"embedding.weight": [V, E]}``); stored detached.
    """

    alpha: float
    reference: Mapping[str, Tensor]

    def __post_init__(self) -> None:
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha < 0:
            raise invalid("alpha", self.alpha, "a finite number >= 0")
        if not self.reference:
            raise invalid("reference", dict(self.reference), "a non-empty dict of parameter tensors")
        for name, value in self.reference.items():
            if not isinstance(value, Tensor):
                raise invalid(f"reference[{name!r}]", type(value).__name__, "a torch.Tensor")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "reference", {n: v.detach() for n, v in self.reference.items()})

    @classmethod
    def from_model(cls, model: nn.Module, names: str | Sequence[str], alpha: float) -> "Proximity":
        """Anchor the parameters ``names`` (a selector of ``select_parameters``) at their current values."""
        params = dict(model.named_parameters())
        chosen = select_parameters(model, names)
        return cls(alpha, {n: params[n].detach().clone() for n in chosen})

    def to(self, device: torch.device | str) -> "Proximity":
        """The same penalty with the reference tensors on ``device``."""
        return Proximity(self.alpha, {n: v.to(device) for n, v in self.reference.items()})

    def penalty(self, params: Mapping[str, Tensor]) -> Tensor:
        """The penalty over the reference names present in ``params`` (a 0-dim tensor)."""
        terms = [
            ((params[n] - ref.to(dtype=params[n].dtype, device=params[n].device)) ** 2).sum()
            for n, ref in self.reference.items()
            if n in params
        ]
        if not terms:
            return _zero(params)
        return 0.5 * self.alpha * torch.stack(terms).sum()


@dataclass(frozen=True, eq=False)
class Regularizer:
    """The penalty terms of the training objective, as ``R(params) -> scalar``.

    ``R(p) = (l2 / 2) * sum_{n in l2_names} ||p[n]||^2 + proximity.penalty(p)``. Names absent from
    ``params`` are skipped, so ``R`` can be given every named parameter of the model (as
    :class:`influence.gradients.objective.Objective` does) or just the selected ones; either way
    its gradient and Hessian with respect to the given tensors are exact.

    Args:
        l2: L2 strength, ``>= 0``.
        proximity: optional proximity penalty.
        l2_names: names the L2 term covers (the trainable parameters); ``None``: every name given.
    """

    l2: float = 0.0
    proximity: Proximity | None = None
    l2_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.l2, (int, float)) or not math.isfinite(self.l2) or self.l2 < 0:
            raise invalid("l2", self.l2, "a finite number >= 0")
        object.__setattr__(self, "l2", float(self.l2))
        if self.l2_names is not None:
            object.__setattr__(self, "l2_names", tuple(self.l2_names))

    @property
    def is_zero(self) -> bool:
        """``True`` when the penalty is identically zero."""
        return self.l2 == 0.0 and (self.proximity is None or self.proximity.alpha == 0.0)

    def __call__(self, params: Mapping[str, Tensor]) -> Tensor:
        """Value of the penalty.

        Args:
            params: ``name -> tensor`` (any shapes; under ``torch.func`` transforms too).

        Returns:
            A 0-dim tensor.
        """
        total = _zero(params)
        if self.l2 != 0.0:
            names = params.keys() if self.l2_names is None else [n for n in self.l2_names if n in params]
            terms = [(params[n] ** 2).sum() for n in names]
            if terms:
                total = total + 0.5 * self.l2 * torch.stack(terms).sum()
        if self.proximity is not None and self.proximity.alpha != 0.0:
            total = total + self.proximity.penalty(params)
        return total


def _zero(params: Mapping[str, Tensor]) -> Tensor:
    first = next(iter(params.values()), None)
    if first is None:
        return torch.zeros(())
    return first.new_zeros(())


# -- data -------------------------------------------------------------------------------------


def collate_dataset(dataset: Dataset | Mapping[str, Tensor]) -> Batch:
    """All examples of a map-style dataset as one batch (torch's default collate).

    Args:
        dataset: a map-style dataset whose examples have equal shapes (e.g. ``{"tokens": [L],
            "label": []}``), one with a ``collated()`` method that returns that batch directly, or
            an already collated mapping ``{key: [N, ...]}``.

    Returns:
        The batch of all ``N`` examples, e.g. ``{"tokens": [N, L], "label": [N]}``.

    Raises:
        InvalidArgumentError: the dataset is empty or its examples cannot be stacked.
    """
    if hasattr(dataset, "collated"):  # the project's datasets hold their tensors already stacked
        dataset = dataset.collated()
    if isinstance(dataset, Mapping):
        sizes = {k: v.shape[0] for k, v in dataset.items() if isinstance(v, Tensor) and v.dim() > 0}
        if not sizes or len(set(sizes.values())) != 1:
            raise invalid("dataset", sizes, "a dict of tensors with one common leading size N >= 1")
        return dict(dataset)
    try:
        n = len(dataset)
    except TypeError as err:
        raise invalid("dataset", type(dataset).__name__, "a map-style dataset with __len__") from err
    if n == 0:
        raise invalid("len(dataset)", 0, "a non-empty dataset")
    try:
        return default_collate([dataset[i] for i in range(n)])
    except (RuntimeError, TypeError) as err:
        raise invalid(
            "dataset", type(dataset).__name__, f"examples of equal shapes that stack ({err})"
        ) from err


def _index(batch: Batch, index: Tensor) -> Batch:
    if isinstance(batch, Tensor):
        return batch[index]
    if isinstance(batch, Mapping):
        return {k: _index(v, index) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_index(v, index) for v in batch)
    return batch


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: _rows(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_rows(v, start, stop) for v in batch)
    return batch


def _tensors(batch: Batch) -> list[tuple[str, Tensor]]:
    if isinstance(batch, Tensor):
        return [("", batch)]
    if isinstance(batch, Mapping):
        return [(f"{k}.{n}", t) for k in sorted(batch) for n, t in _tensors(batch[k])]
    if isinstance(batch, (tuple, list)):
        return [(f"{i}.{n}", t) for i, v in enumerate(batch) for n, t in _tensors(v)]
    return []


def _num_examples(batch: Batch) -> int:
    tensors = [t for _, t in _tensors(batch) if t.dim() > 0]
    if not tensors:
        raise invalid("dataset", type(batch).__name__, "examples holding tensors")
    return int(tensors[0].shape[0])


def _sha256(named: Sequence[tuple[str, Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _permutation(n: int, seed: int, epoch: int) -> Tensor:
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=generator)


# -- results ----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        losses: mean training objective (loss + penalties) of each epoch's batches.
        data_losses: mean task loss (without penalties) of each epoch's batches.
        steps: optimizer steps taken in total.
        checkpoints: the saved checkpoints in step order (empty without ``checkpoint_dir``).
        seconds: wall-clock training time, summed over interrupted and resumed calls.
        trainable: names of the trained parameters (all others were frozen).
        regularizer: the exact penalty that was added to the loss.
        resumed_from_step: ``0`` for a fresh run; the step it continued from otherwise (equal to
            ``steps`` when a completed run was loaded and nothing trained).
    """

    losses: list[float]
    steps: int
    checkpoints: list[CheckpointInfo]
    seconds: float
    data_losses: list[float] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    regularizer: Regularizer = field(default_factory=Regularizer)
    resumed_from_step: int = 0


# -- training ---------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise invalid(name, value, f"an integer >= {minimum}")


def _task_description(task: Task) -> dict[str, Any]:
    state = {
        k: (v if isinstance(v, (str, int, float, bool, type(None))) else repr(v))
        for k, v in sorted(vars(task).items())
    }
    return {"class": f"{type(task).__module__}.{type(task).__qualname__}", "state": state}


def _info(directory: Path, entry: Mapping[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(directory / entry["path"], int(entry["step"]), float(entry["learning_rate"]))


class _RunDirectory:
    """Checkpoints, manifest and resume state of one run in ``checkpoint_dir``.

    After construction, ``document`` is the manifest of an earlier run with the same arguments
    (``None`` when starting afresh); ``checkpoints`` lists the checkpoints saved so far.
    """

    def __init__(self, directory: Path, arguments: dict[str, Any], overwrite: bool) -> None:
        self.directory = directory
        self.arguments = arguments
        self.checkpoints: list[CheckpointInfo] = []
        self.document: dict[str, Any] | None = None
        if (directory / MANIFEST_NAME).exists():
            document = read_manifest_document(directory)
            previous = document.get("arguments", {})
            if previous != arguments and not overwrite:
                differing = sorted(k for k in set(previous) | set(arguments) if previous.get(k) != arguments.get(k))
                raise CacheMismatchError(
                    f"{directory} holds a training run made with other arguments (differing: "
                    f"{differing}); pass overwrite=True or another checkpoint_dir"
                )
            if overwrite:
                for path in [directory / MANIFEST_NAME, self.resume_path, *directory.glob("step-*.safetensors")]:
                    path.unlink(missing_ok=True)
            else:
                self.document = document
        if self.document is None:
            write_manifest(directory, [], arguments=arguments, extra={"complete": False})

    @property
    def resume_path(self) -> Path:
        return self.directory / RESUME_NAME

    def completed(self) -> tuple[list[float], list[float], int, float] | None:
        """``(losses, data_losses, steps, seconds)`` of a finished run with these arguments, else ``None``."""
        if self.document is None or not self.document.get("complete"):
            return None
        try:
            self.checkpoints = [_info(self.directory, e) for e in self.document["checkpoints"]]
            return ([float(x) for x in self.document["losses"]],
                    [float(x) for x in self.document.get("data_losses", [])],
                    int(self.document["steps"]), float(self.document["seconds"]))
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptedArtifactError(
                f"the manifest in {self.directory} of a finished run is malformed: {err}"
            ) from err

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Restore model and optimizer from the resume state; its position, or ``None``."""
        if self.document is None or not self.resume_path.exists():
            return None
        position = load_training_state(self.resume_path, model, optimizer)
        try:
            self.checkpoints = [_info(self.directory, e) for e in position["checkpoints"]]
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptedArtifactError(f"the resume state {self.resume_path} is malformed: {err}") from err
        return position

    def save_checkpoint(self, model: nn.Module, step: int, learning_rate: float) -> CheckpointInfo:
        path = self.directory / f"step-{step:08d}.safetensors"
        save_state(model, path, {"step": str(step), "learning_rate": repr(learning_rate)})
        info = CheckpointInfo(path, step, learning_rate)
        if not self.checkpoints or self.checkpoints[-1].step != step:
            self.checkpoints.append(info)
        return info

    def save_progress(self, model: nn.Module, optimizer: torch.optim.Optimizer, position: dict[str, Any]) -> None:
        position = dict(position, checkpoints=[
            {"path": c.path.name, "step": c.step, "learning_rate": c.learning_rate} for c in self.checkpoints
        ])
        save_training_state(self.resume_path, model, optimizer, position)
        write_manifest(self.directory, self.checkpoints, arguments=self.arguments, extra={"complete": False})

    def finish(self, losses: list[float], data_losses: list[float], steps: int, seconds: float) -> None:
        write_manifest(self.directory, self.checkpoints, arguments=self.arguments, extra={
            "complete": True, "losses": losses, "data_losses": data_losses, "steps": steps,
            "seconds": seconds,
        })
        self.resume_path.unlink(missing_ok=True)


def train(
    model: nn.Module,
    task: Task,
    dataset: Dataset | Mapping[str, Tensor],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    optimizer: Literal["adam", "sgd"] = "adam",
    l2: float = 0.0,
    trainable: str | Sequence[str] | None = None,
    proximity: Proximity | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
    num_threads: int | None = None,
    l2_names: str | Sequence[str] | None = None,
    exclude: Sequence[int] | None = None,
) -> TrainResult:
    """Train ``model`` in place by minibatch Adam or SGD on the task's mean loss plus penalties.

    Args:
        model: the model; moved to ``device`` and trained in place. Parameters outside
            ``trainable`` get ``requires_grad=False`` and stay so afterwards.
        task: gives ``train_loss(model, batch) -> [B]``.
        dataset: map-style dataset of equally shaped examples (``{"tokens": [L], "label": []}``),
            or a collated ``{key: [N, ...]}`` dict. Collated once; a partial last batch is kept.
        epochs: passes over the data (``0`` trains nothing).
        batch_size: examples per step.
        learning_rate: constant learning rate.
        seed: seeds the data order (model initialisation is the caller's).
        optimizer: ``"adam"`` (default betas) or ``"sgd"`` (plain, no momentum).
        l2: adds ``(l2 / 2) * ||theta||^2`` over the trainable parameters (or ``l2_names``) to the loss.
        trainable: parameters to train, as ``select_parameters`` accepts them (``"all"``,
            ``"embedding"``, module or parameter names); ``None``: those that already require grad.
        proximity: adds ``(alpha / 2) * ||W - W_ref||^2`` over its reference names.
        checkpoint_dir: where checkpoints, the manifest and the resume state go; ``None``: nowhere.
        checkpoint_every: save a checkpoint every this many steps (one is always saved after the
            last step when ``checkpoint_dir`` is given).
        device: where to train.
        log: called with ``{"event": "epoch", "epoch", "step", "loss", "data_loss", "seconds"}`` after each
            epoch and ``{"event": "checkpoint", "step", "path", "learning_rate"}`` after each
            checkpoint (once it and the resume state are on disk); ``{"event": "resumed",
            "step"}`` / ``{"event": "loaded", "step", "path"}`` tell about resumed or finished runs.
        overwrite: discard a run in ``checkpoint_dir`` made with other arguments (or a finished
            one) instead of raising (or loading it).
        num_threads: torch intra-op threads while training (restored afterwards); ``None`` leaves
            the setting alone. ``1`` is much faster for small models on a busy machine, where
            OpenMP threads otherwise wait on each other at every tiny operation.
        l2_names: the parameters the L2 term covers, as ``select_parameters`` accepts them
            (``None``: every trainable parameter), e.g. everything but an embedding that a
            proximity penalty already anchors.
        exclude: indices of ``dataset`` left out of training while keeping the data order of the
            whole dataset: each step's batch is the whole run's batch less the excluded examples
            (its loss the mean over the examples kept; a batch left empty is skipped). So a run
            without some examples differs from the run with all of them only by their absence,
            not by a reshuffled order (what case deletion and the LDS retrain). ``None`` or empty:
            every example.

    Returns:
        A :class:`TrainResult`.

    Raises:
        InvalidArgumentError: a bad argument.
        CacheMismatchError: ``checkpoint_dir`` holds a run made with other arguments.
        CorruptedArtifactError: a checkpoint or the resume state cannot be read.
    """
    _check_int("epochs", epochs, 0)
    _check_int("batch_size", batch_size, 1)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise invalid("seed", seed, "an integer")
    if not isinstance(learning_rate, (int, float)) or not math.isfinite(learning_rate) or learning_rate <= 0:
        raise invalid("learning_rate", learning_rate, "a finite number > 0")
    if optimizer not in ("adam", "sgd"):
        raise invalid("optimizer", optimizer, "'adam' or 'sgd'")
    if checkpoint_every is not None:
        _check_int("checkpoint_every", checkpoint_every, 1)
        if checkpoint_dir is None:
            raise invalid("checkpoint_every", checkpoint_every, "None when checkpoint_dir is None")
    if num_threads is not None:
        _check_int("num_threads", num_threads, 1)
    if exclude is not None:
        if isinstance(exclude, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in exclude):
            raise invalid("exclude", exclude if isinstance(exclude, (str, bytes)) else list(exclude)[:5], "a sequence of example indices (ints)")
        if len(set(exclude)) != len(exclude):
            raise invalid("exclude", sorted(exclude)[:10], "distinct example indices")
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(
            model, task, dataset, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
            seed=seed, optimizer=optimizer, l2=l2, trainable=trainable, proximity=proximity,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, device=device, log=log,
            overwrite=overwrite, l2_names=l2_names, exclude=exclude,
        )
    finally:
        if num_threads is not None:
            torch.set_num_threads(previous_threads)


def _train(
    model: nn.Module,
    task: Task,
    dataset: Dataset | Mapping[str, Tensor],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    optimizer: str,
    l2: float,
    trainable: str | Sequence[str] | None,
    proximity: Proximity | None,
    checkpoint_dir: str | Path | None,
    checkpoint_every: int | None,
    device: torch.device | str,
    log: Callable[[dict[str, Any]], None] | None,
    overwrite: bool,
    l2_names: str | Sequence[str] | None = None,
    exclude: Sequence[int] | None = None,
) -> TrainResult:
    """The body of :func:`train`, with validated arguments."""
    started = time.perf_counter()
    model.to(device)
    names = select_parameters(model, "all" if trainable is None else trainable)
    params = dict(model.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in names)
    if proximity is not None:
        for name, ref in proximity.reference.items():
            if name not in params or params[name].shape != ref.shape:
                shape = tuple(params[name].shape) if name in params else "absent"
                raise invalid(f"proximity.reference[{name!r}]", tuple(ref.shape), f"the model's shape {shape}")
        proximity = proximity.to(device)
    covered = names if l2_names is None else [n for n in select_parameters(model, l2_names) if n in names]
    regularizer = Regularizer(l2=l2, proximity=proximity, l2_names=tuple(covered))
    trained = {n: params[n] for n in names}
    data = collate_dataset(dataset)
    n_examples = _num_examples(data)
    steps_per_epoch = math.ceil(n_examples / batch_size)
    excluded = sorted(int(i) for i in exclude) if exclude else []
    if excluded and (excluded[0] < 0 or excluded[-1] >= n_examples):
        raise invalid("exclude", [i for i in excluded if not 0 <= i < n_examples][:5], f"indices in [0, {n_examples})")
    kept = torch.ones(n_examples, dtype=torch.bool)
    kept[excluded] = False
    opt_class = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    opt = opt_class(list(trained.values()), lr=float(learning_rate))
    emit = log or (lambda event: None)

    run: _RunDirectory | None = None
    position: dict[str, Any] | None = None
    if checkpoint_dir is not None:
        arguments = json.loads(json.dumps({
            "epochs": epochs, "batch_size": batch_size, "learning_rate": float(learning_rate),
            "seed": seed, "optimizer": optimizer, "l2": float(l2), "trainable": names, "l2_names": covered,
            "checkpoint_every": checkpoint_every, "task": _task_description(task),
            "model": f"{type(model).__module__}.{type(model).__qualname__}",
            "initial_state_sha256": _sha256(sorted(model.state_dict().items())),
            "dataset": {"size": n_examples, "sha256": _sha256(_tensors(data))},
            **({"exclude": {"count": len(excluded), "sha256": _sha256([("exclude", torch.tensor(excluded))])}} if excluded else {}),
            "proximity": None if proximity is None else {
                "alpha": proximity.alpha,
                "reference_sha256": _sha256(sorted(proximity.reference.items())),
            },
        }))
        run = _RunDirectory(Path(checkpoint_dir), arguments, overwrite)
        finished = run.completed()
        if finished is not None:
            losses, data_losses, steps, seconds = finished
            load_model_state(model, run.checkpoints[-1].path)
            emit({"event": "loaded", "step": steps, "path": str(run.checkpoints[-1].path)})
            return TrainResult(losses=losses, steps=steps, checkpoints=list(run.checkpoints), seconds=seconds,
                               data_losses=data_losses, trainable=list(names), regularizer=regularizer,
                               resumed_from_step=steps)
        position = run.resume(model, opt)

    try:
        position = position or {}
        step, start_epoch = int(position.get("step", 0)), int(position.get("epoch", 0))
        start_batch = int(position.get("batch", 0))
        epoch_sum = float(position.get("epoch_loss_sum", 0.0))
        epoch_data_sum = float(position.get("epoch_data_loss_sum", 0.0))
        losses = [float(x) for x in position.get("losses", [])]
        data_losses = [float(x) for x in position.get("data_losses", [])]
        previous_seconds = float(position.get("seconds", 0.0))
    except (TypeError, ValueError) as err:
        raise CorruptedArtifactError(f"the resume state in {checkpoint_dir} is malformed: {err}") from err
    resumed_from = step
    if step:
        emit({"event": "resumed", "step": step})

    def save(epoch: int, batch: int, loss_sum: float, data_sum: float, checkpoint: bool) -> None:
        if checkpoint:
            info = run.save_checkpoint(model, step, float(opt.param_groups[0]["lr"]))
        run.save_progress(model, opt, {
            "step": step, "epoch": epoch, "batch": batch, "epoch_loss_sum": loss_sum,
            "epoch_data_loss_sum": data_sum, "losses": losses, "data_losses": data_losses,
            "seconds": previous_seconds + time.perf_counter() - started,
        })
        if checkpoint:
            emit({"event": "checkpoint", "step": step, "path": str(info.path), "learning_rate": info.learning_rate})

    data = to_device(data, device)
    kept = kept.to(device)
    model.train()
    for epoch in range(start_epoch, epochs):
        order = _permutation(n_examples, seed, epoch).to(device)
        first = start_batch if epoch == start_epoch else 0
        loss_sum = epoch_sum if epoch == start_epoch else 0.0
        data_sum = epoch_data_sum if epoch == start_epoch else 0.0
        for b in range(first, steps_per_epoch):
            rows = order[b * batch_size:(b + 1) * batch_size]
            if excluded:
                rows = rows[kept[rows]]
                if rows.numel() == 0:
                    continue
            batch = _index(data, rows)
            opt.zero_grad(set_to_none=True)
            data_loss = task.train_loss(model, batch).mean()
            loss = data_loss if regularizer.is_zero else data_loss + regularizer(trained)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += float(loss.detach())
            data_sum += float(data_loss.detach())
            if checkpoint_every is not None and step % checkpoint_every == 0:
                save(epoch, b + 1, loss_sum, data_sum, checkpoint=True)
        losses.append(loss_sum / steps_per_epoch)
        data_losses.append(data_sum / steps_per_epoch)
        if run is not None:
            save(epoch + 1, 0, 0.0, 0.0, checkpoint=False)
        emit({"event": "epoch", "epoch": epoch + 1, "step": step, "loss": losses[-1],
              "data_loss": data_losses[-1], "seconds": previous_seconds + time.perf_counter() - started})

    if run is not None and (not run.checkpoints or run.checkpoints[-1].step != step):
        save(epochs, 0, 0.0, 0.0, checkpoint=True)
    seconds = previous_seconds + time.perf_counter() - started
    if run is not None:
        run.finish(losses, data_losses, step, seconds)
    return TrainResult(
        losses=losses, steps=step, checkpoints=list(run.checkpoints) if run is not None else [],
        seconds=seconds, data_losses=data_losses, trainable=list(names), regularizer=regularizer,
        resumed_from_step=resumed_from,
    )


# -- evaluation -------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: Dataset | Mapping[str, Tensor], batch_size: int = 512) -> float:
    """Fraction of examples whose arg-max logit is the label.

    Args:
        model: maps inputs ``[B, ...]`` to logits ``[B, C]``.
        dataset: examples with inputs and labels (``{"tokens": [L], "label": []}``).
        batch_size: examples per forward pass.

    Returns:
        Accuracy in ``[0, 1]``.
    """
    _check_int("batch_size", batch_size, 1)
    data = to_device(collate_dataset(dataset), _model_device(model))
    n = _num_examples(data)
    correct = 0
    for start in range(0, n, batch_size):
        inputs, labels = split_inputs_labels(_rows(data, start, start + batch_size))
        correct += int((model(inputs).argmax(dim=-1) == labels).sum())
    return correct / n


@torch.no_grad()
def mean_loss(task: Task, model: nn.Module, dataset: Dataset | Mapping[str, Tensor], batch_size: int = 512) -> float:
    """Mean of ``task.train_loss`` over a dataset (no penalties).

    Args:
        task: gives ``train_loss(model, batch) -> [B]``.
        model: the model.
        dataset: the examples.
        batch_size: examples per forward pass.

    Returns:
        The mean per-example loss.
    """
    _check_int("batch_size", batch_size, 1)
    data = to_device(collate_dataset(dataset), _model_device(model))
    n = _num_examples(data)
    total = 0.0
    for start in range(0, n, batch_size):
        batch = _rows(data, start, start + batch_size)
        total += float(task.train_loss(model, batch).double().sum())
    return total / n

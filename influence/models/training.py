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

import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from influence.batches import collate_dataset, named_leaves, num_examples, rows, to_device
from influence.exceptions import CorruptedArtifactError, invalid
from influence.fingerprints import tensors_digest
from influence.gradients.layout import select_parameters
from influence.models.checkpoints import CheckpointInfo
from influence.models.training_run import TrainingRun
from influence.progress import progress
from influence.regularizers import Proximity, Regularizer
from influence.task import Task, describe_task
from influence.validation import check_int_at_least, check_positive_float


def check_schedule(epochs: Any, batch_size: Any, seed: Any, learning_rate: Any, optimizer: Any) -> None:
    """Refuse bad optimisation arguments of :func:`train` (and of the runs that repeat it), naming the first."""
    check_int_at_least("epochs", epochs, 0)
    check_int_at_least("batch_size", batch_size, 1)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise invalid("seed", seed, "an integer")
    check_positive_float("learning_rate", learning_rate)
    if optimizer not in ("adam", "sgd"):
        raise invalid("optimizer", optimizer, "'adam' or 'sgd'")


def check_proximity_shapes(proximity: Proximity, params: Mapping[str, Tensor]) -> None:
    """Refuse a proximity penalty whose reference names or shapes are not the model's parameters'."""
    for name, ref in proximity.reference.items():
        if name not in params or params[name].shape != ref.shape:
            shape = tuple(params[name].shape) if name in params else "absent"
            raise invalid(f"proximity.reference[{name!r}]", tuple(ref.shape), f"the model's shape {shape}")


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
    check_schedule(epochs, batch_size, seed, learning_rate, optimizer)
    if checkpoint_every is not None:
        check_int_at_least("checkpoint_every", checkpoint_every, 1)
        if checkpoint_dir is None:
            raise invalid("checkpoint_every", checkpoint_every, "None when checkpoint_dir is None")
    if num_threads is not None:
        check_int_at_least("num_threads", num_threads, 1)
    if exclude is not None:
        if isinstance(exclude, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in exclude):
            shown = exclude if isinstance(exclude, (str, bytes)) else list(exclude)[:5]
            raise invalid("exclude", shown, "a sequence of example indices (ints)")
        if len(set(exclude)) != len(exclude):
            raise invalid("exclude", sorted(exclude)[:10], "distinct example indices")
    with intra_op_threads(num_threads):
        started = time.perf_counter()
        model.to(device)
        names = select_parameters(model, "all" if trainable is None else trainable)
        params = dict(model.named_parameters())
        for name, param in params.items():
            param.requires_grad_(name in names)
        if proximity is not None:
            check_proximity_shapes(proximity, params)
            proximity = proximity.to(device)
        covered = names if l2_names is None else [n for n in select_parameters(model, l2_names) if n in names]
        regularizer = Regularizer(l2=l2, proximity=proximity, l2_names=tuple(covered))
        trained = {n: params[n] for n in names}
        data = collate_dataset(dataset)
        n_examples = num_examples(data)
        steps_per_epoch = math.ceil(n_examples / batch_size)
        excluded = sorted(int(i) for i in exclude) if exclude else []
        if excluded and (excluded[0] < 0 or excluded[-1] >= n_examples):
            raise invalid("exclude", [i for i in excluded if not 0 <= i < n_examples][:5], f"indices in [0, {n_examples})")
        kept = torch.ones(n_examples, dtype=torch.bool)
        kept[excluded] = False
        opt_class = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
        opt = opt_class(list(trained.values()), lr=float(learning_rate))
        emit = log or (lambda event: None)

        run: TrainingRun | None = None
        position: dict[str, Any] | None = None
        if checkpoint_dir is not None:
            arguments = json.loads(json.dumps({
                "epochs": epochs, "batch_size": batch_size, "learning_rate": float(learning_rate),
                "seed": seed, "optimizer": optimizer, "l2": float(l2), "trainable": names, "l2_names": covered,
                "checkpoint_every": checkpoint_every, "task": describe_task(task),
                "model": f"{type(model).__module__}.{type(model).__qualname__}",
                "initial_state_sha256": tensors_digest(sorted(model.state_dict().items())),
                "dataset": {"size": n_examples, "sha256": tensors_digest(
                    (n, t) for n, t in named_leaves(data, sort_keys=True) if isinstance(t, Tensor))},
                **({"exclude": {"count": len(excluded), "sha256": tensors_digest([("exclude", torch.tensor(excluded))])}}
                   if excluded else {}),
                "proximity": None if proximity is None else {
                    "alpha": proximity.alpha,
                    "reference_sha256": tensors_digest(sorted(proximity.reference.items())),
                },
            }))
            run = TrainingRun(Path(checkpoint_dir), arguments, overwrite)
            finished = run.completed(model)
            if finished is not None:
                losses, data_losses, steps, seconds = finished
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
        for epoch in progress(range(start_epoch, epochs), desc="training", unit="epoch"):
            order = _permutation(n_examples, seed, epoch).to(device)
            first = start_batch if epoch == start_epoch else 0
            loss_sum = epoch_sum if epoch == start_epoch else 0.0
            data_sum = epoch_data_sum if epoch == start_epoch else 0.0
            for b in progress(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False):
                order_rows = order[b * batch_size:(b + 1) * batch_size]
                if excluded:
                    order_rows = order_rows[kept[order_rows]]
                    if order_rows.numel() == 0:
                        continue
                batch = rows(data, order_rows)
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


@contextlib.contextmanager
def intra_op_threads(count: int | None):
    """Run the block with ``count`` torch intra-op threads (restored afterwards); ``None``: leave the setting."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count is not None:
            torch.set_num_threads(previous)

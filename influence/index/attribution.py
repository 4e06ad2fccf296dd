"""An attribution index: fit the inverse Hessian once, store every training example preconditioned, ask many times.

:meth:`AttributionIndex.fit` does the work that does not depend on the queries: it fits the
inverse-Hessian solver on the training objective, saves the solver's state (Arnoldi eigenpairs,
EK-FAC eigenbases and corrected eigenvalues, a Cholesky factor) beside a manifest of every argument,
and stores each training example's representation in checksummed shards
(:class:`~influence.index.store.RepresentationStore`):

- ``solver="arnoldi"``: ``k`` whitened eigen-coordinates per example, as in Schioppa et al. (2022),
  plus the damped complement when the solver keeps it (randomly projected with ``projection_dim``);
- ``"exact"``, ``"ekfac"``: the preconditioned gradient ``(H + damping I)^{-1} g`` (``P`` numbers,
  or ``projection_dim`` after a seeded random projection);
- ``None``: the raw gradient (or its projection), i.e. gradient similarity without a Hessian.

A query then costs its own gradient, its representation and one streamed pass over the shards:
:meth:`AttributionIndex.query` returns the top-``k`` proponents and opponents per query in memory
bounded by one shard, :meth:`AttributionIndex.scores` the full ``[m, n]`` matrix. Scores have the
orientation and scale of :func:`influence.attribute` with ``method="if"``:
``s * (1/n) * grad f(x)^T (H + damping I)^{-1} grad l(z)``, positive for proponents.

Every shard is written atomically and listed with its sha256 as soon as it is on disk, so a fit
killed part-way resumes at the first missing shard (with the saved solver state, not a refit).
Fitting again into the folder with other arguments, another model or other data raises
:class:`~influence.exceptions.CacheMismatchError` naming each differing field; ``overwrite=True``
replaces it. :meth:`AttributionIndex.load` reopens a complete index (optionally checking every
checksum); queries with a model other than the fitted one are refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from influence.batches import auto_batch_size, to_device
from influence.exceptions import CorruptedArtifactError, InvalidArgumentError, invalid
from influence.fingerprints import dataset_fingerprint, model_fingerprint
from influence.gradients.layout import ParameterLayout, select_parameters
from influence.gradients.objective import Objective
from influence.gradients.per_example import gradient_matrix, iter_gradients, measurement_sign
from influence.gradients.projection import RandomProjector
from influence.index.store import RepresentationStore, TopK
from influence.methods.common import build_solver
from influence.progress import progress
from influence.solvers import STATEFUL_SOLVERS  # the solvers whose state an index stores (keeps_state)
from influence.regularizers import RegularizerLike
from influence.solvers import InverseHessianSolver, make_solver
from influence.solvers.ekfac import EkfacSolver
from influence.task import Task, describe_task
from influence.validation import check_batch_size, check_positive_int

SOLVER_STATE = "solver.safetensors"
AUTO_PROJECTION_ABOVE = 16_384  # projection_dim="auto": rows keep a P-dimensional part whole up to this P
AUTO_PROJECTION_DIM = 4_096  # ... and project it to this many numbers above



EKFAC_ROWS = "eigenbasis"  # EK-FAC rows: vec(Q_S^T G Q_A) per block (EkfacSolver.representation)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dataset(data: Dataset | DataLoader) -> tuple[Dataset, Any]:
    return (data.dataset, data.collate_fn) if isinstance(data, DataLoader) else (data, None)


class AttributionIndex:
    """A fitted, saved attribution index (see the module docstring); build with :meth:`fit` or :meth:`load`.

    Attributes:
        store: the :class:`~influence.index.store.RepresentationStore` of the training rows.
        solver: the fitted (or restored) solver, ``None`` without preconditioning.
        projector: the random projection, or ``None``.
        names: the attributed parameter names.
    """

    def __init__(self, store: RepresentationStore, solver: InverseHessianSolver | None, projector: RandomProjector | None,
                 names: list[str]) -> None:
        self.store = store
        self.solver = solver
        self.projector = projector
        self.names = names

    @property
    def manifest(self) -> dict[str, Any]:
        return self.store.manifest

    @property
    def n_train(self) -> int:
        """``n``, the indexed training examples."""
        return self.store.n_rows

    @property
    def dim(self) -> int:
        """``D``, numbers stored per training example."""
        return self.store.dim

    # -- fitting ---------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        directory: str | os.PathLike[str],
        task: Task,
        model: nn.Module,
        train_data: Dataset | DataLoader,
        *,
        params: str | Sequence[str] = "all",
        solver: str | InverseHessianSolver | None = "arnoldi",
        damping: float = 1e-3,
        solver_options: Mapping[str, Any] | None = None,
        regularizer: RegularizerLike | None = None,
        hessian_data: Dataset | DataLoader | None = None,
        projection_dim: int | str | None = "auto",
        projection_seed: int = 0,
        projection_kind: str = "auto",
        shard_size: int = 8192,
        storage_dtype: torch.dtype = torch.float32,
        batch_size: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        overwrite: bool = False,
        shards: bool = True,
    ) -> "AttributionIndex":
        """Fit the solver and store every training example's representation (resuming an interrupted fit).

        Args:
            directory: the index's folder.
            task: gives the per-example training loss (and, at query time, the measurement).
            model: the trained model (not modified).
            train_data: the ``n`` training examples (map-style dataset or unshuffled loader).
            params: the attributed parameters (``"all"``, ``"last"``, ``"embedding"`` or names).
            solver: ``"arnoldi"``, ``"exact"``, ``"ekfac"``, an instance of one of them, or ``None``
                (no Hessian: gradient similarity). Conjugate gradient and LiSSA solve per right-hand
                side and keep no state, so they cannot precondition ``n`` examples once.
            damping: ``lambda`` of a named solver.
            solver_options: extra options of a named solver (``top_k``, ``n_iterations``, ...).
            regularizer: ``R(params) -> scalar`` that was part of the training objective.
            hessian_data: examples whose mean loss defines ``H`` (default: ``train_data``).
            projection_dim: randomly project the ``P``-dimensional part of each row (the
                preconditioned gradient; Arnoldi's complement) to this many numbers; ``None``: keep
                it whole; ``"auto"``: whole up to ``P = 16,384``, else 4,096 numbers (a relative error
                of about 2% on each product, Johnson-Lindenstrauss).
            projection_seed: seed of the projection.
            projection_kind: ``"auto"`` (Gaussian while ``R [P, projection_dim]`` fits 256 MiB, the sparse
                Johnson-Lindenstrauss transform above), ``"gaussian"``, ``"rademacher"`` or ``"sjlt"``
                (:class:`~influence.gradients.projection.RandomProjector`).
            shard_size: training examples per shard.
            storage_dtype: dtype of the stored rows (float64, float32, float16, bfloat16).
            batch_size: examples per gradient batch (``None``: :func:`~influence.batches.auto_batch_size`).
            device: device of the computation.
            dtype: floating dtype of the computation (default: the model's).
            overwrite: replace an index made with other arguments instead of refusing it.
            shards: compute the training rows here; ``False``: only fit the solver (its state saved) and return the
                incomplete index, whose :meth:`missing_shards` are computed elsewhere with
                :meth:`representation_shard` (on a Dask cluster, say), stored with ``store.put_shard``, and closed
                with :meth:`complete`.

        Returns:
            The complete index (with ``shards=False``: the fitted, incomplete one).
        """
        names = select_parameters(model, params)
        layout = ParameterLayout.of(model, names)
        p = layout.numel
        compute_dtype = dtype or dict(model.named_parameters())[names[0]].dtype
        batch = check_batch_size(batch_size) if batch_size is not None else auto_batch_size(p, compute_dtype.itemsize)
        if projection_dim == "auto":
            projection_dim = AUTO_PROJECTION_DIM if p > AUTO_PROJECTION_ABOVE else None
        check_positive_int("projection_dim", projection_dim, allow_none=True)
        check_positive_int("shard_size", shard_size)
        built = None
        if solver is not None:
            built = build_solver(solver, damping=damping, solver_options=solver_options)
            if not built.keeps_state:
                raise invalid("solver", built.name, f"one of {', '.join(map(repr, STATEFUL_SOLVERS))}, or None (a solver "
                              "without keeps_state, e.g. conjugate gradient or LiSSA, keeps no state that would "
                              "precondition every training example once)")
        projector = (RandomProjector(p, projection_dim, seed=int(projection_seed), kind=projection_kind)
                     if projection_dim else None)
        dataset, collate = _dataset(train_data)
        hessian_set = dataset if hessian_data is None else _dataset(hessian_data)[0]
        fields = {
            "task": describe_task(task),
            "names": list(names),
            "n_parameters": p,
            "offsets": {name: list(span) for name, span in layout.offsets().items()},
            "solver": dict(built.arguments) if built is not None else None,
            "projection": dict(projector.arguments) if projector is not None else None,
            "regularizer": None if regularizer is None else type(regularizer).__name__,
            "dtype": _dtype_name(compute_dtype),
            "storage_dtype": _dtype_name(storage_dtype),
            "device_type": torch.device(device).type,
            "model_fingerprint": model_fingerprint(model),
            "dataset_fingerprint": dataset_fingerprint(dataset),
            "hessian_fingerprint": None if hessian_data is None else dataset_fingerprint(hessian_set),
            "n_rows": len(dataset),
            "shard_size": int(shard_size),
            "batch_size": batch,
        }
        if built is not None and built.name == "ekfac":
            fields["rows"] = EKFAC_ROWS  # an index of an older layout (rows solved in the parameter basis) is refused
        store = RepresentationStore(directory)
        store.open(fields, overwrite=overwrite)
        if built is not None:
            if store.has(SOLVER_STATE):
                built.load_state(store.get_extra(SOLVER_STATE), store.manifest["solver_state"], device=device)
            else:
                objective = Objective(task, model, hessian_set if collate is None else DataLoader(hessian_set, collate_fn=collate),
                                      names, batch_size=batch, device=device, dtype=dtype, regularizer=regularizer)
                built.fit(objective)
                store.manifest["solver_state"] = built.state_info()
                store.put_extra(SOLVER_STATE, built.state_dict())
        index = cls(store, built, projector, list(names))
        if shards:
            for shard in progress(store.missing_shards(), desc="index shards", unit="shard"):
                store.put_shard(shard, index._shard_rows(task, model, train_data, shard, device=device, dtype=dtype))
            index.complete()
        return index

    def missing_shards(self) -> list[int]:
        """The shards of training rows not stored yet (all of them after :meth:`fit` with ``shards=False``)."""
        return self.store.missing_shards()

    def representation_shard(self, task: Task, model: nn.Module, train_data: Dataset | DataLoader, shard: int, *,
                             device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Tensor:
        """The rows ``[n_s, D]`` of shard ``shard`` of the training data (the examples of ``store.shard_rows(shard)``),
        in the index's batches: what :meth:`fit` stores there. Another process or machine can compute it from an
        index reopened with :meth:`load` ``(complete=False)`` and the same model and data; ``store.put_shard`` stores it.

        Args:
            task, model, train_data: those of the fit (the model is checked by its fingerprint).
            shard: the shard's number.
            device: device of the computation.
            dtype: floating dtype of the computation (default: the model's).
        """
        manifest = self.manifest
        if model_fingerprint(model) != manifest["model_fingerprint"]:
            raise InvalidArgumentError(f"the model differs from the one the attribution index at {self.store.directory} "
                                       "was fitted on; a shard's rows need the fitted model")
        if not 0 <= shard < manifest["n_shards"]:
            raise invalid("shard", shard, f"0 to {manifest['n_shards'] - 1}")
        return self._shard_rows(task, model, train_data, shard, device=device, dtype=dtype)

    def _shard_rows(self, task: Task, model: nn.Module, train_data: Dataset | DataLoader, shard: int, *,
                    device: torch.device | str, dtype: torch.dtype | None) -> Tensor:
        """:meth:`representation_shard` without its checks (``fit`` made the index from this very model)."""
        manifest = self.manifest
        dataset, collate = _dataset(train_data)
        batch = manifest["batch_size"]
        loader = DataLoader(Subset(dataset, self.store.shard_rows(shard)), batch_size=batch, shuffle=False,
                            **({"collate_fn": collate} if collate else {}))
        # EK-FAC over nn.Linear layers, freshly fitted in this process: rows straight from layer inputs and output gradients
        if isinstance(self.solver, EkfacSolver) and self.solver.rotates_gradients:
            objective = self.solver.objective
            blocks = [self.solver.rotated_gradients(to_device(b, objective.device, objective.dtype), "train_loss") for b in loader]
            blocks = blocks if self.projector is None else [self.projector.project(b) for b in blocks]
        else:
            blocks = [self.represent(g, "train") for g in iter_gradients(
                task, model, loader, self.names, kind="train_loss", batch_size=batch, device=device, dtype=dtype)]
        dtype_storage = getattr(torch, manifest["storage_dtype"])
        rows = torch.cat(blocks) if blocks else torch.zeros(0, self.row_dim())
        return rows.to(device="cpu", dtype=dtype_storage).contiguous()

    def complete(self) -> "AttributionIndex":
        """Mark the index complete once every shard is stored; the solver lets go of the model and data."""
        if self.solver is not None:
            self.solver.objective = None  # the index keeps the state, not the model and data
        if not self.store.manifest.get("complete"):
            self.store.finish()
        return self

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, device: torch.device | str = "cpu", verify: bool = False,
             complete: bool = True) -> "AttributionIndex":
        """Reopen a complete index.

        Args:
            directory: the index's folder.
            device: device of the queries' products.
            verify: check every shard's sha256 now (reads every byte once).
            complete: require a complete index; ``False``: also one whose solver is fitted but whose shards are not
                all stored (:meth:`fit` with ``shards=False``), to compute them (:meth:`representation_shard`).

        Returns:
            The index, ready for :meth:`query` (with ``complete=False``: for :meth:`representation_shard`).
        """
        store = RepresentationStore(directory)
        if complete:
            store.load()
        else:
            store.folder.manifest = store.folder.read_manifest()
            if store.manifest.get("solver") is not None and not store.has(SOLVER_STATE):
                raise CorruptedArtifactError(f"the attribution index at {directory} has no fitted solver yet: fit it first")
        manifest = store.manifest
        if verify:
            store.verify()
        solver = None
        if manifest["solver"] is not None and manifest["solver"].get("solver") == "ekfac" and manifest.get("rows") != EKFAC_ROWS:
            raise CorruptedArtifactError(
                f"the EK-FAC index at {directory} stores rows of an older layout (solved in the parameter basis); "
                "fit it again (AttributionIndex.fit(..., overwrite=True))")
        if manifest["solver"] is not None:
            arguments = dict(manifest["solver"])
            solver = make_solver(arguments.pop("solver"), **arguments)
            solver.load_state(store.get_extra(SOLVER_STATE), manifest["solver_state"], device=device)
        projection = manifest["projection"]
        projector = None
        if projection is not None:
            projector = RandomProjector(projection["input_dim"], projection["output_dim"], seed=projection["seed"],
                                        kind=projection["kind"], chunk_size=projection["chunk_size"],
                                        **({"nonzeros": projection["nonzeros"]} if "nonzeros" in projection else {}))
        return cls(store, solver, projector, list(manifest["names"]))

    # -- representations -----------------------------------------------------------------------

    def row_dim(self) -> int:
        """Width of the rows this index's solver and projection produce."""
        if self.solver is not None:
            return self.solver.representation_dim(self.projector)
        return int(self.manifest["n_parameters"]) if self.projector is None else self.projector.output_dim

    def represent(self, gradients: Tensor, side: str) -> Tensor:
        """Rows ``[b, D]`` of gradients ``[b, P]`` for the ``"query"`` or ``"train"`` side."""
        if self.solver is not None:
            return self.solver.representation(gradients, side, self.projector)
        if gradients.dim() != 2 or gradients.shape[1] != self.manifest["n_parameters"]:
            raise invalid("gradients", tuple(gradients.shape), f"[b, P] with P = {self.manifest['n_parameters']}")
        return gradients if self.projector is None else self.projector.project(gradients)

    def query_rows(self, task: Task, model: nn.Module, query_data: Dataset | DataLoader, *,
                   batch_size: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        """The queries' rows ``[m, D]``: measurement gradients of ``model`` (the fitted one), represented."""
        if model_fingerprint(model) != self.manifest["model_fingerprint"]:
            raise InvalidArgumentError(
                f"the model differs from the one the attribution index at {self.store.directory} was fitted on "
                "(its parameters or buffers changed); fit a new index for this model"
            )
        if describe_task(task)["class"] != self.manifest["task"]["class"]:
            raise invalid("task", describe_task(task)["class"], f"a {self.manifest['task']['class']} (the fitted task)")
        batch = self.manifest["batch_size"] if batch_size is None else check_batch_size(batch_size)
        dtype = getattr(torch, self.manifest["dtype"])
        gradients = gradient_matrix(task, model, query_data, self.names, kind="measurement", batch_size=batch,
                                    device=device, dtype=dtype)
        if gradients.shape[0] == 0:
            return gradients.new_zeros(0, self.dim)
        return self.represent(gradients, "query")

    def _scale(self, task: Task) -> float:
        return measurement_sign(task) / self.n_train

    # -- asking ----------------------------------------------------------------------------------

    def query(self, task: Task, model: nn.Module, query_data: Dataset | DataLoader, k: int = 10, *,
              batch_size: int | None = None, device: torch.device | str = "cpu") -> TopK:
        """Each query's ``k`` strongest proponents and opponents among the indexed training examples.

        Args:
            task: the task (its measurement is differentiated at the queries).
            model: the model the index was fitted on.
            query_data: the ``m`` queries.
            k: how many proponents and how many opponents per query.
            batch_size: examples per query-gradient batch (default: the fit's).
            device: device of the computation.

        Returns:
            :class:`~influence.index.store.TopK` of ``[m, min(k, n)]`` indices and scores; scores as
            :func:`influence.attribute` (``method="if"``) gives them.
        """
        rows = self.query_rows(task, model, query_data, batch_size=batch_size, device=device)
        return self.store.top_k(rows, k, scale=self._scale(task))

    def scores(self, task: Task, model: nn.Module, query_data: Dataset | DataLoader, *,
               batch_size: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        """The full ``[m, n]`` score matrix (for the evidence stages), streamed from the shards."""
        rows = self.query_rows(task, model, query_data, batch_size=batch_size, device=device)
        return self.store.scores(rows, scale=self._scale(task))

    def _vector_rows(self, vectors: Tensor, names: Sequence[str] | None) -> Tensor:
        offsets = {name: tuple(span) for name, span in self.manifest["offsets"].items()}
        names = list(self.names if names is None else names)
        unknown = [n for n in names if n not in offsets]
        if unknown:
            raise invalid("names", unknown, f"names among the indexed parameters {self.names}")
        width = sum(b - a for a, b in (offsets[n] for n in names))
        if not isinstance(vectors, Tensor) or vectors.dim() != 2 or vectors.shape[1] != width:
            shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
            raise invalid("vectors", shape, f"a tensor [m, {width}] (the entries of {names})")
        full = vectors.new_zeros(vectors.shape[0], int(self.manifest["n_parameters"]))
        start = 0
        for name in names:
            a, b = offsets[name]
            full[:, a:b] = vectors[:, start:start + b - a]
            start += b - a
        return self.represent(full.to(getattr(torch, self.manifest["dtype"])), "query")

    def top_k_vectors(self, vectors: Tensor, k: int = 10, *, names: Sequence[str] | None = None,
                      scale: float | None = None) -> TopK:
        """Top-``k`` of query-side vectors given directly (e.g. multi-stage sensitivities) instead of queries.

        Args:
            vectors: ``[m, P_sub]``, already oriented, over the parameters ``names`` (in that order;
                the other indexed parameters count as zero).
            k: how many proponents and opponents.
            names: a subset of the indexed parameter names (default: all of them, ``P_sub = P``).
            scale: factor of the scores (default ``1/n``).

        Returns:
            :class:`~influence.index.store.TopK` of ``scale * v (H + damping I)^{-1} g^T``.
        """
        rows = self._vector_rows(vectors, names)
        return self.store.top_k(rows, k, scale=1 / self.n_train if scale is None else scale)

    def score_vectors(self, vectors: Tensor, *, names: Sequence[str] | None = None, scale: float | None = None) -> Tensor:
        """The full ``[m, n]`` matrix of :meth:`top_k_vectors`."""
        return self.store.scores(self._vector_rows(vectors, names), scale=1 / self.n_train if scale is None else scale)


__all__ = ["SOLVER_STATE", "STATEFUL_SOLVERS", "AttributionIndex", "TopK"]

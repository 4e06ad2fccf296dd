"""Command line: run the pipeline, run one stage (what ``dvc.yaml`` calls), or check settings.

    python -m flows.cli run [--params params.yaml] [--set section.field=value ...]
    python -m flows.cli stage NAME [--params params.yaml]
    python -m flows.cli check [--params params.yaml]

Heavy imports (torch, Prefect, MLflow) happen only inside the command that needs them, so
``--help`` and ``check`` answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

QUIET_ENV = {
    "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "GIT_PYTHON_REFRESH": "quiet",
}
STAGE_NAMES = (
    "data", "features", "pretrain", "finetune", "gradients", "influence", "multistage", "tracin_we", "tracin_last",
    "grad_cos", "deletion", "pretrain_deletion", "lds", "mislabel", "report",
)


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
    from flows.settings import SettingsError, load_settings, validate_settings

    settings = load_settings(args.params)
    if getattr(args, "set", None):
        raw = _apply_overrides(settings.model_dump(mode="json"), args.set)
        settings = validate_settings(raw, source=f"{args.params} with --set")
    return settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(prog="influence-pipeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline as a Prefect flow")
    stage = sub.add_parser("stage", help="run one stage (the dvc.yaml entry point)")
    stage.add_argument("name", choices=STAGE_NAMES)
    check = sub.add_parser("check", help="validate params.yaml and exit")
    for p in (run, stage, check):
        p.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override one setting")
    args = parser.parse_args(argv)

    from flows.settings import SettingsError

    try:
        settings, _ = _settings(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = Path(args.params).resolve().parent
    if args.command == "check":
        print(f"{args.params}: valid (digest {settings.digest()})")
        return 0
    if args.command == "stage":
        from flows import report, stages
        from flows.workspace import Workspace

        ws = Workspace(root)
        result = report.build_report(settings, ws) if args.name == "report" else getattr(stages, args.name)(settings, ws)
        print(f"stage {args.name}: {result.seconds:.1f} s, metrics {result.metrics}")
        return 0
    from flows.pipeline import pipeline

    outcome = pipeline(settings=settings, project_dir=str(root))
    print(f"MLflow run {outcome['mlflow_run_id']}; report {outcome['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

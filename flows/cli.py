"""The `alignflow` command.

    alignflow run CONFIG [dotted.key=value ...]       run the whole flow, print the stage table
    alignflow validate CONFIG [dotted.key=value ...]  check a config without running anything
    alignflow compare [--experiment NAME] [RUN_ID ...] differing config values and key metrics of runs
    alignflow report RUN_ID [--out DIR]               rebuild a run's report from MLflow
    alignflow stage NAME --from-run RUN_ID [CONFIG] [dotted.key=value ...]
                                                      rerun one stage on an earlier run's outputs
    alignflow deploy --pool NAME [CONFIG] [dotted.key=value ...] [--cron EXPR | --interval SECONDS]
                                                      Prefect deployments (infra/deployments.yaml)
    alignflow serve [CONFIG] [dotted.key=value ...] [--cron EXPR | --interval SECONDS]
                                                      serve them from this machine, schedules included

The tracking store is $MLFLOW_TRACKING_URI, else ./mlflow.db; `--tracking-uri` overrides both.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _table(results: dict) -> str:
    """The model table: accuracy beside what degenerate preference tuning shows (EOS rate, length in tokens,
    repetition rate), each preference-trained model's change against SFT in brackets."""
    lines = [f"{'model':<11} {'accuracy':>9} {'95% CI':>15} {'pass@k':>7} {'mean reward':>12} {'EOS rate':>16} "
             f"{'tokens':>15} {'repetition':>16}"]
    nan = float("nan")
    for stage, m in results["metrics"].items():
        passes = [v for k, v in m.items() if k.startswith("pass_at_") and "." not in k]
        ci = f"[{m.get('accuracy_ci95_low', nan):.3f}, {m.get('accuracy_ci95_high', nan):.3f}]"
        change = lambda key, fmt: f" ({m[key]:{fmt}})" if key in m else ""  # noqa: E731
        eos = f"{m['eos_rate']:.3f}{change('eos_rate_change_vs_sft', '+.3f')}"
        tokens = f"{m.get('mean_tokens', nan):.1f}" + (f" ({m['length_ratio_vs_sft']:.2f}x)"
                                                        if "length_ratio_vs_sft" in m else "")
        rep = f"{m.get('repetition_rate', nan):.3f}{change('repetition_rate_change_vs_sft', '+.3f')}"
        lines.append(f"{stage:<11} {m.get('accuracy', nan):>9.3f} {ci:>15} {passes[0] if passes else nan:>7.3f} "
                     f"{m.get('mean_reward', nan):>12.3f} {eos:>16} {tokens:>15} {rep:>16}")
    lines.append("(in brackets: the change against the SFT model)")
    if results.get("promotion"):
        lines.append(_promotion(results["promotion"]))
    return "\n".join(lines)


def _promotion(decision: dict) -> str:
    line = f"promotion: {decision['decision']} ({decision['model']} v{decision['challenger_version']})"
    return "\n".join([line, *(f"  refused: {reason}" for reason in decision.get("reasons", []))])


def _examples(examples: list[dict]) -> str:
    """The report's side-by-side prompts, one line each: random ones, then one where SFT and DPO differ."""
    if not examples:
        return ""
    models = list(examples[0]["answers"])
    cut = lambda text, n: text if len(text) <= n else text[: n - 1] + "…"  # noqa: E731
    lines = ["", f"{'prompt':<46} {'reference':<10} " + " ".join(f"{m:<14}" for m in models)]
    for e in examples:
        if e.get("label", "random") != "random":
            lines.append(f"-- {e['label']}:")
        lines.append(f"{cut(repr(e['prompt']), 46):<46} {cut(e['reference'], 10):<10} "
                     + " ".join(f"{cut(repr(e['answers'][m]), 14):<14}" for m in models))
    return "\n".join(lines) + "\n"


def _summary(results: dict) -> str:
    from alignflow.tracking import tracking_uri, ui_page

    uri = tracking_uri()
    answers = _examples(results.get("examples") or [])
    page = ui_page(results["experiment_id"], results["parent_run_id"])
    ui = f"mlflow ui --backend-store-uri {uri}   then http://127.0.0.1:5000{page}" if uri.startswith("sqlite:") \
        else f"{uri.rstrip('/')}{page}"
    return (f"\n{_table(results)}\n{answers}\n\nreport: {results.get('report')}\n"
            f"MLflow parent run: {results['parent_run_id']}\nOpen it: {ui}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "validate"):
        p = sub.add_parser(name)
        p.add_argument("config")
        p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. sft.trainer.learning_rate=1e-4")
    p = sub.add_parser("compare", help="config differences and key metrics of flow runs")
    p.add_argument("run_ids", nargs="*", help="parent run ids (default: the experiment's latest runs)")
    p.add_argument("--experiment", default=None, help="experiment name (default alignflow-default)")
    p.add_argument("--last", type=int, default=10, help="how many of the experiment's latest runs")
    p = sub.add_parser("report", help="rebuild a flow run's report from its MLflow records")
    p.add_argument("run_id")
    p.add_argument("--out", default=None, help="directory (default outputs/<run_id>/report)")
    p = sub.add_parser("stage", help="rerun one stage, its inputs from an earlier flow run's outputs")
    p.add_argument("name", help="the stage to rerun (tasks.stages; an unknown name lists them)")
    p.add_argument("--from-run", required=True, help="MLflow run id of the flow run (or of one of its stages)")
    p.add_argument("rest", nargs="*", metavar="[CONFIG] [dotted.key=value ...]",
                   help="a config file (default: the source run's recorded config), then overrides")
    p = sub.add_parser("label", help="send human labels to a flow run paused for them (rank.ranker: human)")
    label = p.add_subparsers(dest="action", required=True)
    q = label.add_parser("import", help="check a labels file, then resume the paused run with it")
    q.add_argument("flow_run_id", help="the Prefect flow run id (in the run's logs and its labels-wanted artifact)")
    q.add_argument("file", help="the exported to_label.csv with its rank column filled in, or JSONL "
                                "{prompt_id, ranks: {candidate_id: rank}} rows")
    q.add_argument("--done", action="store_true", help="finish with what is labelled; the rest is dropped")
    q = label.add_parser("show", help="what a paused run waits for: files, progress, the last rejected batch")
    q.add_argument("flow_run_id")
    for name in ("deploy", "serve"):
        p = sub.add_parser(name, help="create Prefect deployments for a work pool" if name == "deploy"
                           else "serve the deployments from this process until stopped")
        if name == "deploy":
            p.add_argument("--pool", required=True, help="Prefect work pool (e.g. of type process)")
            p.add_argument("--job-variable", action="append", default=[], metavar="KEY=VALUE",
                           help="a job variable of the pool's template (YAML value), e.g. gpu_count=8; repeatable")
            p.add_argument("--source", default=None, help="where the code lives on the worker, if not this checkout "
                                                          "(/opt/alignflow in infra/docker's images)")
        p.add_argument("rest", nargs="*", metavar="[CONFIG] [dotted.key=value ...]",
                       help="the scheduled run's config (default: infra/deployments.yaml's) and overrides")
        when = p.add_mutually_exclusive_group()
        when.add_argument("--cron", help="cron schedule of the whole flow, e.g. '0 3 * * *'")
        when.add_argument("--interval", type=float, help="schedule every N seconds instead")
        p.add_argument("--file", default=None, help="deployments file (default infra/deployments.yaml)")
    # `stage NAME --from-run ID CONFIG k=v`: argparse gives positionals after an option back as extras
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("stage", "deploy", "serve"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("stage", "deploy", "serve"):
        args.rest = [*args.rest, *extra]
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri

    if args.command in ("compare", "report"):
        return _records_command(args)
    if args.command == "stage":
        return _stage_command(args)
    if args.command in ("deploy", "serve"):
        return _deploy_command(args)
    if args.command == "label":
        return _label_command(args)

    from alignflow.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"alignflow: {err}", file=sys.stderr)
        return 2
    from alignflow.data.records import DataError

    if args.command == "validate":  # what `run` checks before any model loads, nothing written
        from alignflow.models.loading import pick_device
        from tasks.load_data import preflight

        try:
            preflight(config, pick_device(config.device))
        except (DataError, ConfigError) as err:
            print(f"alignflow: bad input: {err}", file=sys.stderr)
            return 2
        print(f"{args.config}: valid (config hash {config.digest()})")
        return 0

    from flows.pipeline import align
    from tasks.select_base import NoUsableCandidate

    try:
        results = align(config)
    except (DataError, ConfigError) as err:
        print(f"alignflow: bad input: {err}", file=sys.stderr)
        return 2
    except NoUsableCandidate as err:  # the run is FAILED; its last words are the selection table
        print(f"alignflow: base selection failed: {err}", file=sys.stderr)
        return 1
    print(_summary(results))
    return 0


def _config_and_overrides(rest: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [dotted.key=value ...]`: a first word without `=` names a config file."""
    config = rest[0] if rest and "=" not in rest[0] else None
    return config, rest[1:] if config else rest


def _stage_command(args) -> int:
    from mlflow.exceptions import MlflowException

    from alignflow.config import ConfigError
    from alignflow.data.records import DataError
    from alignflow.refs import DigestMismatch
    from flows.stage import align_stage
    from tasks import stages

    if args.name not in stages.rerunnable():
        print(f"alignflow stage: unknown stage {args.name!r}; stages: {', '.join(stages.rerunnable())}",
              file=sys.stderr)
        return 2
    config, overrides = _config_and_overrides(args.rest)
    try:
        result = align_stage(args.name, args.from_run, config, overrides)
    except (ConfigError, DataError, LookupError, DigestMismatch, MlflowException) as err:
        print(f"alignflow stage {args.name}: {err}", file=sys.stderr)
        return 2
    if "metrics" in result:
        print(_table(result))
    elif "decision" in result:
        print(_promotion(result))
    else:
        print(f"{args.name}: {result['output']['uri']} ({result['output']['digest'][:19]})")
    print(f"MLflow parent run: {result['parent_run_id']} (rerun of {args.from_run})")
    return 0


def _label_command(args) -> int:
    from prefect.exceptions import FlowPauseTimeout, NotPausedError

    from alignflow.rankers.human import LabelError
    from tasks.host import read_status, send_labels

    try:
        if args.action == "show":
            status = read_status(args.flow_run_id)
            waiting = len(status["expected"]) - len(status["labelled"])
            print(f"candidates: {status['candidates_jsonl']}\n            {status.get('candidates_csv', '')}\n"
                  f"labels so far: {status['partial_labels']}\n"
                  f"labelled: {len(status['labelled'])} of {len(status['expected'])} prompts ({waiting} waiting)"
                  + ("\nfinished" if status.get("finished") else "")
                  + (f"\nlast batch rejected: {status['rejected']}" if status.get("rejected") else ""))
            return 0
        sent = send_labels(args.flow_run_id, args.file, args.done)
    except (LabelError, LookupError, NotPausedError, FlowPauseTimeout, RuntimeError) as err:
        print(f"alignflow label {args.action}: {err}", file=sys.stderr)
        return 2
    print(f"sent labels for {sent} prompts to flow run {args.flow_run_id}"
          + (" (done: unlabelled prompts are dropped)" if args.done else "")
          + f"; `alignflow label show {args.flow_run_id}` shows whether they were accepted")
    return 0


def _deploy_command(args) -> int:
    from pydantic import ValidationError

    from alignflow.config import ConfigError
    from flows import deploy

    config, overrides = _config_and_overrides(args.rest)
    if config and os.path.exists(config):  # a file named from here; otherwise relative to the repository
        config = os.path.abspath(config)
        if getattr(args, "source", None) and Path(config).is_relative_to(deploy.ROOT):
            config = str(Path(config).relative_to(deploy.ROOT))  # the same file in the worker's copy
    try:
        spec = deploy.declared(args.file or deploy.DECLARED, config, overrides, args.cron, args.interval)
    except (ConfigError, ValidationError, OSError) as err:
        print(f"alignflow {args.command}: {err}", file=sys.stderr)
        return 2
    if args.command == "serve":
        try:
            url = deploy.require_scheduler()
        except deploy.NoScheduler as err:
            print(f"alignflow serve: {err}", file=sys.stderr)
            return 2
        print(f"serving on the Prefect server at {url}: its scheduler creates the scheduled runs", flush=True)
        deploy.serve(spec)
        return 0
    try:
        job_variables = deploy.job_variables(args.job_variable)
    except ValueError as err:
        print(f"alignflow deploy: {err}", file=sys.stderr)
        return 2
    ids = deploy.deploy(spec, args.pool, job_variables, args.source)
    names = [f"align/{spec.pipeline.name}"] + [f"align-stage/{spec.stages.prefix}{s}" for s in spec.stages.names]
    for name, deployment_id in zip(names, ids):
        print(f"{name}  {deployment_id}")
    print(f"start a worker: prefect worker start --pool {args.pool}")
    return 0


def _records_command(args) -> int:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from alignflow.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    try:
        if args.command == "compare":
            from flows.compare import compare_table, find_runs, format_table

            print(format_table(compare_table(find_runs(client, args.run_ids, args.experiment, args.last))))
        else:
            from tasks.reporting import build_report

            print(build_report(args.run_id, args.out or os.path.join("outputs", args.run_id, "report"), client))
    except (LookupError, MlflowException) as err:
        print(f"alignflow {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

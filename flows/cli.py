"""The `alignflow` command.

    alignflow run CONFIG [dotted.key=value ...]     run the whole flow, print the stage table
    alignflow validate CONFIG [dotted.key=value ...] check a config without running anything
"""

from __future__ import annotations

import argparse
import sys


def _table(results: dict) -> str:
    lines = [f"{'stage':<8} {'accuracy':>9} {'mean reward':>12} {'eos rate':>9}"]
    for stage, m in results["metrics"].items():
        lines.append(f"{stage:<8} {m['accuracy']:>9.3f} {m['mean_reward']:>12.3f} {m['eos_rate']:>9.3f}")
    return "\n".join(lines)


def _report(results: dict) -> str:
    from alignflow.tracking import tracking_uri

    uri = tracking_uri()
    answers = "\n".join(f"  {stage:<5} -> {answer!r}" for stage, answer in results["demo_answers"].items())
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"
    return (f"\n{_table(results)}\n\nprompt: {results['demo_prompt']!r}\n{answers}\n\n"
            f"MLflow parent run: {results['parent_run_id']}\n"
            f"Open it: {ui}   then http://127.0.0.1:5000/#/experiments/{results['experiment_id']}"
            f"/runs/{results['parent_run_id']}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "validate"):
        p = sub.add_parser(name)
        p.add_argument("config")
        p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. sft.trainer.learning_rate=1e-4")
    args = parser.parse_args(argv)

    from alignflow.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"alignflow: {err}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"{args.config}: valid (config hash {config.digest()})")
        return 0

    from alignflow.data import DataError
    from flows.pipeline import align

    try:
        results = align(config)
    except (DataError, ConfigError) as err:
        print(f"alignflow: bad input: {err}", file=sys.stderr)
        return 2
    print(_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

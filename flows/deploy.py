"""Prefect deployments: the whole flow on a schedule, and one deployment per stage for manual reruns.

    alignflow deploy --pool NAME [CONFIG] [dotted.key=value ...] [--cron "0 3 * * *" | --interval S]
    prefect worker start --pool NAME           # runs them (process work pool)
    alignflow serve [CONFIG] [dotted.key=value ...] [--cron ... | --interval S]   # one machine, no pool

What gets deployed is declared in infra/deployments.yaml; the flags override it. Deployments run
`flows/pipeline.py:align` (parameters: `config`, a YAML path relative to the repository root or the
whole config as a form, and `overrides`) and `flows/stage.py:align_stage` (`stage` fixed per
deployment, `from_run` given at run time):

    prefect deployment run align/pipeline --params '{"overrides": ["dpo.trainer.beta=0.2"]}'
    prefect deployment run align-stage/stage-dpo --params '{"from_run": "<MLflow run id>"}'
(JSON: `--param from_run=123e4567...` would be read as a number)
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

ROOT = Path(__file__).resolve().parents[1]
DECLARED = ROOT / "infra" / "deployments.yaml"


class PipelineDeployment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "pipeline"
    config: str = "configs/default.yaml"
    overrides: list[str] = []
    cron: str | None = None
    interval: float | None = Field(default=None, gt=0)  # seconds
    timezone: str = "UTC"
    concurrency_limit: int | None = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _one_schedule(self) -> PipelineDeployment:
        if self.cron and self.interval:
            raise ValueError("give either cron or interval, not both")
        return self

    def schedules(self) -> list:
        from prefect.schedules import Cron, Interval

        if self.cron:
            return [Cron(self.cron, timezone=self.timezone)]
        return [Interval(timedelta(seconds=self.interval))] if self.interval else []


class StageDeployments(BaseModel):
    """One deployment per rerunnable stage (tasks.stages); `names` narrows them to a few."""

    model_config = ConfigDict(extra="forbid")
    prefix: str = "stage-"
    names: list[str] | None = None  # None: every stage that can be rerun alone

    @model_validator(mode="after")
    def _known(self) -> StageDeployments:
        from tasks import stages

        known = stages.rerunnable()
        unknown = [n for n in self.names or [] if n not in known]
        if unknown:
            raise ValueError(f"stages.names: unknown or not rerunnable {unknown}; choose from {known}")
        if self.names is None:
            self.names = known
        return self


class Deployments(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pipeline: PipelineDeployment = PipelineDeployment()
    stages: StageDeployments = StageDeployments()


def declared(path: str | Path = DECLARED, config: str | None = None, overrides: list[str] | None = None,
             cron: str | None = None, interval: float | None = None) -> Deployments:
    """infra/deployments.yaml with the command line's values on top; the config is validated now."""
    from alignflow.config import load_config

    spec = Deployments.model_validate(yaml.safe_load(Path(path).read_text()) or {})
    update: dict = {}
    if config:
        update["config"] = config
    if overrides:
        update["overrides"] = list(overrides)
    if cron or interval:
        update |= {"cron": cron, "interval": interval}
    spec.pipeline = PipelineDeployment.model_validate(spec.pipeline.model_dump() | update)
    config_path = Path(spec.pipeline.config)
    load_config(config_path if config_path.is_absolute() else ROOT / config_path, spec.pipeline.overrides)
    return spec


def _pipeline_kwargs(spec: Deployments) -> dict:
    p = spec.pipeline
    return dict(name=p.name, schedules=p.schedules(), concurrency_limit=p.concurrency_limit, tags=["alignflow"],
                parameters={"config": p.config, "overrides": p.overrides},
                description="The whole alignment flow: base selection, SFT, sampling, ranking, DPO, evaluation.")


def _stage_kwargs(spec: Deployments, stage: str) -> dict:
    from tasks import stages

    what = stages.get(stage).describe
    return dict(name=f"{spec.stages.prefix}{stage}", parameters={"stage": stage}, tags=["alignflow", "stage"],
                description=f"Rerun `{stage}` alone{f' ({what})' if what else ''}; from_run = the MLflow run id of "
                            "the flow run to take inputs from.")


def job_variables(pairs: list[str]) -> dict:
    """`KEY=VALUE` strings -> job variables, values read as YAML (8 -> int, {a: b} -> mapping)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--job-variable {pair!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def deploy(spec: Deployments, pool: str, job_variables: dict | None = None, source: str | None = None) -> list[str]:
    """Create/update the deployments on the Prefect server for a work pool; returns their ids.

    `job_variables` fill the pool's base job template (e.g. `gpu_count`, `image` of infra/k8s/); `source` is
    where the code lives on the worker when it is not this checkout (`/opt/alignflow` in infra/docker's
    images): the flows load from here, and runs start in `source`."""
    from prefect import deploy as prefect_deploy
    from prefect.runner.storage import LocalStorage

    from flows.pipeline import align
    from flows.stage import align_stage

    common = dict(work_pool_name=pool, job_variables=job_variables or {})
    source_flow = lambda flow, entry: flow.from_source(source=str(ROOT), entrypoint=entry)  # noqa: E731
    deployments = [source_flow(align, "flows/pipeline.py:align").to_deployment(**common, **_pipeline_kwargs(spec))]
    for stage in spec.stages.names:
        deployments.append(source_flow(align_stage, "flows/stage.py:align_stage").to_deployment(
            **common, **_stage_kwargs(spec, stage)))
    if source is not None:
        for deployment in deployments:
            deployment.storage = LocalStorage(path=source)  # the pull step: set the working directory there
    ids = prefect_deploy(*deployments, work_pool_name=pool, build=False, push=False, print_next_steps_message=False)
    return [str(i) for i in ids]


class NoScheduler(RuntimeError):
    """`serve` was asked to run schedules where nothing would fire them."""


SERVER_HELP = ("start one in another terminal, `prefect server start` (its scheduler creates the scheduled runs), "
               "then `export PREFECT_API_URL=http://127.0.0.1:4200/api` and run this again")


def require_scheduler() -> str:
    """The Prefect API URL of a running server, or NoScheduler naming what to start. Without PREFECT_API_URL,
    Prefect serves from a temporary in-process server that runs no scheduler: `serve` would say it is
    polling for scheduled runs, and none would ever be created."""
    import urllib.error
    import urllib.request

    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise NoScheduler("no Prefect server is configured (PREFECT_API_URL is unset), and Prefect's temporary "
                          f"server runs no scheduler: scheduled runs would never start; {SERVER_HELP}")
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10)
    except urllib.error.HTTPError as err:
        if err.code >= 500:
            raise NoScheduler(f"the Prefect server at {url} answers {err.code}; {SERVER_HELP}") from None
    except OSError as err:
        raise NoScheduler(f"no Prefect server answers at PREFECT_API_URL={url} ({err}); {SERVER_HELP}") from None
    return url


def serve(spec: Deployments) -> None:
    """Serve the deployments from this process (schedules included) until interrupted."""
    import os

    from prefect import serve as prefect_serve

    from flows.pipeline import align
    from flows.stage import align_stage

    os.chdir(ROOT)  # relative config paths name files in the repository, as for work-pool runs
    prefect_serve(align.to_deployment(**_pipeline_kwargs(spec)),
                  *(align_stage.to_deployment(**_stage_kwargs(spec, s)) for s in spec.stages.names))

"""Rerun one stage by hand, its inputs taken from an earlier flow run's recorded outputs.

    alignflow stage dpo --from-run RUN_ID                          # the source run's config
    alignflow stage dpo --from-run RUN_ID dpo.trainer.beta=0.2     # ... with overrides
    alignflow stage evaluate --from-run RUN_ID configs/my.yaml     # another config file

Every stage tags its MLflow child run with its output references (`alignflow.output`: URI, sha256
digest, run id). This flow reads them through MlflowClient, by the inputs the stage declares
(tasks.stages: the same declaration the whole flow wires from), checks each input's digest before
any model loads, and records the rerun as a new parent run tagged `alignflow.rerun_of` (the source)
and `alignflow.rerun_stage`, with the stage's child run beneath it. The source runs are only read
(MLflow params are write-once: nothing is ever logged into a finished run). A rerun of a rerun
finds inputs it did not produce in the run it came from, so `stage dpo` then `stage evaluate
--from-run <that run>` evaluates the new DPO model beside the original base and SFT models.
"""

from __future__ import annotations

import json
from typing import Literal

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from alignflow.config import ConfigError, PipelineConfig, load_config, validate_config
from alignflow.refs import ArtifactRef, parse_ref
from alignflow.tracking import flatten, parent_run, tracking_uri
from flows.pipeline import run_context, run_stage
from tasks import stages

StageName = Literal[tuple(stages.rerunnable())]  # a Prefect form choice per stage


class SourceRun:
    """A flow run's recorded stage outputs, following `alignflow.rerun_of` for what it did not make.
    As a mapping (output name -> reference) it is what a stage's declared inputs are read from."""

    def __init__(self, run_id: str, client: MlflowClient):
        self.client = client
        run = client.get_run(run_id)
        parent_id = run.data.tags.get("mlflow.parentRunId")  # a stage run's id names its flow run
        self.run: Run = client.get_run(parent_id) if parent_id else run
        self.chain: list[Run] = [self.run]
        while (source := self.chain[-1].data.tags.get("alignflow.rerun_of")) and len(self.chain) < 50:
            self.chain.append(client.get_run(source))

    def finished(self, stage_run_name: str, has_tag: str | None = None) -> Run | None:
        """The newest finished stage run of that name in the chain (with the tag, if one is named)."""
        for run in self.chain:
            children = self.client.search_runs(
                [run.info.experiment_id],
                f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.run_name = '{stage_run_name}' "
                "and attributes.status = 'FINISHED'", max_results=1)
            if children and (has_tag is None or has_tag in children[0].data.tags):
                return children[0]
        return None

    def outputs(self, stage_run_name: str) -> dict | None:
        child = self.finished(stage_run_name, "alignflow.output")
        return json.loads(child.data.tags["alignflow.output"]) if child else None

    def results(self, stage: str, artifact: str) -> dict:
        """A stage's results (its `results_artifact`, e.g. the evaluation's eval_results.json, of the stage's
        run or of the run a cache hit reused): what promotion decides on."""
        import mlflow

        child = self.finished(stage)
        if child is None:
            raise LookupError(f"flow run {self.run.info.run_id} has no finished `{stage}` stage")
        source = child.data.tags.get("alignflow.cache_source_run") or child.info.run_id
        return mlflow.artifacts.load_dict(f"runs:/{source}/{artifact}")

    def ref(self, stage_run_name: str, key: str | None = None) -> ArtifactRef:
        out = self.outputs(stage_run_name)
        if out is None or (key is not None and out.get(key) is None):
            raise LookupError(f"flow run {self.run.info.run_id} has no finished `{stage_run_name}` stage "
                              f"with a recorded output{f' {key!r}' if key else ''}")
        return parse_ref(out[key] if key else out)

    def __contains__(self, source: str) -> bool:
        return True  # every output name is looked up in the records (a missing one raises LookupError)

    def __getitem__(self, source: str):
        if source == stages.MODELS:  # base and SFT always; each other evaluated model where recorded
            labels = stages.evaluated()
            return {label: self.ref(name) for label, name in labels.items()
                    if label in ("base", "sft") or self.outputs(name) is not None}
        stage, _, key = source.partition(".")
        if not key and stage in stages.stages() and stages.get(stage).results_artifact:  # results, not a reference
            return self.results(stage, stages.get(stage).results_artifact)
        return self.ref(stage, key or None)

    def config(self) -> dict:
        import mlflow

        for run in self.chain:
            try:
                return mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/config.json")
            except Exception:  # noqa: BLE001 - older runs have no config.json; try the next source
                continue
        raise LookupError(f"flow run {self.run.info.run_id} has no recorded config.json: pass a CONFIG file")


def stage_config(source: SourceRun, config: str | None, overrides: list[str]) -> PipelineConfig:
    if config:
        return load_config(config, overrides)
    return validate_config(source.config(), source=f"config of run {source.run.info.run_id}", overrides=overrides)


def check_inputs(inputs: dict) -> None:
    """Every input reference resolves to content with its recorded digest (raises DigestMismatch)."""
    for value in inputs.values():
        for ref in value.values() if isinstance(value, dict) else [value]:
            if isinstance(ref, ArtifactRef):
                ref.resolve()


@flow(name="align-stage")
def align_stage(stage: StageName, from_run: str, config: str | None = None, overrides: list[str] | None = None
                ) -> dict:
    """One stage of the alignment flow, its inputs from flow run `from_run` (an MLflow run id)."""
    import mlflow

    if stage not in stages.rerunnable():
        raise LookupError(f"`{stage}` cannot be rerun alone; stages: {', '.join(stages.rerunnable())}")
    mlflow.set_tracking_uri(tracking_uri())
    source = SourceRun(from_run, MlflowClient())
    try:
        cfg = stage_config(source, config, list(overrides or []))
    except ConfigError as err:
        raise ConfigError(f"alignflow stage {stage}: {err}") from None
    inputs = stages.get(stage).arguments(cfg, source)
    check_inputs(inputs)  # digests checked before any model loads
    tags = {"alignflow.rerun_of": source.run.info.run_id, "alignflow.rerun_stage": stage}
    with parent_run(cfg.experiment, flow_run.name or f"stage-{stage}", cfg.digest(), flatten(cfg),
                    config=cfg.model_dump(mode="json"), tags=tags) as parent:
        ctx = run_context(cfg, parent).model_copy(update={"tags": tags})
        get_run_logger().info("rerunning %s from flow run %s", stage, source.run.info.run_id)
        output = run_stage(stage, cfg, ctx, {}, **inputs)
        result = {"parent_run_id": parent.run_id, "experiment_id": parent.experiment_id, "stage": stage}
        if isinstance(output, ArtifactRef):
            result["output"] = output.model_dump(mode="json")
        else:
            result |= output
            result["report"] = run_stage("report", cfg, ctx, {})
    return result

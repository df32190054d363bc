"""Cross-run stage caching and stable stage directories.

A stage is not run again when its task, its config section and other arguments, the content digests
of its inputs, the seed, the device and the code are all unchanged: Prefect serves the recorded
output (persisted results under `<output_dir>/cache`) and the flow records the hit in the stage's
MLflow child run, with the run the output came from.

Prefect does the caching; alignflow only computes the key (`stage_key`) and hands it to the task as
its `cache_key` argument, which the `RecordedKey` policy returns as is. Prefect's default policy
includes the flow run id (so it never hits across runs), and its INPUTS policy would hash run ids,
MLflow URIs and local paths that differ between runs with the same content; hence this key:

- references (models, datasets) count by content digest, never by where they live;
- the run context counts by seed and device only;
- the code version is a digest of alignflow's own source (`alignflow/`, `tasks/`) and the versions of
  the libraries that train and generate: coarse on purpose, a change anywhere re-runs;
- a component (ranker, pair strategy, engine) counts by its config and its `cache_pins()` (a reward
  model's weights), and a stage by its declared `pins` (the base candidates' content): a stage or
  component says what it depends on where it is written, not here;
- a model given by name whose content alignflow cannot pin (a hub id without a commit revision)
  makes the stage uncacheable: it runs, and nothing is stored. A key that cannot be computed is
  never replaced by a partial one (compare Prefect issue #15861, a composite policy that cached
  when one part failed): `stage_key` raises, and the flow runs the stage uncached.

The same key names the stage's working directory (`<output_dir>/stages/<name>-<key>`), so a
stage that died is rerun in the same place and resumes from its last complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from alignflow.pins import Uncacheable, code_version, fingerprint
from tasks import stages
from tasks.stages import Stage


def stage_key(stage: Stage | str, inputs: dict[str, Any]) -> str:
    """The cache key of one stage call: its name, the code, its arguments' fingerprints (components
    with their cache pins) and the stage's own pins. Raises Uncacheable when its content cannot be
    pinned or the stage is never cached."""
    stage = stages.get(stage) if isinstance(stage, str) else stage
    if not stage.cache:
        raise Uncacheable(f"stage {stage.name} is never cached")
    inputs = {k: v for k, v in inputs.items() if k != "cache_key"}
    extra = stage.pins(inputs) if stage.pins else {}
    payload = {"task": stage.name, "code": code_version(), "inputs": fingerprint(inputs), "extra": extra}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class RecordedKey(CachePolicy):
    """Prefect cache policy: the key is the task's own `cache_key` argument (None: not cached)."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        return inputs.get("cache_key")


def stage_dir(ctx, name: str, cache_key: str | None) -> Path:
    """Where a stage writes: `<output_dir>/stages/<name>-<key>` when keyed (stable across runs, so a
    rerun resumes there), else `<output_dir>/<parent run id>/<name>`."""
    if cache_key and ctx.stage_root:
        return Path(ctx.stage_root) / f"{name}-{cache_key[:16]}"
    return Path(ctx.output_dir) / name

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

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

from alignflow.components import Component
from alignflow.refs import ArtifactRef, digest_path

if TYPE_CHECKING:
    from alignflow.stages import Stage

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("alignflow", "tasks")
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "tokenizers")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


class Uncacheable(ValueError):
    """This stage's output cannot be keyed by content; it runs uncached."""


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    h = hashlib.sha256()
    for package in CODE_DIRS:
        for file in sorted((ROOT / package).rglob("*.py")):
            h.update(str(file.relative_to(ROOT)).encode())
            h.update(file.read_bytes())
    for lib in LIBRARIES:
        try:
            h.update(f"{lib}=={version(lib)}".encode())
        except PackageNotFoundError:
            h.update(f"{lib} absent".encode())
    return h.hexdigest()[:16]


def model_source(name: str | None, revision: str | None = None) -> str | None:
    """What a model given by name contains: `embedded:` models are built from the config and the
    code (both in the key already), a packaged GGUF model and a local directory or file by its digest,
    a hub id only at a pinned commit."""
    from alignflow import gguf

    if name is not None and (packaged := gguf.packaged_source(name)) is not None:
        return "sha256:" + gguf.file_digest(packaged)  # the installed file's content
    if name is None or name.startswith("embedded:"):
        return name
    if Path(name).exists():
        return digest_path(name)
    if revision and COMMIT.match(revision):
        return f"{name}@{revision}"
    raise Uncacheable(f"model {name!r} is a hub id without a pinned commit revision: its content may change")


def fingerprint(value: Any) -> Any:
    """A JSON-able summary of a stage argument that changes exactly when its content does."""
    from alignflow.tracking import RunContext

    if isinstance(value, ArtifactRef):
        return {"kind": value.kind, "digest": value.digest, "chat_template": value.chat_template,
                "trust_remote_code": getattr(value, "trust_remote_code", False)}
    if isinstance(value, Component):  # its config, and what its results depend on beyond it
        return {value.type: fingerprint(value.model_dump(mode="json")), "pins": value.cache_pins()}
    if isinstance(value, RunContext):
        return {"seed": value.seed, "device": value.device}
    if isinstance(value, BaseModel):  # field by field, so components inside keep their pins
        return {type(value).__name__: {name: fingerprint(getattr(value, name)) for name in type(value).model_fields}}
    if isinstance(value, dict):
        return {str(k): fingerprint(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [fingerprint(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise Uncacheable(f"cannot fingerprint an argument of type {type(value).__name__}")


def stage_key(stage: Stage | str, inputs: dict[str, Any]) -> str:
    """The cache key of one stage call: its name, the code, its arguments' fingerprints (components
    with their cache pins) and the stage's own pins. Raises Uncacheable when its content cannot be
    pinned or the stage is never cached."""
    from alignflow import stages

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

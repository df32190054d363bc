"""What a result depends on, by content: the pins that stage cache keys are made of (tasks.caching).

- references (models, datasets) count by content digest, never by where they live;
- the run context counts by seed and device only;
- the code version is a digest of alignflow's own source (`alignflow/`, `tasks/`) and the versions of
  the libraries that train and generate: coarse on purpose, a change anywhere re-runs;
- a component (ranker, pair strategy, engine) counts by its config and its `cache_pins()` (a reward
  model's weights): a component says what it depends on where it is written, not here;
- a model given by name whose content alignflow cannot pin (a hub id without a commit revision)
  raises Uncacheable: a key that cannot be computed is never replaced by a partial one.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from alignflow.components import Component
from alignflow.refs import ArtifactRef, digest_path

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
    from alignflow.models import gguf

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

"""The stage contract and the one stage registry.

Each stage declares itself in its own module (under `tasks/`) with `register(Stage(...))`:

    register(Stage(
        name="rank", task=rank,                       # the Prefect task; its .fn runs outside a flow
        config={"cfg": "rank"},                        # argument -> dotted config path
        inputs={"candidates": "sample"},               # argument -> upstream output ("stage" or "stage.key")
    ))

and everything that needs to know which stages exist reads this registry: the flow's `run_stage`
(config and inputs wired from the declaration), the cache key (plus the stage's `pins`, and the
`cache_pins` of every component in its arguments), `alignflow stage NAME --from-run` (the same
inputs, read from an earlier run's records), the Prefect deployments, `compare` and the report.

An input names an upstream stage's output: `sft` (its reference), `load_data.eval` (one key of a
stage's dict output), `rank|load_data.preference` (the first of these that exists: ranked pairs, or
else the user's own), or `models`: every model the evaluation compares, by the label each stage
declares in `evaluated_as` (base for select_base, sft, dpo, and each baseline).

Stages are found by importing every module of the packages in STAGE_PACKAGES, and of any module
named by a `alignflow.stages` entry point (a stage shipped in another package).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignflow.config import ConfigError

STAGE_PACKAGES = ("tasks",)
MODELS = "models"  # the input that collects every evaluated model


@dataclass(frozen=True)
class Stage:
    name: str
    task: Any
    config: dict[str, str] = field(default_factory=dict)  # argument -> dotted path in PipelineConfig ("" = all)
    inputs: dict[str, str] = field(default_factory=dict)  # argument -> upstream output
    optional: tuple[str, ...] = ()  # arguments whose upstream output may be absent (then None)
    fixed: dict[str, Any] = field(default_factory=dict)  # constant arguments (a variant of a shared task)
    pins: Callable[[dict], dict] | None = None  # what else the cache key must hold, from the arguments
    cache: bool = True  # False: never cached (human labels, registry state, reading the inputs)
    rerun: bool = True  # offered by `alignflow stage NAME` and its deployments
    evaluated_as: str | None = None  # the label the evaluation gives this stage's model
    trains: bool = False  # a training stage (its curves go in the report)
    baseline_of: str | None = None  # a preference baseline trained beside this stage, on its pairs
    after: tuple[str, ...] = ()  # stages that must come first beyond those its inputs name
    enabled: Callable[[Any], bool] | None = None  # whether a config runs it (None: always)
    # builds what `run` would build from the config (TRL's SFTConfig/DPOConfig) so a bad value fails
    # before any model loads, in `alignflow validate` as in `alignflow run`: check(config, device, out_dir)
    check: Callable[[Any, str, Any], None] | None = None
    # a stage whose output is results, not a reference: an earlier run's output is this artifact of its run
    # (`alignflow stage promote --from-run` reads the evaluation's eval_results.json)
    results_artifact: str | None = None
    describe: str = ""

    def runs(self, config) -> bool:
        """Whether this config runs the stage (its own declaration: the flow body asks, it does not decide)."""
        return self.enabled is None or self.enabled(config)

    def upstream(self, registry: Mapping[str, Stage]) -> set[str]:
        names = set(self.after)
        for source in self.inputs.values():
            if source == MODELS:
                names |= {s.name for s in registry.values() if s.evaluated_as}
            else:
                names |= {alternative.partition(".")[0] for alternative in source.split("|")}
        return names - {self.name}

    def arguments(self, config, outputs: Mapping[str, Any], **given) -> dict[str, Any]:
        """The task's keyword arguments: config sections, then inputs from `outputs` (a mapping from
        output name to value: the flow's outputs so far, or an earlier run's records), then `given`."""
        kwargs = {arg: config_value(config, path) for arg, path in self.config.items()}
        for arg, source in self.inputs.items():
            if arg not in given:
                try:
                    kwargs[arg] = output_value(outputs, source)
                except LookupError:
                    if arg not in self.optional:
                        raise
                    kwargs[arg] = None
        return kwargs | self.fixed | given


def config_value(config, path: str):
    value = config
    for part in filter(None, path.split(".")):
        value = getattr(value, part)
    return value


def output_value(outputs: Mapping[str, Any], source: str):
    """The output `source` names; of `a|b`, the first that exists."""
    if "|" in source:
        for alternative in source.split("|"):
            try:
                return output_value(outputs, alternative)
            except LookupError:
                continue
        raise LookupError(f"none of the outputs {source.split('|')} upstream")
    if source in outputs:
        return outputs[source]
    stage, _, key = source.partition(".")
    if key and stage in outputs:
        return outputs[stage][key]
    raise LookupError(f"no output {source!r} upstream")


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    if stage.name in _REGISTRY and _REGISTRY[stage.name].task is not stage.task:
        raise ValueError(f"stage {stage.name!r} is already registered")
    _REGISTRY[stage.name] = stage
    stages.cache_clear()
    return stage


@functools.lru_cache(maxsize=1)
def _discover() -> None:
    from importlib.metadata import entry_points

    for package_name in STAGE_PACKAGES:
        package = importlib.import_module(package_name)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package_name}.{module.name}")
    for entry in entry_points(group="alignflow.stages"):
        importlib.import_module(entry.value.partition(":")[0])


@functools.lru_cache(maxsize=1)
def stages() -> dict[str, Stage]:
    """Every registered stage, upstream before downstream (ties by name)."""
    _discover()
    registry, ordered, placed = dict(_REGISTRY), {}, set()
    waiting = {name: stage.upstream(registry) for name, stage in registry.items()}
    for name, needs in waiting.items():
        missing = needs - set(registry)
        if missing:
            raise ValueError(f"stage {name!r} takes input from unknown stage(s) {sorted(missing)}")
    while waiting:
        ready = sorted(n for n, needs in waiting.items() if needs <= placed)
        if not ready:
            raise ValueError(f"stages {sorted(waiting)} depend on each other in a cycle")
        for name in ready:
            ordered[name] = registry[name]
            placed.add(name)
            del waiting[name]
    return ordered


def get(name: str) -> Stage:
    registry = stages()
    if name not in registry:
        raise LookupError(f"unknown stage {name!r}; stages: {', '.join(registry)}")
    return registry[name]


def rerunnable() -> list[str]:
    """The stages `alignflow stage NAME --from-run` reruns alone (and that get a deployment each)."""
    return [name for name, s in stages().items() if s.rerun]


def evaluated() -> dict[str, str]:
    """{label: stage name} of the models the evaluation compares, in stage order."""
    return {s.evaluated_as: name for name, s in stages().items() if s.evaluated_as}


def baselines(of: str) -> list[str]:
    return [name for name, s in stages().items() if s.baseline_of == of]


def active(config) -> list[Stage]:
    """The stages a config runs, in order."""
    return [s for s in stages().values() if s.runs(config)]


# --- rounds of iterative preference tuning: named here, read back by the report -----------------------------

ROUND = re.compile(r"^(.+)_r(\d+)$")


def round_label(variant: str, round_: int, rounds: int) -> str:
    """The evaluation's label of a round's model: the variant's own name for the last round, `<variant>_r<i>`
    for earlier ones (dpo_r1)."""
    return variant if round_ == rounds else f"{variant}_r{round_}"


def parse_round_label(label: str) -> tuple[str, int] | None:
    """(variant, round) of an earlier round's label (`dpo_r1` -> ("dpo", 1)); None for a final model's."""
    match = ROUND.match(label)
    return (match[1], int(match[2])) if match else None


def stage_name(stage: str, variant: str, round_: int, rounds: int) -> str:
    """MLflow child-run names: `dpo`, `rft`; with rounds `dpo.round2`, `sample.rft.round2`."""
    if stage == variant:
        return stage if rounds == 1 else f"{stage}.round{round_}"
    return f"{stage}.round{round_}" if variant == "dpo" else f"{stage}.{variant}.round{round_}"


def check_config(config, device: str) -> None:
    """The baselines `dpo.baselines` names, then every active stage's own check (TRL configs built as `run`
    builds them); raises ConfigError naming the key or the stage. Loads no model."""
    known = baselines("dpo")
    unknown = [name for name in config.dpo.baselines if name not in known]
    if unknown:
        raise ConfigError(f"dpo.baselines: unknown baseline(s) {unknown}; choose from {known}")
    with tempfile.TemporaryDirectory() as tmp:
        for stage in active(config):
            if stage.check is None:
                continue
            try:
                stage.check(config, device, Path(tmp) / stage.name)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"stage {stage.name}: {err}") from None

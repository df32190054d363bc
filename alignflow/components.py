"""Components chosen by config: rankers, pair strategies, generation engines.

A component is a pydantic model (its own config schema, unknown keys rejected) registered under a
name in one of the registries below. A config names it by that name, alone or with its own keys:

    rank:
      ranker: verifier                                      # a name
      ranker: {type: reward_model, model: org/rm, batch_size: 16}   # a name and its keys
      ranker: {type: mypkg.judges:MyJudge, threshold: 0.3}  # module:Class, imported on use

A third-party component is one module: a subclass of the catalog's base class, decorated with
`@RANKERS.register("name")` (found by name once its module is imported) or named by `module:Class`
in the config (imported then). Nothing in alignflow's core is edited to add one.

What a component's output depends on beyond its config (a reward model's weights, a judge's model
id; human labels: nothing stable) it says in `cache_pins()`, which every stage's cache key that
carries the component includes (alignflow.pins.fingerprint).

The small name -> class catalog is hand-written: torchtune's `_component_` + instantiate is the
model, but it would bring torchtune (and its pinned torch) for one function.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError


class Component(BaseModel):
    """A component's config; subclasses add their own fields and behaviour."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    type: str

    def cache_pins(self) -> dict[str, Any]:
        """What else this component's results depend on, by content (raise caching.Uncacheable if
        nothing stable pins it: its stage then always runs)."""
        return {}


class Catalog:
    """name -> Component subclass, for one kind of component. The ones that ship with alignflow are the
    modules of one package (alignflow.rankers, alignflow.engines), all imported on first lookup: a new
    built-in is a new file there, with no list to edit."""

    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package
        self._loaded = False
        self.entries: dict[str, type[Component]] = {}

    def register(self, name: str):
        def decorate(cls: type[Component]) -> type[Component]:
            if name in self.entries and self.entries[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self.entries[name].__module__}")
            self.entries[name] = cls
            return cls
        return decorate

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self.entries)

    def _load_builtins(self) -> None:
        if self._loaded:  # every module of the package was imported (and registered its components) once
            return
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")
        self._loaded = True

    def lookup(self, name: str) -> type[Component]:
        self._load_builtins()
        if name in self.entries:
            return self.entries[name]
        if ":" in name:  # module:Class, imported now
            module, _, attr = name.partition(":")
            try:
                cls = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"cannot import {self.kind} {name!r}: {err}") from None
            if not (isinstance(cls, type) and issubclass(cls, Component)):
                raise ValueError(f"{name!r} is not an alignflow {self.kind} (a Component subclass)")
            return cls
        raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())} "
                         "(or name one as module:Class)")

    def validate(self, value: Any) -> Component:
        """A config value (a name, or a mapping with `type` and the component's keys) as the component."""
        if isinstance(value, Component):
            return value
        if isinstance(value, str):
            value = {"type": value}
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise ValueError(f"expected a {self.kind} name or a mapping with a `type` key, got {value!r}")
        cls = self.lookup(value["type"])
        try:
            return cls.model_validate(value)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
            raise ValueError(f"{self.kind} {value['type']!r}: {problems}") from None


class Ranker(Component):
    """Scores candidate responses: higher is better. `open` loads what scoring needs."""

    needs_reference: ClassVar[bool] = False  # the prompts must carry a reference answer
    needs_constraints: ClassVar[bool] = False  # the prompts must carry verifiable constraints (IFEval's ids)
    pointwise: ClassVar[bool] = True  # its scorer scores one answer alone (False: only by comparing answers)

    def open(self, device: str, fetch=None) -> "Scorer":
        """The scorer; `fetch(name, revision)` makes a hub id a local directory (with retries)."""
        raise NotImplementedError


class Scorer:
    """Scores responses. A pointwise scorer (verifier, reward model) scores each response alone; a
    pairwise one (an LLM judge) only by comparing two answers to one prompt, so it implements
    `score_groups` and `compare` and leaves `score` unimplemented."""

    pointwise: ClassVar[bool] = True

    def score(self, prompts: list[list[dict]], responses: list[str], references: list[str | None]) -> list[float]:
        raise NotImplementedError

    def score_groups(self, prompts: list[list[dict]], candidates: list[list[str]],
                     references: list[str | None]) -> list[list[float]]:
        """Per prompt, one score per candidate (higher is better); comparable within a prompt only."""
        flat = [(p, c, r) for p, cands, r in zip(prompts, candidates, references) for c in cands]
        scores = self.score(*map(list, zip(*flat)))
        grouped, start = [], 0
        for cands in candidates:
            grouped.append(scores[start:start + len(cands)])
            start += len(cands)
        return grouped

    def compare(self, prompts: list[list[dict]], first: list[str], second: list[str],
                references: list[str | None]) -> list[float]:
        """Per prompt, 1.0 when `first` is the better answer, 0.0 when `second` is, 0.5 for a tie."""
        from alignflow.stats import outcomes_from_scores

        return outcomes_from_scores(self.score(prompts, first, references), self.score(prompts, second, references))

    def keep_files_in(self, folder) -> None:
        """Where the scorer may keep files that must outlive the process (the rank stage's directory):
        the human ranker's exports and partial labels. Most scorers keep none."""

    def stats(self) -> dict[str, float]:
        """What the scorer measured about itself so far (a judge's consistency rate), for the stage's run."""
        return {}

    def close(self) -> None:
        """Free what `open` loaded."""


class PairStrategy(Component):
    """Which two candidates of a prompt make its preference pair, given their scores."""

    def pick(self, scores: list[float], min_margin: float, rng) -> tuple[int, int]:
        """(chosen, rejected) indices; a pair whose margin is at most min_margin is dropped as a tie."""
        raise NotImplementedError


class Engine(Component):
    """A generation engine: `open` gives a Generator for one model (alignflow.engines)."""

    def open(self, model_path: str, device: str, tokenizer=None, trust_remote_code: bool = False):
        raise NotImplementedError


RANKERS = Catalog("ranker", "alignflow.rankers")
PAIRS = Catalog("pair strategy", "alignflow.rankers")
ENGINES = Catalog("generation engine", "alignflow.engines")

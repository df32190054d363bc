"""The constraint base class and the registry of types (alignflow.constraints.types fills it)."""

from __future__ import annotations

import random
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

REGISTRY: dict[str, type[Constraint]] = {}
UNSUPPORTED = {"language:response_language": "needs a language detector, which alignflow does not ship"}


class Constraint(BaseModel):
    """One constraint type: its kwargs are the fields (IFEval's names), unknown ones refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: ClassVar[str]
    ifeval: ClassVar[bool] = True  # one of IFEval's instruction ids (False: alignflow's own addition)

    def check(self, response: str, prompt: str = "") -> bool:
        raise NotImplementedError

    def describe(self, rng: random.Random) -> str:
        raise NotImplementedError

    def rewrite(self, text: str, rng: random.Random) -> str | None:
        """`text` changed to meet this constraint, or None when no rewrite is written for the type."""
        return None

    @classmethod
    def draw(cls, rng: random.Random, text: str | None = None) -> Constraint:
        """Kwargs drawn at random (for `text`, a plain answer that a rewrite will start from, when given)."""
        return cls()

    def spec(self) -> dict[str, Any]:
        return {"id": self.id, "kwargs": self.model_dump()}


def register(cls: type[Constraint]) -> type[Constraint]:
    REGISTRY[cls.id] = cls
    return cls


class ConstraintError(ValueError):
    """A constraint that cannot be built: `field` is `instruction_id_list` or `kwargs`."""

    def __init__(self, field: str, problem: str):
        super().__init__(problem)
        self.field = field

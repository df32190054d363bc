"""What a component may ask of the orchestrator that runs it, without importing it.

The core imports no Prefect. A component that needs the orchestrator's services (the human ranker
pauses the flow run and reads the labels sent to it; a served endpoint's key may sit in a secret
store; the tracking code tags runs with the orchestrator's run ids) asks `current()`, the Host the
stage layer installed (tasks.host.PrefectHost, installed when `tasks` is imported). Outside a flow
the default Host has no run, no tags and no secrets, and says so when asked to pause.

The host is installed once per process rather than passed to every component's `open()`, so a
third-party component's signature stays what it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel


class Host:
    """The services of no orchestrator: what a stage function called directly (a test, a notebook) gets."""

    def run_id(self) -> str | None:
        """The orchestrator's id of the flow run this process works for (None outside one)."""
        return None

    def run_tags(self) -> dict[str, str]:
        """Tags that link a tracking run to the orchestrator's run (its id, name, deployment)."""
        return {}

    def wait_for_input(self, form: type[BaseModel], description: str, timeout_s: float, poll_s: float) -> BaseModel:
        """Pause the run until someone sends `form` (shown with `description`); TimeoutError after timeout_s."""
        raise RuntimeError("waiting for input needs a flow run: run it in `alignflow run`")

    def set_status(self, status: dict[str, Any]) -> None:
        """What the paused run waits for, where a client (`alignflow label show`) can read it."""

    def publish(self, key: str, description: str, markdown: str | None = None,
                table: Sequence[dict] | None = None) -> None:
        """Show a note or a table to the people watching the run (the orchestrator's UI)."""

    def secret(self, name: str) -> str:
        """The value of the named secret in the orchestrator's store."""
        raise LookupError(f"secret {name!r}: no orchestrator's secret store here; give the key through the "
                          "environment instead (api_key_env)")


_current: Host = Host()


def current() -> Host:
    return _current


def install(host: Host) -> None:
    global _current
    _current = host

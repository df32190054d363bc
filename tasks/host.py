"""Prefect's services for the core's components (alignflow.host): the flow run's ids and tags, the pause that
waits for human labels and the flow run inputs that say what it waits for, artifacts in the Prefect UI,
Secret blocks. Installed when `tasks` is imported; `read_status` and `send_labels` are the other side,
for `alignflow label show|import`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, create_model

from alignflow.host import Host

STATUS_KEY = "alignflow-labelling"  # the flow run input where the rank stage says what it waits for


class PrefectHost(Host):
    def run_id(self) -> str | None:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        return str(context.flow_run.id) if context is not None else None

    def run_tags(self) -> dict[str, str]:
        from prefect.runtime import deployment, flow_run

        tags = {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name,
                "prefect.deployment_id": deployment.id}
        return {k: str(v) for k, v in tags.items() if v}

    def wait_for_input(self, form: type[BaseModel], description: str, timeout_s: float, poll_s: float) -> BaseModel:
        """Prefect's `pause_flow_run(wait_for_input=...)`: the process waits, polling the API; the UI renders
        `form` (as a RunInput) with `description` on the Resume form."""
        from prefect.exceptions import FlowPauseTimeout
        from prefect.flow_runs import pause_flow_run
        from prefect.input import RunInput

        if self.run_id() is None:
            return super().wait_for_input(form, description, timeout_s, poll_s)
        fields = {name: (field.annotation, field) for name, field in form.model_fields.items()}
        run_input = create_model(form.__name__, __base__=RunInput, __doc__=form.__doc__, **fields)
        try:
            return pause_flow_run(wait_for_input=run_input.with_initial_data(description=description),
                                  timeout=max(1, int(timeout_s)), poll_interval=poll_s)
        except FlowPauseTimeout:
            raise TimeoutError(f"no input within {timeout_s:.0f} s") from None

    def set_status(self, status: dict[str, Any]) -> None:
        """A flow run input (read by `alignflow label`). Prefect's flow run inputs cannot be updated in
        place, so each status is a new key `<STATUS_KEY>-<n>`, written before the earlier ones are deleted:
        a reader always finds one (read_status takes the latest)."""
        from uuid import UUID

        from prefect.input import create_flow_run_input, delete_flow_run_input, filter_flow_run_input

        run = UUID(self.run_id())
        earlier = filter_flow_run_input(f"{STATUS_KEY}-", limit=1000, flow_run_id=run)
        number = max((int(item.key.rsplit("-", 1)[1]) for item in earlier), default=0) + 1
        create_flow_run_input(f"{STATUS_KEY}-{number:06d}", status, flow_run_id=run)
        for item in earlier:
            delete_flow_run_input(item.key, flow_run_id=run)

    def publish(self, key: str, description: str, markdown: str | None = None,
                table: Sequence[dict] | None = None) -> None:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        if table is not None:
            create_table_artifact(list(table), key=key, description=description)
        if markdown is not None:
            create_markdown_artifact(key=key, description=description, markdown=markdown)

    def secret(self, name: str) -> str:
        from prefect.blocks.system import Secret

        return Secret.load(name).get()


def read_status(flow_run_id: str) -> dict:
    """What a paused rank stage waits for (its latest status input)."""
    from uuid import UUID

    from prefect.input import filter_flow_run_input

    try:
        run = UUID(flow_run_id)
    except ValueError:
        raise LookupError(f"{flow_run_id!r} is not a Prefect flow run id") from None
    found = filter_flow_run_input(f"{STATUS_KEY}-", limit=1000, flow_run_id=run)
    if not found:
        raise LookupError(f"flow run {flow_run_id} is not waiting for labels (no {STATUS_KEY} input)")
    return max(found, key=lambda item: item.key).decoded_value


def send_labels(flow_run_id: str, path: str, done: bool = False) -> int:
    """`alignflow label import`: check a labels file against what the paused run waits for (nothing is
    sent when a row is bad), then resume the run with it. Returns the number of prompts sent."""
    from uuid import UUID

    from prefect.flow_runs import resume_flow_run

    from alignflow.rankers.human import read_label_file

    status = read_status(flow_run_id)
    if status.get("finished"):
        raise LookupError(f"flow run {flow_run_id} has all its labels already")
    labels = read_label_file(path, status["expected"])
    resume_flow_run(UUID(flow_run_id), run_input={"labels": [{"prompt_id": p, "ranks": r} for p, r in labels.items()],
                                            "done": done})
    return len(labels)

"""Human pairwise labels through Label Studio (`rank.ranker: {type: human, label_studio: {url: ...}}`).

The rank stage creates a Label Studio project with its `<Pairwise>` template, one task per pair of a
prompt's distinct candidates (left and right in a seeded random order, so no answer is always shown
first), and waits, polling the project, until every task has an annotation (or the human ranker's
timeout). Each prompt's candidates are then ranked by the pairs they won (alignflow.rankers.tournament.win_rates),
as the LLM judge ranks them. The client is `label-studio-sdk` (`pip install 'alignflow[labelstudio]'`);
the server runs from its own environment, since Label Studio pins Django and more:

    bash infra/label-studio.sh    # a venv of its own (once per machine, ~/.cache/alignflow/), then the server
                                  # on 127.0.0.1:8080

The API key comes from an environment variable (default LABEL_STUDIO_API_KEY) and is never logged.
"""

from __future__ import annotations

import os
import random
import time

from pydantic import BaseModel, ConfigDict, Field

PAIRWISE = """<View>
  <Header value="Which answer is better?"/>
  <Text name="prompt" value="$prompt"/>
  <Pairwise name="choice" toName="left,right" selectionStyle="background-color: #b8e6b8"/>
  <Text name="left" value="$left"/>
  <Text name="right" value="$right"/>
</View>"""


class LabelStudioSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str  # e.g. http://127.0.0.1:8080
    api_key_env: str = "LABEL_STUDIO_API_KEY"  # the environment variable holding the key
    max_pairs: int | None = Field(default=None, gt=0)  # pairs per prompt to label (None: every pair)


def client(cfg: LabelStudioSection):
    from label_studio_sdk import LabelStudio

    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise RuntimeError(f"rank.ranker.label_studio: set the Label Studio API key in ${cfg.api_key_env}")
    return LabelStudio(base_url=cfg.url, api_key=key)


def pair_tasks(rows: list[dict], max_pairs: int | None, seed: int) -> list[dict]:
    """One task per pair of a prompt's distinct candidates (rows: the human ranker's export rows)."""
    from alignflow.rankers.tournament import candidate_pairs

    rng, tasks = random.Random(seed), []
    for k, row in enumerate(rows):
        texts = [c["text"] for c in row["candidates"]]
        for i, j in candidate_pairs(texts, max_pairs, rng):
            left, right = (i, j) if rng.random() < 0.5 else (j, i)
            tasks.append({"prompt_id": row["prompt_id"], "prompt": row["prompt"], "left_id": f"c{left}",
                          "right_id": f"c{right}", "left": texts[left], "right": texts[right], "k": k})
    return tasks


def create_project(cfg: LabelStudioSection, title: str, tasks: list[dict]) -> int:
    ls = client(cfg)
    project = ls.projects.create(title=title, label_config=PAIRWISE)
    ls.projects.import_tasks(id=project.id, request=tasks)
    return project.id


def pairwise_results(cfg: LabelStudioSection, project: int) -> dict[tuple[str, str, str], float]:
    """{(prompt_id, left_id, right_id): 1.0 when left was chosen, 0.0 when right} for every annotated task
    (the latest annotation that is not cancelled)."""
    found = {}
    for task in client(cfg).tasks.list(project=project, fields="all"):
        for annotation in reversed(task.annotations or []):
            choice = next((r for r in annotation.get("result", []) if r.get("type") == "pairwise"), None)
            if annotation.get("was_cancelled") or choice is None:
                continue
            data = task.data
            found[(data["prompt_id"], data["left_id"], data["right_id"])] = \
                1.0 if choice["value"]["selected"] == "left" else 0.0
            break
    return found


def wait_for_pairs(cfg: LabelStudioSection, rows: list[dict], title: str, timeout_hours: float, poll_seconds: float,
                   seed: int, log) -> tuple[list[list[float]], list[dict], int]:
    """Create the project, wait until every task is annotated, return (scores per prompt, the stored
    labels, project id). Past the timeout: TimeoutError naming the project and how many are labelled."""
    from alignflow.rankers.tournament import win_rates

    tasks = pair_tasks(rows, cfg.max_pairs, seed)
    project = create_project(cfg, title, tasks)
    log.info("Label Studio project %s: %d pairs to label at %s/projects/%s", project, len(tasks), cfg.url, project)
    deadline = time.monotonic() + timeout_hours * 3600
    while True:
        results = pairwise_results(cfg, project)
        if len(results) >= len(tasks):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"Label Studio project {project} ({cfg.url}/projects/{project}): {len(results)} of "
                               f"{len(tasks)} pairs labelled within {timeout_hours} h")
        log.info("Label Studio project %s: %d of %d pairs labelled", project, len(results), len(tasks))
        time.sleep(poll_seconds)
    games, outcomes, stored = [], [], []
    for t in tasks:
        won = results[(t["prompt_id"], t["left_id"], t["right_id"])]
        games.append((t["k"], int(t["left_id"][1:]), int(t["right_id"][1:])))
        outcomes.append(won)
        stored.append({"prompt_id": t["prompt_id"], "chosen": t["left_id"] if won else t["right_id"],
                       "rejected": t["right_id"] if won else t["left_id"]})
    return win_rates([[c["text"] for c in r["candidates"]] for r in rows], games, outcomes), stored, project

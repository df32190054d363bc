"""Human ranking inside the flow (`rank.ranker: human`): the candidates go out, the flow pauses, labels
come back through the Prefect UI, Prefect's API or `alignflow label import`, and DPO trains on them.

    rank:
      ranker: {type: human, timeout_hours: 48}

What happens in the rank stage:
1. The candidates to label are written to the stage directory as `to_label.jsonl` (one row per prompt:
   prompt_id, prompt, candidates with their candidate_id) and `to_label.csv` (one row per candidate, an
   empty `rank` column to fill in), logged to the stage's MLflow run and shown as a Prefect artifact with
   the commands that send labels back.
2. The flow run pauses (Prefect's `pause_flow_run(wait_for_input=Labels)`): the Prefect UI shows a form
   for a small batch; `alignflow label import FLOW_RUN_ID FILE` sends a large one (the CSV filled in, or
   JSONL rows `{"prompt_id": "p3", "ranks": {"c0": 2, "c1": 1, ...}}`); any client can call
   `prefect.flow_runs.resume_flow_run(id, run_input={"labels": [...], "done": false})`.
3. Each batch is checked (known prompt and candidate ids, every candidate of a prompt ranked 1..n once):
   a bad batch is rejected whole with the error naming its row (shown in the next pause's description and
   by `alignflow label show`), and the flow pauses again; a good one is added to `labels.partial.jsonl`
   in the stage directory (a rerun of the stage starts from it: nothing labelled is lost). The flow
   waits until every prompt is labelled, or a batch says `done: true` (unlabelled prompts are dropped).
4. The labels are stored as a content-addressed dataset (`human_labels-<sha256>.jsonl`, an MLflow
   artifact and dataset input) and become scores (rank 1 of n scores 1, rank n scores 0) that the
   configured pair strategy turns into pairs; the pairs' digest carries the labels into DPO's cache key.
   Human labels are never a cache hit: this ranker pins nothing, so its rank stage always runs.
5. No labels within `timeout_hours`: the stage fails, naming the candidates file and the partial labels.

Prefect's `suspend_flow_run` (which frees the process) can only be called from the flow body and needs
persisted results; the rank stage is a task, so it pauses (the process waits, polling the API).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, Field

from alignflow import host
from alignflow.components import RANKERS, Ranker, Scorer
from alignflow.data.records import DataError
from alignflow.files import write_text_atomically
from alignflow.rankers.labelstudio import LabelStudioSection

log = logging.getLogger(__name__)

class LabelError(DataError):
    """A batch of labels that cannot be used; the message names the source, row and field."""


class PromptLabel(BaseModel):
    prompt_id: str = Field(description="the prompt's id in to_label.jsonl / to_label.csv, e.g. p3")
    ranks: dict[str, int] = Field(description="candidate_id -> rank, 1 = best; every candidate of the prompt, "
                                              "each rank once")


class Labels(BaseModel):
    """The typed input the flow pauses for (the Host renders it as a form: Prefect's UI, for a RunInput)."""

    labels: list[PromptLabel] = Field(default_factory=list, description="one entry per labelled prompt")
    done: bool = Field(default=False, description="finish with what is labelled; unlabelled prompts are dropped")


def export_rows(prompts: list[list[dict]], candidates: list[list[str]]) -> list[dict]:
    return [{"prompt_id": f"p{i}", "prompt": prompt[-1]["content"],
             "candidates": [{"candidate_id": f"c{j}", "text": text} for j, text in enumerate(cands)]}
            for i, (prompt, cands) in enumerate(zip(prompts, candidates))]


def write_exports(rows: list[dict], folder: Path) -> tuple[Path, Path]:
    """`to_label.jsonl` and `to_label.csv` (rank column empty) in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    jsonl, table = folder / "to_label.jsonl", folder / "to_label.csv"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt_id", "candidate_id", "prompt", "candidate", "rank"])
        for r in rows:
            for c in r["candidates"]:
                writer.writerow([r["prompt_id"], c["candidate_id"], r["prompt"], c["text"], ""])
    return jsonl, table


def expected_ids(rows: list[dict]) -> dict[str, list[str]]:
    return {r["prompt_id"]: [c["candidate_id"] for c in r["candidates"]] for r in rows}


def check_labels(labels: list[dict], expected: dict[str, list[str]], source: str,
                 rows: list[int] | None = None) -> dict[str, dict[str, int]]:
    """{prompt_id: {candidate_id: rank}} of a batch, or LabelError naming the row (1-based; `rows`: the
    file rows the labels came from) and field: unknown prompt or candidate ids, a prompt labelled twice,
    missing or duplicate ranks, ranks out of 1..n."""
    checked: dict[str, dict[str, int]] = {}
    for k, label in enumerate(labels):
        row = rows[k] if rows else k + 1
        if not isinstance(label, dict):
            raise LabelError(source, f"expected an object {{prompt_id, ranks}}, got {type(label).__name__}", row=row)
        pid, ranks = label.get("prompt_id"), label.get("ranks")
        if not isinstance(pid, str) or pid not in expected:
            raise LabelError(source, f"unknown prompt id {pid!r}", row=row, field="prompt_id")
        if pid in checked:
            raise LabelError(source, f"prompt {pid} is labelled twice in this batch", row=row, field="prompt_id")
        if not isinstance(ranks, dict):
            raise LabelError(source, "expected {candidate_id: rank}", row=row, field="ranks")
        wanted, n = expected[pid], len(expected[pid])
        for cid, rank in ranks.items():
            if cid not in wanted:
                raise LabelError(source, f"unknown candidate id {cid!r} of prompt {pid} (it has {wanted})",
                                 row=row, field=f"ranks.{cid!r}" if not cid.isprintable() else f"ranks.{cid}")
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n:
                raise LabelError(source, f"rank {rank!r} out of range: 1 (best) to {n}", row=row,
                                 field=f"ranks.{cid!r}" if not cid.isprintable() else f"ranks.{cid}")
        missing = [c for c in wanted if c not in ranks]
        if missing:
            raise LabelError(source, f"candidates {missing} of prompt {pid} have no rank", row=row, field="ranks")
        if len(set(ranks.values())) != n:
            raise LabelError(source, f"duplicate ranks {sorted(ranks.values())}: each of 1..{n} once", row=row,
                             field="ranks")
        checked[pid] = dict(ranks)
    return checked


def read_label_file(path: str, expected: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """Labels from a file: the exported CSV with its `rank` column filled in (rows left empty are
    skipped: label part of it at a time), or JSONL / JSON rows {prompt_id, ranks}. LabelError names the
    file, row and field."""
    file = Path(path)
    if not file.is_file():
        raise LabelError(path, "file not found")
    if file.suffix == ".csv":
        return _read_label_table(file, path, expected)
    from alignflow.data.records import read_records

    if file.suffix not in (".jsonl", ".json"):
        raise LabelError(path, f"unsupported file type {file.suffix!r}: use the exported .csv, or .jsonl / .json")
    try:
        records = read_records(path)
    except DataError as err:  # not JSON, not UTF-8...: a LabelError too, the error `alignflow label import` reports
        raise LabelError(err.source, err.problem, row=err.row, field=err.field) from None
    return check_labels(records, expected, path)


def _read_label_table(file: Path, path: str, expected: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """The exported CSV filled in; read whole (it is one row per candidate), as UTF-8 with or without the
    byte-order mark a spreadsheet writes."""
    raw = file.read_bytes()
    raw = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        at_line = raw.count(b"\n", 0, err.start) + 1
        raise LabelError(path, f"not UTF-8 text: byte {raw[err.start:err.start + 1]!r} at line {at_line} "
                         "(save the file as UTF-8)") from None
    grouped: dict[str, dict] = {}
    first_row: dict[str, int] = {}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    line = 0  # the last row read; the header is row 1
    try:
        if not reader.fieldnames or not {"prompt_id", "candidate_id", "rank"} <= set(reader.fieldnames):
            raise LabelError(path, f"expected columns prompt_id, candidate_id, rank; got {reader.fieldnames}", row=1)
        line = 1
        for line, record in enumerate(reader, start=2):
            raw_rank = (record.get("rank") or "").strip()
            if not raw_rank:
                continue
            try:
                rank = int(raw_rank)
            except ValueError:
                raise LabelError(path, f"rank {raw_rank!r} is not a whole number", row=line, field="rank") from None
            pid, cid = record["prompt_id"], record["candidate_id"]
            if cid in grouped.setdefault(pid, {}):
                raise LabelError(path, f"candidate {cid} of prompt {pid} is ranked twice", row=line,
                                 field="candidate_id")
            grouped[pid][cid] = rank
            first_row.setdefault(pid, line)
    except csv.Error as err:  # a field past csv's size limit (131,072 characters)
        raise LabelError(path, f"not readable as CSV ({err})", row=line + 1) from None
    labels = [{"prompt_id": pid, "ranks": ranks} for pid, ranks in grouped.items()]
    return check_labels(labels, expected, path, [first_row[pid] for pid in grouped])


def scores_from_ranks(ranks: dict[str, int], candidate_ids: list[str]) -> list[float]:
    """Rank 1 of n scores 1.0, rank n scores 0.0."""
    n = len(candidate_ids)
    return [(n - ranks[c]) / (n - 1) if n > 1 else 0.5 for c in candidate_ids]


@RANKERS.register("human")
class Human(Ranker):
    """People rank each prompt's candidates; the flow pauses for their labels (module docstring)."""

    type: str = "human"
    pointwise: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False
    timeout_hours: float = Field(default=72.0, gt=0)  # then the stage fails, saying where everything is
    poll_seconds: float = Field(default=10.0, gt=0)  # how often the paused flow asks the API for labels
    labels: str | None = None  # a labels file collected earlier (CSV or JSONL): used instead of pausing
    # pairwise labels in a Label Studio project instead (alignflow.rankers.labelstudio): {url, api_key_env, max_pairs}
    label_studio: LabelStudioSection | None = None

    def cache_pins(self) -> dict:
        from alignflow.pins import Uncacheable

        raise Uncacheable("human labels are inputs of this run, never reused from another")

    def open(self, device: str, fetch=None) -> HumanLabels:
        return HumanLabels(self)


class HumanLabels(Scorer):
    pointwise = False

    def __init__(self, cfg: Human):
        self.cfg = cfg
        self.counts: dict[str, float] = {}
        self.workdir: Path | None = None

    def keep_files_in(self, folder: Path) -> None:
        self.workdir = folder

    def score_groups(self, prompts, candidates, references):
        import mlflow

        from alignflow.rankers.labelstudio import wait_for_pairs
        from alignflow.tracking import log_dataset
        folder = Path(self.workdir or ".")
        rows = export_rows(prompts, candidates)
        jsonl, table = write_exports(rows, folder)
        if mlflow.active_run():
            for exported in (jsonl, table):
                mlflow.log_artifact(str(exported), "to_label")
        expected = expected_ids(rows)
        if self.cfg.label_studio is not None:
            title = f"alignflow {folder.name} {mlflow.active_run().info.run_id[:8] if mlflow.active_run() else ''}"
            scores, stored, project = wait_for_pairs(self.cfg.label_studio, rows, title.strip(),
                                                     self.cfg.timeout_hours, self.cfg.poll_seconds, 0, log)
            self.counts = {"human.labelled_pairs": len(stored), "human.label_studio_project": project}
        else:
            if self.cfg.labels is not None:
                labelled = read_label_file(self.cfg.labels, expected)
            else:
                labelled = wait_for_labels(self.cfg, expected, folder, jsonl, table)
            if not labelled:
                raise LabelError(str(folder / "labels.partial.jsonl"), "no prompt was labelled")
            stored = [{"prompt_id": pid, "ranks": labelled[pid]} for pid in expected if pid in labelled]
            self.counts = {"human.labelled_prompts": len(stored), "human.unlabelled_prompts": len(rows) - len(stored)}
            # an unlabelled prompt's candidates all score the same: a tie, dropped by the pair builder
            scores = [scores_from_ranks(labelled[r["prompt_id"]], expected[r["prompt_id"]])
                      if r["prompt_id"] in labelled else [0.0] * len(r["candidates"]) for r in rows]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in stored)
        digest = hashlib.sha256(text.encode()).hexdigest()
        path = folder / f"human_labels-{digest[:16]}.jsonl"
        path.write_text(text, encoding="utf-8")
        if mlflow.active_run():
            mlflow.log_artifact(str(path), "labels")
            log_dataset(stored, source=str(path), name="human_labels", context="ranking")
            mlflow.set_tag("alignflow.human_labels_sha256", digest)
        log.info("%d human labels stored as %s", len(stored), path.name)
        return scores

    def compare(self, prompts, first, second, references):
        raise NotImplementedError("human labels rank the sampled candidates; evaluation is judged by another "
                                  "ranker (eval.win_rate_by: verifier)")

    def stats(self) -> dict[str, float]:
        return self.counts


def wait_for_labels(cfg: Human, expected: dict[str, list[str]], folder: Path, jsonl: Path, table: Path
                    ) -> dict[str, dict[str, int]]:
    """Pause the flow run until every prompt is labelled (or a batch says done); batches checked one by
    one, accepted ones persisted to labels.partial.jsonl at once."""
    import time

    orchestrator = host.current()
    flow_run_id = orchestrator.run_id()
    if flow_run_id is None:
        raise RuntimeError("rank.ranker: human pauses a Prefect flow run for labels: run it in `alignflow run`, "
                          "or give a labels file (rank.ranker.labels)")
    partial = folder / "labels.partial.jsonl"
    labelled: dict[str, dict[str, int]] = {}
    if partial.is_file():  # an earlier attempt of this stage: keep what was labelled then
        labelled = {r["prompt_id"]: r["ranks"] for r in map(json.loads, partial.read_text().splitlines())
                    if r["prompt_id"] in expected}
        log.info("%d prompts already labelled in %s", len(labelled), partial)
    publish_instructions(orchestrator, flow_run_id, jsonl, table, len(expected))
    log.info("waiting for labels of %d prompts: candidates in %s; send them with `alignflow label import %s "
                "FILE` or the Resume form of this flow run in the Prefect UI", len(expected), table, flow_run_id)
    deadline = time.monotonic() + cfg.timeout_hours * 3600
    rejected, done = None, False
    while len(labelled) < len(expected) and not done:
        left = deadline - time.monotonic()
        orchestrator.set_status({"candidates_jsonl": str(jsonl), "candidates_csv": str(table),
                                 "partial_labels": str(partial), "expected": expected,
                                 "labelled": sorted(labelled), "rejected": rejected})
        description = (f"{len(labelled)} of {len(expected)} prompts labelled. Candidates: {jsonl} (or {table}). "
                       + (f"**Last batch rejected**: {rejected}. " if rejected else "")
                       + "Each label: a prompt_id and ranks {candidate_id: rank}, 1 = best.")
        try:
            batch = orchestrator.wait_for_input(Labels, description, timeout_s=max(1.0, left), poll_s=cfg.poll_seconds)
        except TimeoutError:
            raise TimeoutError(f"no labels for {len(expected) - len(labelled)} of {len(expected)} prompts within "
                               f"{cfg.timeout_hours} h; the candidates are in {jsonl} and {table}, the labels "
                               f"received so far in {partial} (a rerun of the stage keeps them)") from None
        try:
            new = check_labels([label.model_dump() for label in batch.labels], expected, "labels sent to the flow")
        except LabelError as err:
            rejected = str(err)
            log.warning("labels rejected, still waiting: %s", err)
            continue
        rejected, done = None, batch.done
        labelled |= new
        write_text_atomically("".join(json.dumps({"prompt_id": p, "ranks": r}) + "\n"
                                      for p, r in labelled.items()), partial)
        log.info("%d labels received (%d of %d prompts labelled)%s", len(new), len(labelled), len(expected),
                    "; done" if done else "")
    orchestrator.set_status({"candidates_jsonl": str(jsonl), "partial_labels": str(partial), "expected": expected,
                             "labelled": sorted(labelled), "rejected": None, "finished": True})
    return labelled


def publish_instructions(orchestrator: host.Host, flow_run_id: str, jsonl: Path, table: Path, prompts: int) -> None:
    """Shown on the flow run (Prefect artifacts): what to label and how to send it back (markdown), and the
    candidates themselves (a table, the CSV's rows)."""
    with open(table, newline="", encoding="utf-8") as f:
        orchestrator.publish("labels-candidates", "the candidates to rank (to_label.csv)",
                             table=list(csv.DictReader(f)))
    orchestrator.publish("labels-wanted", "candidates waiting for human ranking", markdown=(
        f"# {prompts} prompts to rank\n\nCandidates: `{jsonl}` (JSONL) and `{table}` (CSV: fill in the `rank` "
        "column, 1 = best, every candidate of a prompt once).\n\n"
        f"- small batches: the Resume form of this flow run in the Prefect UI\n"
        f"- a file: `alignflow label import {flow_run_id} labels.csv` (or a JSONL of "
        "`{\"prompt_id\": \"p0\", \"ranks\": {\"c0\": 1, \"c1\": 2}}` rows); `--done` to finish with what is labelled\n"
        f"- progress: `alignflow label show {flow_run_id}`"))

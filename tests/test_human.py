"""Human ranking inside the flow: a real `alignflow run` paused on a real Prefect server, driven through
Prefect's API and `alignflow label`; bad labels are named and rejected while the run keeps waiting."""

import csv
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from alignflow.rankers.human import LabelError, check_labels, read_label_file, scores_from_ranks, write_exports
from tests.conftest import BIN, QUIET, SMOKE, run_in_session, start, stop_tree, wait_for

EXPECTED = {"p0": ["c0", "c1", "c2"], "p1": ["c0", "c1", "c2"]}


@pytest.mark.parametrize("labels, row, field, problem", [
    ([{"prompt_id": "p9", "ranks": {}}], 1, "prompt_id", "unknown prompt id 'p9'"),
    ([{"prompt_id": "p0", "ranks": {"c0": 1, "c1": 2, "c7": 3}}], 1, "ranks.c7", "unknown candidate id 'c7'"),
    ([{"prompt_id": "p1", "ranks": {"c0": 1, "c1": 2}}], 1, "ranks", r"\['c2'\] of prompt p1 have no rank"),
    ([{"prompt_id": "p1", "ranks": {"c0": 1, "c1": 1, "c2": 3}}], 1, "ranks", "duplicate ranks"),
    ([{"prompt_id": "p0", "ranks": {"c0": 1, "c1": 2, "c2": 4}}], 1, "ranks.c2", "out of range: 1 \\(best\\) to 3"),
    ([{"prompt_id": "p0", "ranks": {"c0": 1, "c1": 2, "c2": 3}}, {"prompt_id": "p0", "ranks": {}}], 2, "prompt_id",
     "labelled twice"),
    (["p0"], 1, None, "expected an object"),
])
def test_bad_labels_are_named_by_row_and_field(labels, row, field, problem):
    with pytest.raises(LabelError, match=problem) as err:
        check_labels(labels, EXPECTED, "batch")
    assert (err.value.row, err.value.field) == (row, field)


def test_the_exported_csv_filled_in_is_a_labels_file(tmp_path):
    texts = {"p0": ["a", "b, \"quoted\"", "c"], "p1": ["x", "x", "x"]}
    rows = [{"prompt_id": p, "prompt": f"Q{p}", "candidates": [{"candidate_id": f"c{j}", "text": t}
                                                               for j, t in enumerate(ts)]} for p, ts in texts.items()]
    _, table = write_exports(rows, tmp_path)
    records = list(csv.DictReader(open(table, encoding="utf-8")))
    assert [r["candidate"] for r in records[:3]] == texts["p0"] and all(r["rank"] == "" for r in records)
    for r, rank in zip(records, ["2", "1", "3", "", "", ""]):  # p0 labelled, p1 left for later
        r["rank"] = rank
    filled = tmp_path / "filled.csv"
    with open(filled, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    assert read_label_file(str(filled), EXPECTED) == {"p0": {"c0": 2, "c1": 1, "c2": 3}}
    records[4]["rank"] = "two"
    with open(filled, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    with pytest.raises(LabelError, match="row 6: field 'rank': rank 'two' is not a whole number"):
        read_label_file(str(filled), EXPECTED)
    assert scores_from_ranks({"c0": 2, "c1": 1, "c2": 3}, ["c0", "c1", "c2"]) == [0.5, 1.0, 0.0]


def _paused_run(experiment: str):
    """The id of the paused flow run of this experiment (its config parameter names it), if any."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
    mine = [r for r in runs if isinstance(r.parameters.get("config"), dict)
            and r.parameters["config"].get("experiment") == experiment]
    return str(mine[0].id) if mine else None


def _cancel(run_id: str) -> None:
    """A run killed while paused stays Paused in Prefect: mark it cancelled."""
    from prefect import get_client
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelled(), force=True)


def _start(tmp_path: Path, prefect_api: str, name: str, ranker: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    log.write_text("")  # a rerun's log starts empty
    env = {**os.environ, **QUIET, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect_home")}
    proc = start([str(BIN / "alignflow"), "run", str(SMOKE), f"output_dir={tmp_path / 'out'}", f"experiment={name}",
                  f"rank.ranker={ranker}", "eval.pass_k=0", "registry.enabled=false",
                  "dpo.trainer.num_train_epochs=0.5"], log, tmp_path, env)
    return proc, log


@pytest.mark.slow
def test_a_paused_run_takes_labels_through_prefect_and_the_cli_and_dpo_trains_on_them(prefect_api, tmp_path):
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main
    from tasks.host import read_status

    proc, log = _start(tmp_path, prefect_api, "human", "{type: human, poll_seconds: 1}")
    try:
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            run_id = wait_for("the run to pause for labels", lambda: _paused_run("human"), proc, log)
            status = read_status(run_id)
            expected = status["expected"]
            assert len(expected) == 24 and status["labelled"] == [] and Path(status["candidates_csv"]).is_file()
            from prefect.artifacts import Artifact

            assert "alignflow label import" in Artifact.get("labels-wanted").data
            assert len(json.loads(Artifact.get("labels-candidates").data)) == 24 * 4
            table = list(csv.DictReader(open(status["candidates_csv"], encoding="utf-8")))

            # a bad file is refused by the CLI before anything is sent: the run keeps waiting
            bad = tmp_path / "bad.csv"
            with open(bad, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(table[0]))
                writer.writeheader()
                writer.writerows([{**r, "rank": "1"} for r in table if r["prompt_id"] == "p0"])  # all rank 1
            assert main(["label", "import", run_id, str(bad)]) == 2
            assert _paused_run("human") == run_id

            # a bad batch through Prefect's API: the flow rejects it, names it, and pauses again
            resume_flow_run(run_id, run_input={"labels": [{"prompt_id": "p0", "ranks": {"c9": 1}}]})
            rejected = wait_for("the batch to be rejected", lambda: (read_status(run_id).get("rejected") or "")
                                if _paused_run("human") == run_id else "", proc, log)
            assert "unknown candidate id 'c9'" in rejected

            # half the prompts through the API (the last candidate best), the rest as the exported CSV filled in
            def ranks(cands):  # c3 best ... c0 worst
                return {c: len(cands) - k for k, c in enumerate(cands)}
            first = [{"prompt_id": p, "ranks": ranks(c)} for p, c in list(expected.items())[:12]]
            resume_flow_run(run_id, run_input={"labels": first})
            wait_for("the first batch", lambda: len(read_status(run_id)["labelled"]) == 12
                     and _paused_run("human") == run_id, proc, log)
            filled = tmp_path / "labels.csv"
            with open(filled, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(table[0]))
                writer.writeheader()
                writer.writerows([{**r, "rank": ranks(expected[r["prompt_id"]])[r["candidate_id"]]} for r in table
                                  if r["prompt_id"] not in dict.fromkeys(p["prompt_id"] for p in first)])
            assert main(["label", "import", run_id, str(filled)]) == 0
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        stop_tree(proc)

    client = MlflowClient()
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("human").experiment_id])}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    rank = runs["rank"]
    assert rank.data.metrics["human.labelled_prompts"] == 24 and rank.data.metrics["pairs"] == 24
    assert "agreement.verifier" in rank.data.metrics  # the human ranking against the automatic one
    digest = rank.data.tags["alignflow.human_labels_sha256"]
    stored = client.download_artifacts(rank.info.run_id, f"labels/human_labels-{digest[:16]}.jsonl", str(tmp_path))
    assert len(Path(stored).read_text().splitlines()) == 24
    candidates = {r["prompt_id"]: r for r in map(json.loads, Path(client.download_artifacts(
        rank.info.run_id, "to_label/to_label.jsonl", str(tmp_path))).read_text().splitlines())}
    pairs = [json.loads(line) for line in Path(client.download_artifacts(
        rank.info.run_id, "pairs.jsonl", str(tmp_path))).read_text().splitlines()]
    for pair, (pid, row) in zip(pairs, candidates.items()):  # DPO's pairs: the labelled best against the worst
        assert pair["chosen"][0]["content"] == row["candidates"][-1]["text"]
        assert pair["rejected"][0]["content"] == row["candidates"][0]["text"]
    dpo = runs["dpo"]
    assert dpo.data.metrics["global_step"] > 0
    assert any(d.dataset.digest for d in dpo.inputs.dataset_inputs if d.dataset.name == "pairs")


@pytest.mark.slow
def test_no_labels_in_time_fails_saying_where_everything_is_and_a_rerun_keeps_what_was_labelled(prefect_api,
                                                                                                 tmp_path):
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.host import read_status

    ranker = "{type: human, poll_seconds: 1, timeout_hours: 0.02}"  # 72 s
    proc, log = _start(tmp_path, prefect_api, "human-timeout", ranker)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            run_id = wait_for("the run to pause for labels", lambda: _paused_run("human-timeout"), proc, log)
            expected = read_status(run_id)["expected"]
            resume_flow_run(run_id, run_input={"labels": [{"prompt_id": p, "ranks": {c: k + 1 for k, c in
                                                                                      enumerate(cands)}}
                                                          for p, cands in list(expected.items())[:5]]})
            wait_for("the first labels", lambda: len(read_status(run_id)["labelled"]) == 5, proc, log)
        rc = proc.wait(timeout=600)  # then nobody labels the rest in time
    finally:
        stop_tree(proc)
    text = log.read_text()
    assert rc != 0
    assert "no labels for 19 of 24 prompts" in text and "to_label.csv" in text and "labels.partial.jsonl" in text
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("human-timeout").experiment_id])
    assert {r.info.run_name: r.info.status for r in runs}["rank"] == "FAILED"
    assert not any(r.info.status == "RUNNING" for r in runs)

    # the same config again: the same candidates, and the five labels already given are still there
    proc, log = _start(tmp_path, prefect_api, "human-timeout", ranker)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            run_id = wait_for("the rerun to pause for labels", lambda: _paused_run("human-timeout"), proc, log)
            assert len(read_status(run_id)["labelled"]) == 5
    finally:
        stop_tree(proc)
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            if (left := _paused_run("human-timeout")) is not None:
                _cancel(left)


def python_without_venv() -> str | None:
    """Why infra/label-studio.sh cannot make a venv here (python3 missing, or without venv and ensurepip, as on
    Debian without python3-venv), or None. The one known reason to skip the Label Studio test: checked on the
    machine itself, not read from pip's output (pip -q says "No matching distribution found" alike for an index
    without the package and for one answering 503)."""
    try:
        done = run_in_session(["python3", "-c", "import ensurepip, venv"], timeout=60, capture_output=True, text=True)
    except FileNotFoundError:
        return "there is no python3 to make its venv with"
    return None if done.returncode == 0 else f"python3 has no venv with pip (Debian: apt-get install python3-venv): " \
                                             f"{done.stderr.strip()[-200:]}"


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio server on loopback, from its own venv (infra/label-studio.sh builds it once);
    skipped, saying why, only where python3 cannot make a venv; any other install failure fails the test."""
    from tests.conftest import ROOT, Server, free_port

    root = tmp_path_factory.mktemp("label_studio")
    env = {"LABEL_STUDIO_USERNAME": "alignflow-test@example.com", "LABEL_STUDIO_PASSWORD": "test-only-Pw0rd",
           "LABEL_STUDIO_API_KEY": "test0only0token0f3a9c1d", "LABEL_STUDIO_PORT": str(free_port()),
           "LABEL_STUDIO_BASE_DATA_DIR": str(root / "data")}
    if (reason := python_without_venv()) is not None:
        pytest.skip(reason=f"Label Studio cannot be installed on this machine: {reason}")
    install = run_in_session(["bash", str(ROOT / "infra" / "label-studio.sh"), "--install-only"], timeout=900,
                             cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    # any other failure (a registry glitch, the machine offline, a failed build) fails: it is never a quiet skip
    assert install.returncode == 0, ("Label Studio (label-studio 1.23.2 from the package index, in a venv of its "
                                     f"own) could not be installed:\n{install.stdout[-2000:]}{install.stderr[-3000:]}")
    url = f"http://127.0.0.1:{env['LABEL_STUDIO_PORT']}"
    server = Server("label-studio", ["bash", str(ROOT / "infra" / "label-studio.sh")], f"{url}/health", root, env,
                    timeout=300)
    yield url, env["LABEL_STUDIO_API_KEY"]
    server.stop()


@pytest.mark.slow
def test_pairwise_labels_come_back_from_a_real_label_studio(label_studio, smoke_data, tmp_path, monkeypatch):
    import threading

    from alignflow.components import RANKERS
    from alignflow.rankers.verifier import Verifier
    from alignflow.stats import agreement
    from tests.test_judges import candidates

    url, key = label_studio
    monkeypatch.setenv("LS_KEY_FOR_TEST", key)
    prompts, cands, refs = candidates(smoke_data["prompts"], n=3)
    ranker = RANKERS.validate({"type": "human", "poll_seconds": 0.5, "timeout_hours": 0.1,
                               "label_studio": {"url": url, "api_key_env": "LS_KEY_FOR_TEST", "max_pairs": 3}})
    scorer = ranker.open("cpu")
    scorer.keep_files_in(tmp_path / "rank")
    found: dict = {}
    worker = threading.Thread(target=lambda: found.update(scores=scorer.score_groups(prompts, cands, refs)))
    worker.start()
    try:  # a person labels in the browser; here the same API the UI calls: the reference answer wins
        from label_studio_sdk import LabelStudio

        ls = LabelStudio(base_url=url, api_key=key)
        deadline = time.monotonic() + 120
        while not (projects := [p for p in ls.projects.list() if p.title.startswith("alignflow")]):
            assert time.monotonic() < deadline and worker.is_alive(), "no project was created"
            time.sleep(0.5)
        tasks = list(ls.tasks.list(project=projects[0].id, fields="all"))
        assert len(tasks) == 3 * 3
        for task in tasks:
            left_wins = task.data["left"] in refs or task.data["right"] not in refs and len(task.data["left"]) < \
                len(task.data["right"])
            ls.annotations.create(id=task.id, result=[{
                "from_name": "choice", "to_name": "left", "type": "pairwise",
                "value": {"selected": "left" if left_wins else "right"}}])
        worker.join(timeout=120)
        assert not worker.is_alive()
    finally:
        worker.join(timeout=5)
    scores = found["scores"]
    assert scorer.stats()["human.labelled_pairs"] == 9
    stored = [json.loads(line) for f in (tmp_path / "rank").glob("human_labels-*.jsonl")
              for line in f.read_text().splitlines()]
    assert len(stored) == 9  # read back from Label Studio and kept, content-addressed
    played = set()
    for label in stored:  # the reference answer (c0) won every pair it was shown in
        if "c0" in (label["chosen"], label["rejected"]):
            assert label["chosen"] == "c0"
            played.add(label["prompt_id"])
    assert played
    for k, group in enumerate(scores):
        assert len(group) == 4 and (group[0] == 1.0 if f"p{k}" in played else True)
    verifier = Verifier().score_groups(prompts, cands, refs)
    assert agreement(scores, verifier)["agreement"] > 0

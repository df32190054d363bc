"""The LLM judge (local and served over an OpenAI-compatible API), the ensemble, and how rankings agree."""

import re
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from alignflow.components import RANKERS
from alignflow.config import ConfigError, load_config
from alignflow.data.records import read_jsonl
from alignflow.rankers.ensemble import EnsembleScorer
from alignflow.rankers.judge import HttpVerdicts, Judge, PairwiseJudge, both_orders, judge_messages, parse_verdict
from alignflow.rankers.verifier import Checker, Verifier
from alignflow.stats import agreement, bootstrap_ci, length_controlled_win_rate, pair_preferences
from tests.conftest import SMOKE, Server, free_port

ANSWERS = re.compile(r"Assistant A's Answer\]\n(.*)\n\[The End of Assistant A's Answer\].*"
                     r"Assistant B's Answer\]\n(.*)\n\[The End of Assistant B's Answer\]", re.S)


def candidates(rows: list[dict], n: int = 6) -> tuple[list, list, list]:
    """The reference answer, a wrong one, a rambling one and an empty one, for the first n prompts."""
    prompts, cands, refs = [], [], []
    for i, row in enumerate(rows[:n]):
        ref = row["completion"][0]["content"]
        other = rows[(i + 1) % len(rows)]["completion"][0]["content"]
        prompts.append(row["prompt"])
        cands.append([ref, other, ref + " and so on and so forth", ""])
        refs.append(ref)
    return prompts, cands, refs


class Scripted:
    """Verdict source for the aggregation tests: `first` always names the first answer shown (pure
    position bias); `knows` prefers the answer that is the reference (read from the judge chat)."""

    def __init__(self, mode: str, references: dict[str, str]):
        self.mode, self.references, self.calls = mode, references, 0

    def __call__(self, chats):
        self.calls += len(chats)
        if self.mode == "first":
            return ["A"] * len(chats)
        verdicts = []
        for chat in chats:
            a, b = ANSWERS.search(chat[1]["content"]).groups()
            question = chat[1]["content"].split("\n")[1]
            ref = next(r for q, r in self.references.items() if q.startswith(question))
            verdicts.append("A" if a == ref and b != ref else "B" if b == ref and a != ref else "C")
        return verdicts

    def close(self):
        pass


QUESTION = re.compile(r"\[User Question\]\n(.*?)\n\n\[The Start of Assistant A's Answer\]", re.S)


class Recorded:
    """A judge's verdict source, wrapped: every batch of judge chats it was given and the verdicts it gave."""

    def __init__(self, verdicts):
        self.verdicts, self.asked = verdicts, []

    def __call__(self, chats):
        said = self.verdicts(chats)
        self.asked.append((chats, said))
        return said

    def close(self):
        self.verdicts.close()


def stats_by_hand(said: list) -> dict:
    """A pairwise judge's stats worked out from the verdicts it gave for one batch: the first half of the
    batch shows each pair one way round, the second half the other."""
    n = len(said) // 2
    agreeing = sum((a, b) in (("A", "B"), ("B", "A"), ("C", "C")) for a, b in zip(said[:n], said[n:]))
    decisive = [v for v in said if v in ("A", "B")]
    return {"judge.pairs_judged": n, "judge.calls": 2 * n, "judge.consistency_rate": agreeing / n,
            "judge.first_position_rate": decisive.count("A") / len(decisive) if decisive else 0.5,
            "judge.unparsed_rate": sum(v is None for v in said) / (2 * n)}


def win_rates_by_hand(prompts: list, cands: list, chats: list, said: list) -> list[list[float]]:
    """Each candidate's share of the games it played (a tie counts half; none played: 0.5), read from the
    judge chats themselves: which prompt, which two answers, in which order."""
    n = len(chats) // 2
    prompt_of = {"\n\n".join(m["content"] for m in p if m["role"] != "assistant"): k for k, p in enumerate(prompts)}
    assert len(prompt_of) == len(prompts) and all(len(set(c)) == len(c) for c in cands)
    wins, games = [[0.0] * len(c) for c in cands], [[0] * len(c) for c in cands]
    for chat, swapped, first, second in zip(chats[:n], chats[n:], said[:n], said[n:]):
        x, y = ANSWERS.search(chat[1]["content"]).groups()
        assert ANSWERS.search(swapped[1]["content"]).groups() == (y, x)  # the same pair, the other way round
        k = prompt_of[QUESTION.search(chat[1]["content"]).group(1)]
        i, j = cands[k].index(x), cands[k].index(y)
        won = {("A", "B"): 1.0, ("B", "A"): 0.0}.get((first, second), 0.5)
        wins[k][i] += won
        wins[k][j] += 1 - won
        games[k][i] += 1
        games[k][j] += 1
    return [[w / g if g else 0.5 for w, g in zip(ws, gs)] for ws, gs in zip(wins, games)]


def agreement_by_hand(first: list[list[float]], second: list[list[float]]) -> float:
    """The share of candidate pairs that two rankings order alike (better, worse or tied)."""
    sign = lambda d: (d > 0) - (d < 0)  # noqa: E731
    alike = [sign(a[i] - a[j]) == sign(b[i] - b[j]) for a, b in zip(first, second)
             for i in range(len(a)) for j in range(i + 1, len(a))]
    return sum(alike) / len(alike)


def test_verdicts_are_read_by_mt_bench_s_rule_and_both_orders_must_agree():
    assert parse_verdict("A is terse. [[B]] wait, no: [[A]]") == "A"
    assert parse_verdict("I think A") is None and parse_verdict("") is None
    assert both_orders("A", "B") == 1.0 and both_orders("B", "A") == 0.0  # x preferred in both orders / y
    assert both_orders("A", "A") == 0.5 and both_orders("C", "C") == 0.5 and both_orders("A", None) == 0.5
    chat = judge_messages([{"role": "user", "content": "Q?"}], "one", "two", explain=False)
    assert "[[C]]" in chat[0]["content"] and "provide a short explanation" not in chat[0]["content"]
    assert "Assistant A's Answer]\none\n" in chat[1]["content"] and "Assistant B's Answer]\ntwo\n" in chat[1]["content"]


def test_a_position_biased_judge_gives_ties_and_a_consistent_one_ranks_by_wins(smoke_data):
    prompts, cands, refs = candidates(smoke_data["prompts"])
    references = {p[-1]["content"]: r for p, r in zip(prompts, refs)}
    biased = PairwiseJudge(Judge(model="x"), Scripted("first", references))
    assert all(s == [0.5] * 4 for s in biased.score_groups(prompts, cands, refs))
    stats = biased.stats()
    assert stats["judge.consistency_rate"] == 0.0 and stats["judge.first_position_rate"] == 1.0
    assert stats["judge.pairs_judged"] == 6 * 6 and stats["judge.calls"] == 2 * 6 * 6  # every pair, both orders

    knows = PairwiseJudge(Judge(model="x", max_pairs=3), Scripted("knows", references))
    scores = knows.score_groups(prompts, cands, refs)
    for group in scores:  # the reference wins every game it plays; others tie among themselves
        assert group[0] == max(group) and group[0] > 0.5
    assert knows.stats()["judge.pairs_judged"] == 6 * 3 and knows.verdicts.calls == 2 * 6 * 3  # the cap holds
    assert knows.stats()["judge.consistency_rate"] == 1.0
    assert knows.compare(prompts, refs, [c[1] for c in cands], refs) == [1.0] * 6
    assert knows.compare(prompts, refs, refs, refs) == [0.5] * 6  # identical answers: a tie, no call


def test_agreement_and_kappa_between_two_rankings():
    same = [[1.0, 0.2, 0.5], [0.0, 1.0, 0.3]]
    assert agreement(same, same) == {"agreement": 1.0, "kappa": 1.0, "pairs": 6}
    reversed_ = [[-s for s in g] for g in same]
    found = agreement(same, reversed_)
    assert found["agreement"] == 0.0 and found["kappa"] < 0
    partly = agreement([[1, 0, 0, 0]], [[1, 0, 1, 0]])  # pairs: (>,>,>,=,=,=) vs (>,=,>,<,=,>)
    assert partly["agreement"] == pytest.approx(3 / 6)
    assert partly["kappa"] == pytest.approx((3 / 6 - (3 / 6 * 3 / 6 + 3 / 6 * 2 / 6)) / (1 - 5 / 12))


def test_ensemble_votes_counts_disagreements_and_is_validated(smoke_data):
    prompts, cands, refs = candidates(smoke_data["prompts"])
    references = {p[-1]["content"]: r for p, r in zip(prompts, refs)}
    ensemble = RANKERS.validate({"type": "ensemble", "rankers": ["verifier", "checker"], "weights": [2, 1]})
    assert ensemble.needs_reference and not RANKERS.validate(
        {"type": "ensemble", "rankers": ["checker", "checker"]}).needs_reference
    scorer = ensemble.open("cpu")
    scores = scorer.score_groups(prompts, cands, refs)
    verifier = Verifier().score_groups(prompts, cands, refs)
    assert agreement(scores, verifier)["agreement"] == 1.0  # both members know the answer: they agree
    assert scorer.stats()["ensemble.disagreement_rate"] == 0.0
    # a member that ties everything: majority keeps the verifier's order, and every decided pair is a disagreement
    ensemble = RANKERS.validate({"type": "ensemble", "rankers": ["verifier", {"type": "judge", "model": "x"}]})
    scorer = EnsembleScorer(ensemble, [Verifier(), PairwiseJudge(ensemble.rankers[1], Scripted("first", references))])
    mixed = scorer.score_groups(prompts, cands, refs)
    assert agreement(mixed, verifier)["agreement"] == 1.0
    decided = sum(v != 0 for v in pair_preferences(verifier))
    assert scorer.stats()["ensemble.disagreement_rate"] == pytest.approx(decided / (6 * 6))
    assert scorer.stats()["judge.consistency_rate"] == 0.0  # members' own stats come along
    mean = RANKERS.validate({"type": "ensemble", "rankers": ["verifier", "checker"], "vote": "mean"}).open("cpu")
    assert [max(range(4), key=g.__getitem__) for g in mean.score_groups(prompts, cands, refs)] == [0] * 6
    with pytest.raises(ConfigError, match="weights: one positive weight per ranker"):
        load_config(SMOKE, ["rank.ranker={type: ensemble, rankers: [verifier, checker], weights: [1]}"])
    with pytest.raises(ConfigError, match="unknown ranker 'nope'"):
        load_config(SMOKE, ["rank.ranker={type: ensemble, rankers: [verifier, nope]}"])


def test_local_judge_on_the_embedded_model(tiny_model_path, smoke_data):
    prompts, cands, refs = candidates(smoke_data["prompts"])
    judge = Judge(model=tiny_model_path, max_pairs=4).open("cpu")
    judge.verdicts = recorded = Recorded(judge.verdicts)
    scores = judge.score_groups(prompts, cands, refs)
    [(chats, said)] = recorded.asked
    assert set(said) <= {"A", "B", "C"}  # verdicts read from probabilities: always one of three
    stats = judge.stats()
    assert stats == pytest.approx(stats_by_hand(said)) and stats["judge.pairs_judged"] == 6 * 4
    assert stats["judge.unparsed_rate"] == 0.0
    # each candidate's win rate over the pairs it played, as the verdicts say
    assert scores == [pytest.approx(group) for group in win_rates_by_hand(prompts, cands, chats, said)]
    again = Judge(model=tiny_model_path, max_pairs=4).open("cpu").score_groups(prompts, cands, refs)
    assert again == scores  # deterministic: no sampling anywhere
    verifier = Verifier().score_groups(prompts, cands, refs)
    found = agreement(scores, verifier)
    assert found["agreement"] == pytest.approx(agreement_by_hand(scores, verifier)) and found["pairs"] == 6 * 6


def head_to_head(evaluate_run, scorer) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Per eval prompt, DPO's answer against SFT's as `scorer` scores them alone (1.0 better, 0.0 worse, 0.5
    equal), the answers' length difference in words, and DPO's scores: worked out from the evaluate run's
    samples table, which holds every model's answer to every prompt in order."""
    table = MlflowClient().load_table(evaluate_run.info.experiment_id, "eval_samples.json",
                                      run_ids=[evaluate_run.info.run_id])
    dpo, sft = (table[table["model"] == name] for name in ("dpo", "sft"))
    assert len(dpo) == 24 and list(dpo["prompt"]) == list(sft["prompt"])
    prompts = [[{"role": "user", "content": text}] for text in dpo["prompt"]]
    references = [ref or None for ref in dpo["reference"]]  # "" where the prompt came without one
    ours, theirs = (scorer.score(prompts, list(t["answer"]), references) for t in (dpo, sft))
    outcomes = np.array([1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(ours, theirs)])
    lengths = np.array([len(a.split()) - len(b.split()) for a, b in zip(dpo["answer"], sft["answer"])], dtype=float)
    return outcomes, lengths, ours


def judge_server(model_path: str, tmp_path: Path) -> tuple[Server, str]:
    """`transformers serve`: a real OpenAI-compatible server (transformers' own) on loopback."""
    port = free_port()
    server = Server("judge-server", [str(Path(sys.executable).parent / "transformers"), "serve", model_path,
                                     "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                    f"http://127.0.0.1:{port}/v1/models", tmp_path, timeout=180)
    return server, f"http://127.0.0.1:{port}/v1"


def test_served_judge_over_http_and_a_server_that_is_down(tiny_model_path, smoke_data, tmp_path):
    import openai

    prompts, cands, refs = candidates(smoke_data["prompts"], n=2)
    server, url = judge_server(tiny_model_path, tmp_path)
    try:
        judge = Judge(model=tiny_model_path, url=url, max_tokens=6, max_pairs=2).open("cpu")
        judge.verdicts = recorded = Recorded(judge.verdicts)
        scores = judge.score_groups(prompts, cands, refs)
        judge.close()
    finally:
        server.stop()
    requests = server.log_path.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200')
    assert requests == judge.stats()["judge.calls"] == 2 * 2 * 2  # both orders of every judged pair, all answered
    # a reply without [[A]], [[B]] or [[C]] (the tiny model writes none) is counted as unparsed, and is a tie
    [(chats, said)] = recorded.asked
    assert judge.stats() == pytest.approx(stats_by_hand(said))
    assert scores == [pytest.approx(group) for group in win_rates_by_hand(prompts, cands, chats, said)]
    down = Judge(model="m", url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1, timeout=5).open("cpu")
    with pytest.raises(openai.APIConnectionError):
        down.score_groups(prompts, cands, refs)


@pytest.mark.slow
def test_ensemble_with_a_served_judge_through_the_flow_keeps_its_key_secret(prefect_server, tiny_model_path,
                                                                            tmp_path, monkeypatch, mlflow_store):
    from flows.pipeline import align

    secret = "sk-test-do-not-log-9f3a"
    monkeypatch.setenv("ALIGNFLOW_TEST_JUDGE_KEY", secret)
    asked, ask = [], HttpVerdicts.__call__  # every batch the served judge is given in the flow, and its verdicts

    def recording(self, chats):
        said = ask(self, chats)
        asked.append(said)
        return said

    monkeypatch.setattr(HttpVerdicts, "__call__", recording)
    server, url = judge_server(tiny_model_path, tmp_path)
    try:
        judge = f"{{type: judge, url: '{url}', model: '{tiny_model_path}', max_tokens: 6, max_pairs: 2, " \
                "api_key_env: ALIGNFLOW_TEST_JUDGE_KEY}"
        config = load_config(SMOKE, [f"output_dir={tmp_path / 'out'}", "experiment=judged",
                                     f"rank.ranker={{type: ensemble, rankers: [verifier, {judge}]}}",
                                     "eval.win_rate_by=ranker", "eval.pass_k=0", "registry.enabled=false",
                                     "dpo.trainer.num_train_epochs=0.5"])
        results = align(config)
    finally:
        server.stop()
    client = MlflowClient()
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_run(results["parent_run_id"]).info.experiment_id],
        f"tags.mlflow.parentRunId = '{results['parent_run_id']}'")}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    rank = runs["rank"].data.metrics
    assert rank["pairs"] > 0 and len(asked) == 2  # one batch for the rank stage, then one for the evaluation
    expected = stats_by_hand(asked[0])
    for key in ("judge.pairs_judged", "judge.consistency_rate", "judge.first_position_rate", "judge.unparsed_rate"):
        assert rank[key] == pytest.approx(expected[key]), key
    # the tiny judge (a prose model, shown a prompt longer than its 512 positions) writes no verdict at all: to
    # it every pair is a tie, so the ensemble orders each prompt's candidates exactly as its verifier does,
    # and disagrees with the judge on every pair the verifier decides
    assert not [v for said in asked for v in said if v is not None]
    assert rank["judge.consistency_rate"] == 0.0
    assert rank["agreement.verifier"] == 1.0 and rank["kappa.verifier"] == 1.0
    rows = read_jsonl(mlflow.artifacts.download_artifacts(run_id=runs["sample"].info.run_id,
                                                          artifact_path="candidates.jsonl"))
    verifier = Verifier().score_groups([r["prompt"] for r in rows], [r["candidates"] for r in rows],
                                       [r["reference"] for r in rows])
    decided = [g[i] != g[j] for g in verifier for i in range(len(g)) for j in range(i + 1, len(g))]
    assert any(decided) and rank["ensemble.disagreement_rate"] == pytest.approx(sum(decided) / len(decided))
    # DPO against SFT on the eval prompts: the verifier's verdict, the judge tying every one
    evaluate = runs["evaluate"].data.metrics
    outcomes, lengths, _ = head_to_head(runs["evaluate"], Verifier())
    assert evaluate["dpo.win_rate_vs_sft"] == pytest.approx(outcomes.mean())
    assert evaluate["dpo.lc_win_rate_vs_sft"] == pytest.approx(length_controlled_win_rate(outcomes, lengths))
    assert evaluate["ensemble.pairs"] == 24  # the ensemble judged DPO against SFT on every eval prompt
    assert "dpo.mean_reward" not in evaluate  # a pairwise ranker gives no reward to one answer alone
    assert runs["rank"].data.tags.get("alignflow.cache_hit") != "true"
    # the key was only ever in the environment: not in the store, the artifacts or the outputs
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), file


@pytest.mark.slow
def test_eval_prompts_without_references_are_judged_by_win_rate_against_sft(prefect_server, smoke_data, tmp_path):
    import json

    from alignflow.data.records import DataError
    from flows.pipeline import align
    from tasks.load_data import preflight

    open_ended = tmp_path / "open.jsonl"  # the smoke eval prompts with their answers withheld
    open_ended.write_text("".join(json.dumps({"instruction": r["prompt"][-1]["content"], "task": r["task"]}) + "\n"
                                  for r in smoke_data["eval"]))
    common = [f"output_dir={tmp_path / 'out'}", "experiment=open-ended", f"eval.data.path={open_ended}",
              "rank.ranker=checker", "eval.pass_k=0"]
    with pytest.raises(DataError, match="row 1: field 'output'"):  # the verifier would judge: references needed
        preflight(load_config(SMOKE, common), "cpu")
    config = load_config(SMOKE, common + ["eval.win_rate_by=ranker"])
    results = align(config)
    client = MlflowClient()
    parent = client.get_run(results["parent_run_id"])
    metrics = parent.data.metrics
    assert "dpo.accuracy" not in metrics and "sft.flaw_wrong" not in metrics  # nothing to be exact against
    # the checker scores each answer against the one it works out from the prompt; DPO wins a prompt where
    # its answer scores higher than SFT's
    (evaluate_run,) = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = "
                                         f"'{parent.info.run_id}' and tags.`alignflow.stage` = 'evaluate'")
    outcomes, lengths, dpo_scores = head_to_head(evaluate_run, Checker())
    low, rate, high = (metrics[f"dpo.win_rate_vs_sft{s}"] for s in ("_ci95_low", "", "_ci95_high"))
    assert rate == pytest.approx(outcomes.mean())
    assert (low, high) == pytest.approx(bootstrap_ci(outcomes, config.eval.bootstrap, config.seed))
    assert metrics["dpo.lc_win_rate_vs_sft"] == pytest.approx(length_controlled_win_rate(outcomes, lengths))
    assert metrics["dpo.mean_reward"] == pytest.approx(np.mean(dpo_scores))
    assert "delta_vs_sft" not in " ".join(metrics)
    report = open(results["report"]).read()
    row = next(line for line in report.splitlines() if line.startswith("| **dpo**"))
    assert f"{rate:.3f} [{low:.3f}, {high:.3f}]" in row and "## Accuracy per task type" not in report
    assert results["promotion"]["decision"] == "first champion"


def test_a_judge_config_that_cannot_work_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="local judge is a model directory"):
        load_config(SMOKE, ["rank.ranker={type: judge, model: 'embedded:tiny-s'}"])
    with pytest.raises(ConfigError, match="max_tokens 16 leaves it no room"):
        load_config(SMOKE, ["rank.ranker={type: judge, model: m, url: 'http://127.0.0.1:1/v1', explain: true}"])
    with pytest.raises(ConfigError, match="reads its verdict from probabilities"):
        load_config(SMOKE, ["rank.ranker={type: judge, model: m, explain: true, max_tokens: 512}"])
    assert load_config(SMOKE, ["rank.ranker={type: judge, model: 'embedded:smollm2-135m'}"]).rank.ranker.type == "judge"
    with pytest.raises(ConfigError, match="human ranker labels the sampled candidates"):
        load_config(SMOKE, ["rank.ranker=human", "eval.win_rate_by=ranker"])


@pytest.mark.slow
def test_a_served_judge_s_key_comes_from_the_environment_or_a_prefect_secret_block(prefect_server, monkeypatch):
    from prefect.blocks.system import Secret

    from alignflow.engines.endpoint import api_key

    Secret(value="sk-from-block").save("judge-key-test", overwrite=True)
    monkeypatch.setenv("JUDGE_KEY_TEST", "sk-from-env")
    served = {"type": "judge", "model": "m", "url": "http://127.0.0.1:1/v1"}
    assert api_key(RANKERS.validate({**served, "api_key_env": "JUDGE_KEY_TEST"})) == "sk-from-env"
    assert api_key(RANKERS.validate({**served, "api_key_block": "judge-key-test"})) == "sk-from-block"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert api_key(RANKERS.validate(served)) == "EMPTY"  # a server without auth takes any string

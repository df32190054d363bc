"""The LLM judge (local and served over an OpenAI-compatible API), the ensemble, and how rankings agree."""

import re
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from alignflow.components import RANKERS
from alignflow.config import ConfigError, load_config
from alignflow.rankers.ensemble import EnsembleScorer
from alignflow.rankers.judge import Judge, PairwiseJudge, both_orders, judge_messages, parse_verdict
from alignflow.rankers.verifier import Verifier
from alignflow.stats import agreement, pair_preferences
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
    scores = judge.score_groups(prompts, cands, refs)
    stats = judge.stats()
    assert stats["judge.pairs_judged"] == 6 * 4 and stats["judge.calls"] == 2 * 6 * 4
    assert stats["judge.unparsed_rate"] == 0.0  # verdicts read from probabilities: always one of three
    for group in scores:  # win rates; the games played sum to the pairs judged per prompt
        assert len(group) == 4 and all(0.0 <= s <= 1.0 for s in group)
    again = Judge(model=tiny_model_path, max_pairs=4).open("cpu").score_groups(prompts, cands, refs)
    assert again == scores  # deterministic: no sampling anywhere
    found = agreement(scores, Verifier().score_groups(prompts, cands, refs))
    assert 0.0 <= found["agreement"] <= 1.0 and found["pairs"] == 6 * 6


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
        scores = judge.score_groups(prompts, cands, refs)
        judge.close()
    finally:
        server.stop()
    requests = server.log_path.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200')
    assert requests == judge.stats()["judge.calls"] == 2 * 2 * 2  # both orders of every judged pair, all answered
    assert 0.0 <= judge.stats()["judge.unparsed_rate"] <= 1.0  # a tiny model seldom writes [[A]]: counted, a tie
    assert all(len(g) == 4 for g in scores)
    down = Judge(model="m", url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1, timeout=5).open("cpu")
    with pytest.raises(openai.APIConnectionError):
        down.score_groups(prompts, cands, refs)


@pytest.mark.slow
def test_ensemble_with_a_served_judge_through_the_flow_keeps_its_key_secret(prefect_server, tiny_model_path,
                                                                            tmp_path, monkeypatch, mlflow_store):
    from flows.pipeline import align

    secret = "sk-test-do-not-log-9f3a"
    monkeypatch.setenv("ALIGNFLOW_TEST_JUDGE_KEY", secret)
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
    assert rank["pairs"] > 0 and 0 <= rank["judge.consistency_rate"] <= 1
    assert rank["ensemble.disagreement_rate"] > 0  # the verifier decides pairs the tiny judge cannot
    assert 0 <= rank["agreement.verifier"] <= 1 and "kappa.verifier" in rank
    evaluate = runs["evaluate"].data.metrics
    assert 0 <= evaluate["dpo.lc_win_rate_vs_sft"] <= 1 and "dpo.win_rate_vs_sft_ci95_low" in evaluate
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
    results = align(load_config(SMOKE, common + ["eval.win_rate_by=ranker"]))
    client = MlflowClient()
    metrics = client.get_run(results["parent_run_id"]).data.metrics
    assert "dpo.accuracy" not in metrics and "sft.flaw_wrong" not in metrics  # nothing to be exact against
    low, rate, high = (metrics[f"dpo.win_rate_vs_sft{s}"] for s in ("_ci95_low", "", "_ci95_high"))
    assert 0 <= low <= rate <= high <= 1 and 0 <= metrics["dpo.lc_win_rate_vs_sft"] <= 1
    assert "dpo.mean_reward" in metrics and "delta_vs_sft" not in " ".join(metrics)
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

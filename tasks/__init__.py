"""One module per stage; each stage is a Prefect task that takes and returns references."""

import logging
from pathlib import Path

from alignflow.modeling import stop_token_ids
from alignflow.refs import ModelRef, digest_path
from alignflow.tracking import log_model_dir


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow (shown in the Prefect UI); a plain logger when a stage
    function is called directly (tests, notebooks)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("alignflow")


def save_trained_model(trainer, tokenizer, model_dir: Path, run_id: str, is_adapter: bool) -> ModelRef:
    """Save a TRL trainer's model (weights or adapter, safetensors) with its tokenizer and chat
    template, make generation stop at end of turn, log it to the stage's run, return its ModelRef."""
    trainer.model.generation_config.eos_token_id = stop_token_ids(tokenizer, trainer.model)
    trainer.save_model(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    return ModelRef(uri=log_model_dir(model_dir), digest=digest_path(model_dir), run_id=run_id,
                    local_path=str(model_dir), is_adapter=is_adapter)

"""One module per stage; each stage is a Prefect task that takes and returns references."""

import logging


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow (shown in the Prefect UI); a plain logger when a stage
    function is called directly (tests, notebooks)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("alignflow")

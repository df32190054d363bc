"""Training by job: the arguments TRL gets (args), the table of TRL trainers (trainers), one training run
in-process or launched on every rank (run). Imports neither Prefect nor MLflow nor pydantic at import time,
so bench/device_check.py runs these code paths on a bare GPU image."""

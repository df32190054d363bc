"""alignflow's core: config schema, references, data formats, models, training, engines, rankers, MLflow records.

It knows no stage and imports no Prefect, `tasks` or `flows` (tests/test_layers.py): `tasks/` builds the
stages on it and `flows/` chains them. It logs through the standard logger `alignflow`; what it needs
of the orchestrator it asks the Host the stage layer installed (alignflow.host).
"""

import os

# No usage telemetry leaves the machine from Prefect's server, MLflow or the HF hub client:
# runs talk to their own tracking and orchestration servers only. Set before those libraries load.
for _name, _value in {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                      "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_DISABLE_TELEMETRY": "1",
                      "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_name, _value)

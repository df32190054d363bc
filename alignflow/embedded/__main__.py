"""python -m alignflow.embedded [CONFIG]: build the embedded data and base models a config names."""

import sys

from alignflow.config import load_config
from alignflow.embedded import PREFIX, data_dir, model_path

config = load_config(sys.argv[1] if len(sys.argv) > 1 else "configs/default.yaml")
print("data:", data_dir(config.embedded))
for name in config.base.candidates:
    if name.startswith(PREFIX):
        print(f"{name}:", model_path(config.embedded, name))

"""Where alignflow keeps what it builds ($ALIGNFLOW_HOME), and writes that a killed process never leaves
half done: a directory built beside its target and renamed, a file written beside it and replaced.

Standard library only: the embedded builders import it on a bare GPU image (bench/device_check.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def home() -> Path:
    """$ALIGNFLOW_HOME (default ~/.cache/alignflow): embedded data and models, converted GGUF and pickle files."""
    return Path(os.environ.get("ALIGNFLOW_HOME", Path.home() / ".cache" / "alignflow"))


def build_atomically(target: Path, build) -> Path:
    """`target`, built by `build(tmp)` into a temporary sibling, then renamed (unless it exists already):
    a killed build never leaves a half-made cache entry."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        build(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.exists():  # not a lost race with a concurrent builder
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_text_atomically(data: str, path: Path) -> None:
    """`data` in `path`, written to a sibling then renamed over it: a reader sees the old or the new file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)

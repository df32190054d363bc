"""The embedded default: built here, deterministic, cached on disk, rebuilt when missing.

    python -m alignflow.embedded            # build (or find) what configs/default.yaml uses

Config names `embedded:<split>` (sft, prompts, eval) for data and `embedded:<model>` for base
models; both resolve to files under $ALIGNFLOW_HOME (default ~/.cache/alignflow), keyed by a
hash of the spec that made them, so a changed spec builds anew and never reuses stale files.
`embedded:smollm2-135m` is a real pretrained model shipped on PyPI as a GGUF file (alignflow.models.gguf).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from alignflow.files import build_atomically, home

if TYPE_CHECKING:  # the builders import without pydantic (bench/device_check.py on a bare GPU image)
    from alignflow.config import EmbeddedSpec

PREFIX = "embedded:"
BUILD_VERSION = 5  # bump when the builders change what they make
SPLITS = ("sft", "prompts", "eval")
CONSTRAINT_SPLITS = tuple(f"ifeval-{s}" for s in SPLITS)  # the constraint suite (alignflow.embedded.constraints)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([BUILD_VERSION, *parts], sort_keys=True).encode()).hexdigest()[:12]


def data_dir(spec: EmbeddedSpec) -> Path:
    from alignflow.data.records import write_jsonl
    from alignflow.embedded.suite import SUITE_VERSION, add_flaws, make_splits

    sizes = {"sft": spec.sft_examples, "prompts": spec.prompt_examples, "eval": spec.eval_examples}
    flaws = spec.flaws.shares()

    def build(tmp: Path) -> None:
        for split, rows in make_splits(sizes, spec.seed, spec.tasks).items():
            write_jsonl(add_flaws(rows, flaws, spec.seed) if split == "sft" else rows, tmp / f"{split}.jsonl")

    # without flaws the key (and the data) is what it was before flaws existed
    key = _key(sizes, spec.seed, spec.tasks, SUITE_VERSION, *([flaws] if flaws else []))
    return build_atomically(home() / "data" / key, build)


def constraints_dir(spec: EmbeddedSpec) -> Path:
    from alignflow.data.records import write_jsonl
    from alignflow.embedded import constraints

    suite = spec.constraints
    sizes = {"sft": suite.sft_examples, "prompts": suite.prompt_examples, "eval": suite.eval_examples,
             "held_out": suite.held_out_examples}

    def build(tmp: Path) -> None:
        splits = constraints.make_splits(sizes, spec.seed, suite.types, suite.held_out_types, suite.max_constraints)
        for split, rows in splits.items():
            write_jsonl(rows, tmp / f"ifeval-{split}.jsonl")

    plain = hashlib.sha256(constraints.PLAIN_ANSWERS.read_bytes()).hexdigest()[:12]
    key = _key("constraints", constraints.SUITE_VERSION, plain, spec.seed, suite.model_dump(mode="json"))
    return build_atomically(home() / "data" / key, build)


def data_path(spec: EmbeddedSpec, name: str) -> str:
    split = name.removeprefix(PREFIX)
    if split in CONSTRAINT_SPLITS:
        return str(constraints_dir(spec) / f"{split}.jsonl")
    if split not in SPLITS:
        from alignflow.config import ConfigError

        raise ConfigError(f"{name!r}: unknown embedded split; use one of "
                          f"{[PREFIX + s for s in SPLITS + CONSTRAINT_SPLITS]}")
    return str(data_dir(spec) / f"{split}.jsonl")


def check_model_name(spec: EmbeddedSpec, name: str) -> str:
    """The model's name in the spec (or a packaged GGUF model's), or a ConfigError naming the known ones."""
    from alignflow.config import ConfigError
    from alignflow.models import gguf

    model = name.removeprefix(PREFIX)
    if model not in spec.models and gguf.packaged_source(name) is None:
        raise ConfigError(f"{name!r}: unknown embedded model; the spec defines {sorted(spec.models)}"
                          f" and {sorted(PREFIX + p for p in gguf.PACKAGED)} ship packaged")
    return model


def model_path(spec: EmbeddedSpec, name: str) -> str:
    from alignflow.embedded.models import build_base_model, train_tokenizer
    from alignflow.embedded.suite import WORDS, pretraining_text

    model = check_model_name(spec, name)
    hidden, layers, heads = spec.models[model]
    corpus_key = _key(spec.seed, spec.pretrain_docs, spec.vocab_size)
    texts = None

    def corpus() -> list[str]:
        nonlocal texts
        texts = texts or pretraining_text(spec.seed, spec.pretrain_docs)
        return texts

    tok_dir = build_atomically(home() / "tokenizers" / corpus_key,
                                lambda tmp: train_tokenizer(corpus() + [" ".join(WORDS)], spec.vocab_size)
                                .save_pretrained(tmp))
    key = _key(corpus_key, hidden, layers, heads, spec.pretrain_steps)

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        build_base_model(tmp, tokenizer, corpus(), hidden_size=hidden, num_layers=layers, num_heads=heads,
                         steps=spec.pretrain_steps, seed=spec.seed)
        shutil.rmtree(tmp / "_trainer", ignore_errors=True)

    return str(build_atomically(home() / "models" / f"{model}-{key}", build))


def resolve(spec: EmbeddedSpec, name: str, kind: str) -> str:
    """`embedded:<x>` -> a local path (building it if missing); a `.gguf` model file -> its converted
    safetensors directory (alignflow.models.gguf); anything else is returned as is."""
    from alignflow.models import gguf

    if kind == "model" and gguf.is_gguf(name):
        return str(gguf.converted_dir(name, home()))
    if not name.startswith(PREFIX):
        return name
    if kind == "model" and (packaged := gguf.packaged_source(name)) is not None:
        return str(gguf.converted_dir(packaged, home()))
    return data_path(spec, name) if kind == "data" else model_path(spec, name)

"""Loading models and tokenizers the same way in every stage: the device and attention kernel, safetensors
only (pickle-only weights are converted once, or refused), a LoRA adapter merged into its base on load,
`trust_remote_code` off unless a config turns it on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignflow.models.templates import FALLBACK_CHAT_TEMPLATE


def pick_device(setting: str = "auto") -> str:
    if setting == "cuda" and not torch.cuda.is_available():
        from alignflow.config import ConfigError

        raise ConfigError("device: the config asks for 'cuda' but torch sees no CUDA device")
    return setting if setting != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def attn_implementation(setting: str, device: str) -> str:
    """`auto`: FlashAttention 2 on CUDA when the `flash_attn` package is installed (it makes padding-free
    batches exact), else PyTorch's SDPA, which picks its own flash/memory-efficient kernel on CUDA."""
    import importlib.util

    if setting != "auto":
        return setting
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def model_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE  # saved with the tuned model's tokenizer
    return tokenizer


def is_adapter(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save/pickle files: loading one may run code


class UnsafeWeights(OSError):
    """A model directory whose weights exist only as pickle files (an OSError: the model cannot be
    loaded as it is, like a missing one)."""


def pickle_only(path: str | Path) -> list[str]:
    """The pickle weight files of a local model directory that has no safetensors weights; [] otherwise
    (safetensors present, a hub id, or no weights at all: transformers says what is missing)."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return []
    return sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES and f.name != "training_args.bin")


def refuse_pickle(path: str | Path) -> None:
    if files := pickle_only(path):
        raise UnsafeWeights(f"{path}: only pickle weights ({', '.join(files)}): alignflow loads safetensors "
                            "only, since unpickling can run code; for a base model you trust, set "
                            "base.allow_pickle_weights: true to convert it once to safetensors")


def unpickle_to_safetensors(path: str | Path, home: Path, trust_remote_code: bool = False) -> Path:
    """A pickle-only model directory converted once to safetensors (base.allow_pickle_weights): the weights
    are read by transformers with torch.load(weights_only=True), which restores tensors, not objects."""
    import shutil

    from transformers import AutoModelForCausalLM

    from alignflow.files import build_atomically
    from alignflow.refs import digest_path

    source = Path(path)
    target = home / "unpickled" / f"{source.name}-{digest_path(source).split(':')[-1][:12]}"

    def build(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=False, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
        model.save_pretrained(tmp, safe_serialization=True)
        for item in source.iterdir():  # tokenizer, chat template, generation config, code: all but weights
            if item.is_file() and item.suffix not in PICKLE_SUFFIXES and not (tmp / item.name).exists():
                shutil.copy2(item, tmp / item.name)

    return build_atomically(target, build)


def load_causal_lm(path: str, device: str, *, trust_remote_code: bool = False, revision: str | None = None,
                   merge_adapter: bool = True, attn: str | None = None):
    """Full weights or a PEFT adapter dir (merged into its base); safetensors only: a directory with only
    pickle weights is refused (UnsafeWeights) before anything is unpickled."""
    refuse_pickle(path)
    kwargs = dict(dtype=model_dtype(device), trust_remote_code=trust_remote_code, use_safetensors=True)
    if attn:
        kwargs["attn_implementation"] = attn
    if is_adapter(path):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, **kwargs)
        if merge_adapter:
            # peft froze the base weights under the adapter; merged, they are a plain model again, which
            # full fine-tuning on top of a LoRA SFT must be able to train
            model = model.merge_and_unload().requires_grad_(True)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, **kwargs)
    return model.to(device)

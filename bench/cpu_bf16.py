"""SmolLM2-135M LoRA SFT and DPO steps on CPU: fp32 (alignflow's CPU default) vs bf16 autocast, interleaved.

    python bench/cpu_bf16.py [--repeats 2]     # ~10 min on 2 cores: seconds and train loss per run, then medians

A side measurement for issue 27 (what makes alignflow's SFT slower than TRL's defaults on this machine): its CPU
has AMX and AVX512-BF16 (`torch.cpu._is_amx_tile_supported()`), where bf16 matmuls are fast; TRL's defaults train
in bf16 autocast, alignflow's CPU defaults (alignflow.training.args.CPU_TRAINER_DEFAULTS) in fp32. The recipe's
settings (configs/smollm2-ifeval.yaml, LoRA): 8 SFT steps on 96 of its rows, 6 DPO steps on 64 pairs (an SFT
answer against another row's). Results in docs/perf.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from alignflow import embedded  # noqa: E402
from alignflow.config import load_config  # noqa: E402
from alignflow.data.instructions import load_rows  # noqa: E402
from alignflow.models.loading import load_causal_lm, load_tokenizer  # noqa: E402
from alignflow.training.args import lora_config, trainer_args  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    repeats = parser.parse_args().repeats
    config = load_config(ROOT / "configs" / "smollm2-ifeval.yaml")
    model_path = str(embedded.resolve(config.embedded, "embedded:smollm2-135m", "model"))
    rows = load_rows(embedded.data_path(config.embedded, "embedded:ifeval-sft"))[:96]
    tokenizer = load_tokenizer(model_path)
    lora = lora_config(config.sft.lora)
    sft_rows = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    pairs = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["completion"],
                                "rejected": rows[(i + 7) % len(rows)]["completion"]} for i, r in enumerate(rows[:64])])

    def sft(bf16: bool, out: Path) -> float:
        args = trainer_args({**config.sft.trainer, "max_steps": 8, "logging_steps": 100, "bf16": bf16}, "cpu", 0, out)
        trainer = SFTTrainer(model=load_causal_lm(model_path, "cpu"), args=SFTConfig(**args), train_dataset=sft_rows,
                             processing_class=tokenizer, peft_config=lora)
        return trainer.train().training_loss

    def dpo(bf16: bool, out: Path) -> float:
        args = trainer_args({**config.dpo.trainer, "max_steps": 6, "logging_steps": 100, "bf16": bf16}, "cpu", 0, out,
                            0, "DPOConfig")
        trainer = DPOTrainer(model=load_causal_lm(model_path, "cpu"), args=DPOConfig(**args), train_dataset=pairs,
                             processing_class=tokenizer, peft_config=lora)
        return trainer.train().training_loss

    seconds: dict[tuple[str, bool], list[float]] = {}
    for _ in range(repeats):
        for name, run in (("sft", sft), ("dpo", dpo)):
            for bf16 in (False, True):  # interleaved: the machine's drift falls on both
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    loss = run(bf16, Path(tmp))
                    seconds.setdefault((name, bf16), []).append(time.perf_counter() - start)
                print(f"{name} {'bf16' if bf16 else 'fp32'}: {seconds[name, bf16][-1]:.1f} s, train loss {loss:.4f}",
                      flush=True)
    for name in ("sft", "dpo"):
        fp32, bf16 = (statistics.median(seconds[name, b]) for b in (False, True))
        print(f"{name}: fp32 {fp32:.1f} s, bf16 {bf16:.1f} s (medians): bf16 {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()

"""Baseline stage `rft`: rejection-sampling fine-tuning, i.e. TRL's SFTTrainer on the chosen answers of
the preference pairs only, with the DPO section's optimiser settings. It tells whether DPO's use of
the rejected answers pays beyond simply imitating the chosen ones.
"""

from __future__ import annotations

import dataclasses

from prefect import task
from prefect.cache_policies import NONE

from alignflow.config import DPOSection
from alignflow.refs import DatasetRef, ModelRef
from alignflow.tracking import RunContext
from tasks import check_training, preference_inputs, train_stage, trainer_arguments
from tasks.caching import stage_dir
from tasks.dpo import PREFERENCE_INPUTS
from tasks.stages import Stage, register


def sft_fields(args: dict) -> dict:
    """The DPO section's trainer arguments that mean the same to SFTConfig: shared optimiser and batch
    fields carry over; DPO's loss fields mean something else to SFTConfig and are left out."""
    from trl import SFTConfig

    known = {f.name for f in dataclasses.fields(SFTConfig)} - {"loss_type", "loss_weights"}
    return {k: v for k, v in args.items() if k in known}


def check(config, device: str, out_dir) -> None:
    args = sft_fields(trainer_arguments(config.dpo, "rft", device, config.seed, out_dir))
    check_training("rft", "rft", args, "dpo", config.dpo.launch, device)


@task(name="rft", cache_policy=NONE)
def rft(cfg: DPOSection, policy: ModelRef, pairs: DatasetRef, ctx: RunContext, name: str = "rft",
        cache_key: str | None = None) -> ModelRef:
    out_dir = stage_dir(ctx, name, cache_key)
    args = sft_fields(trainer_arguments(cfg, "rft", ctx.device, ctx.seed, out_dir / "trainer"))
    return train_stage(ctx, name, "dpo", cfg, "rft", args, policy, out_dir, cache_key,
                       inputs=lambda: preference_inputs(policy, pairs, name),
                       params={"policy": policy.uri, "variant": "rft"}, merge_adapter=True)


register(Stage(name="rft", task=rft, config={"cfg": "dpo"}, inputs=PREFERENCE_INPUTS,
               evaluated_as="rft", trains=True, baseline_of="dpo",
               enabled=lambda config: "rft" in config.dpo.baselines, check=check,
               describe="baseline: SFT on the chosen answers only (rejection-sampling fine-tuning)"))

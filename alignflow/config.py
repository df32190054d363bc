"""The experiment config: one YAML per experiment, validated by pydantic, overridable by dotted keys.

    alignflow run configs/default.yaml sft.trainer.learning_rate=1e-4 sample.num_candidates=8

Each stage has its own section. `trainer:` mappings are TRL's `SFTConfig` / `DPOConfig` fields as
is (so TRL's documentation is ours); their names are checked here, their values by TRL.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, SerializeAsAny, ValidationError,
                      field_validator, model_validator)

from alignflow.components import ENGINES, PAIRS, RANKERS, Engine, PairStrategy, Ranker
from alignflow.constraints import HELD_OUT_TYPES, REGISTRY, rewritable
from alignflow.training.trainers import TRAINERS


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads `1e-4` as a string (YAML 1.1); configs mean the number, as YAML 1.2 does."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?(?:[0-9][0-9_]*)?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def component(registry, default: str):
    """A config field holding a registered component: a name, or a mapping with `type` and the
    component's own keys (validated by the component's own schema: unknown keys are errors)."""
    return Field(default=default, validate_default=True), BeforeValidator(registry.validate)


_ranker, _validate_ranker = component(RANKERS, "verifier")
_pairs, _validate_pairs = component(PAIRS, "best_worst")
_engine, _validate_engine = component(ENGINES, "transformers")
RankerField = Annotated[SerializeAsAny[Ranker], _validate_ranker]
PairsField = Annotated[SerializeAsAny[PairStrategy], _validate_pairs]
EngineField = Annotated[SerializeAsAny[Engine], _validate_engine]


class DataSource(Section):
    """Where a dataset comes from: `embedded:<split>`, a local .json/.jsonl/.parquet file, or a hub name."""

    path: str
    split: str = "train"  # for hub datasets
    limit: int | None = Field(default=None, gt=0)  # first N rows, for quick runs


class FlawSpec(Section):
    """Flawed demonstrations in the embedded SFT split (the seed's "errors or a narrow style get baked
    in"): each a share of the SFT rows, drawn without overlap. `wrong`: a wrong value of the same task
    type; `verbose`: the right answer, then a rambling clause; `runon`: the right answer repeated past
    any sensible length (an answer that does not stop). Rows carry a `flaw` field naming theirs."""

    wrong: float = Field(default=0.0, ge=0, le=1)
    verbose: float = Field(default=0.0, ge=0, le=1)
    runon: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _at_most_all(self) -> FlawSpec:
        if self.wrong + self.verbose + self.runon > 1:
            raise ValueError("the flaw shares add up to more than 1")
        return self

    def shares(self) -> dict[str, float]:
        return {kind: share for kind, share in self.model_dump().items() if share > 0}


class ConstraintSuiteSpec(Section):
    """The embedded constraint suite (`embedded:ifeval-sft`, `-prompts`, `-eval`; alignflow.embedded.constraints):
    writing requests with 1..max_constraints verifiable constraints each. `held_out_types` never reach SFT or
    sampling; the eval split has `eval_examples` rows of seen types (task `seen`) and `held_out_examples` of
    one held-out type each (task `held_out`). `types`: the seen types (None: every type with a rewrite)."""

    sft_examples: int = Field(default=200, gt=0)
    prompt_examples: int = Field(default=120, gt=0)
    eval_examples: int = Field(default=120, gt=0)
    held_out_examples: int = Field(default=60, ge=0)
    types: list[str] | None = None
    held_out_types: list[str] = Field(default_factory=lambda: list(HELD_OUT_TYPES))
    max_constraints: int = Field(default=3, ge=1, le=3)

    @field_validator("types", "held_out_types")
    @classmethod
    def _known_types(cls, types: list[str] | None) -> list[str] | None:
        unknown = [t for t in types or [] if t not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown constraint types {unknown}; choose from {sorted(REGISTRY)}")
        return types

    @model_validator(mode="after")
    def _types_apart(self) -> ConstraintSuiteSpec:
        if both := sorted(set(self.types or []) & set(self.held_out_types)):
            raise ValueError(f"constraint types both seen and held out: {both}")
        if cannot := [t for t in self.types or [] if t not in rewritable()]:
            raise ValueError(f"types {cannot} have no rewrite, so no demonstration can be built: hold them out")
        return self


class EmbeddedSpec(Section):
    """The built-in default: a verifiable instruction suite and tiny base models trained here."""

    seed: int = 0
    sft_examples: int = Field(default=3000, gt=0)
    prompt_examples: int = Field(default=300, gt=0)
    eval_examples: int = Field(default=200, gt=0)
    pretrain_docs: int = Field(default=4000, gt=0)
    pretrain_steps: int = Field(default=300, gt=0)
    vocab_size: int = Field(default=1024, ge=259)  # 259 = bytes + 3 special tokens: one token per character
    flaws: FlawSpec = FlawSpec()  # flawed demonstrations in the SFT split; none by default
    constraints: ConstraintSuiteSpec = ConstraintSuiteSpec()  # the `embedded:ifeval-*` splits
    tasks: list[str] | None = None  # task types of the suite (alignflow.embedded.suite.TASKS); None = all
    # name -> (hidden_size, num_layers, num_heads)
    models: dict[str, tuple[int, int, int]] = {"tiny-s": (64, 2, 4), "tiny-m": (128, 4, 4)}


    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str] | None) -> list[str] | None:
        from alignflow.embedded.suite import TASKS

        unknown = [t for t in tasks or [] if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task types {unknown}; choose from {sorted(TASKS)}")
        return tasks


class LoraSection(Section):
    enabled: bool = False
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class BaseSection(Section):
    candidates: list[str] = Field(min_length=1)  # `embedded:<name>`, a local dir or a hub id
    memory_budget_gb: float = Field(default=16.0, gt=0)  # training memory each candidate must fit
    score_examples: int = Field(default=64, gt=0)  # SFT rows held out to score candidates on
    trust_remote_code: bool = False
    revision: str | None = None
    # a local candidate with only pickle weights (pytorch_model.bin) is refused unless this is true; then it is
    # converted once to safetensors (tensors only: torch.load(weights_only=True)) and every stage loads that
    allow_pickle_weights: bool = False


class LaunchSection(Section):
    """How a training stage's trainer runs (alignflow.training.run): in the stage's own process (the default), or
    under `accelerate launch` as `num_processes` processes in all, over `num_machines` machines, with an
    accelerate config file (infra/accelerate/: DDP, FSDP2, DeepSpeed ZeRO-2/3, multi-node) saying how.
    `mixed_precision` is passed to accelerate and sets the trainer's bf16/fp16 unless `trainer:` does."""

    num_processes: int | None = Field(default=None, ge=1)  # None: 1, or what `config_file` says
    num_machines: int = Field(default=1, ge=1)
    machine_rank: int = Field(default=0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int | None = Field(default=None, ge=0, le=65535)
    config_file: str | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    _file_type: str | None = PrivateAttr(default=None)  # the config file's distributed type, read by the validator

    @model_validator(mode="after")
    def _coherent(self) -> LaunchSection:
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank {self.machine_rank} must be below num_machines {self.num_machines}")
        if self.num_machines > 1 and not (self.main_process_ip or self.config_file):
            raise ValueError("num_machines > 1 needs main_process_ip (the rank-0 machine's address) or a config_file")
        if self.config_file is not None:
            from accelerate.commands.config.config_args import load_config_from_file

            if not Path(self.config_file).is_file():
                raise ValueError(f"config_file {self.config_file}: no such file")
            try:
                loaded = load_config_from_file(self.config_file)
            except (ValueError, TypeError, yaml.YAMLError) as err:
                raise ValueError(f"config_file {self.config_file}: accelerate cannot read it: {err}") from None
            self._file_type = str(loaded.distributed_type.value)  # read once, here
        return self

    def launched(self) -> bool:
        return self.config_file is not None or (self.num_processes or 1) > 1 or self.num_machines > 1

    def distributed_type(self) -> str:
        """What the config file asks for (accelerate's DistributedType value); DDP when launched without one."""
        if self.config_file is None:
            return "MULTI_GPU" if self.launched() else "NO"
        return self._file_type


class TrainerSection(Section):
    trl_config: ClassVar[str]  # the TRL dataclass that `trainer` feeds
    trainer: dict[str, Any] = {}
    lora: LoraSection = LoraSection()
    launch: LaunchSection = LaunchSection()
    # a resumable checkpoint every N optimizer steps (0: none); a rerun of a stage that died resumes
    # from the last complete one. `trainer.save_strategy`/`save_steps` override it.
    checkpoint_steps: int = Field(default=200, ge=0)
    # the attention kernel the model loads with; `auto`: FlashAttention 2 on CUDA when installed (then SFT
    # batches are padding-free), else PyTorch SDPA. The resolved value is logged with the stage.
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "auto"
    # rows longer than `trainer.max_length` tokens (TRL's default 1024) are counted and reported, then truncated
    # by TRL (`truncate`, its `truncation_mode`) or left out (`drop`); a row whose prompt alone fills max_length
    # is left out either way (no answer token would remain to learn from)
    overlength: Literal["truncate", "drop"] = "truncate"

    @field_validator("trainer")
    @classmethod
    def _known_trl_fields(cls, trainer: dict[str, Any]) -> dict[str, Any]:
        import trl

        known = {f.name for f in dataclasses.fields(getattr(trl, cls.trl_config))}
        unknown = sorted(set(trainer) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}: not fields of TRL's {cls.trl_config}")
        if "output_dir" in trainer:
            raise ValueError("output_dir is set by alignflow (see `output_dir` at the top level)")
        return trainer


class SFTSection(TrainerSection):
    trl_config = TRAINERS["sft"].config
    data: DataSource


class WatchSection(Section):
    """What every preference stage watches while it trains (alignflow.health.preference_watch): a warning in
    the log, the stage's run (`alignflow.warnings`) and the report when a limit is passed. The defaults are
    not tripped by the shipped configs' healthy runs (docs/results.md), so a warning means something."""

    # nats per token the chosen answers' log-prob may fall from the first to the last quarter of training
    max_chosen_logp_drop: float = Field(default=1.0, ge=0)
    # the chosen answers' mean length (words) over the rejected answers': above it, the preference may be length
    max_length_ratio: float = Field(default=1.5, gt=1)


class DPOSection(TrainerSection):
    """Preference tuning. `rounds: k` repeats sample -> rank -> DPO from the latest policy (iterative
    DPO); `baselines` train the same way on the same pairs for comparison: `rft` (SFT on the chosen
    answers only: rejection-sampling fine-tuning) and `dpo_no_sft` (this DPO minus any `sft` loss term)."""

    trl_config = TRAINERS["dpo"].config
    rounds: int = Field(default=1, ge=1)
    baselines: list[str] = []  # stages registered as baselines of `dpo` (checked by tasks.stages.check_config)
    # your own preference data (a local file or hub dataset: prompt/chosen/rejected, chosen/rejected with the
    # prompt implicit, or UltraFeedback-like scored answers; alignflow.data.preferences.load_preference_rows). Alone, DPO
    # trains on it after SFT and sampling and ranking are skipped; with `mix: true` it joins the on-policy pairs.
    data: DataSource | None = None
    mix: bool = False
    watch: WatchSection = WatchSection()  # for every preference stage: dpo, its baselines, each round

    @model_validator(mode="after")
    def _offline_has_one_round(self) -> DPOSection:
        if self.mix and self.data is None:
            raise ValueError("mix: true mixes dpo.data into the on-policy pairs: set dpo.data too")
        if self.data is not None and not self.mix and self.rounds > 1:
            raise ValueError("rounds > 1 samples from each new policy: with dpo.data alone there is nothing to "
                             "sample; set mix: true or rounds: 1")
        return self

    def on_policy(self) -> bool:
        """Whether the preference pairs include the SFT model's own ranked samples."""
        return self.data is None or self.mix


class GRPOSection(TrainerSection):
    """Online RL on the ranker's rewards: TRL's GRPOTrainer from the SFT model on the sampling prompts, beside DPO
    (`dpo.baselines: [grpo]`), evaluated and compared like it. Each step samples `trainer.num_generations`
    completions per prompt from the policy and scores them with `rewards` (pointwise ranker components, weighted by
    TRL's `trainer.reward_weights`); none given: the rank stage's ranker, the reward the DPO pairs were ranked by.
    `trainer:` keys are TRL's GRPOConfig (loss_type, beta, num_generations, max_completion_length, use_vllm ...)."""

    trl_config = TRAINERS["grpo"].config
    rewards: list[RankerField] = []

    def reward_rankers(self, rank: RankSection) -> list[Ranker]:
        """What it rewards with: its own `rewards`, else the rank stage's ranker (reward_weights are checked
        against these by the stage's check, tasks/grpo.py)."""
        return list(self.rewards) or [rank.ranker]


class SampleSection(Section):
    prompts: DataSource
    num_candidates: int = Field(default=4, ge=2)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=32, gt=0)
    batch_size: int = Field(default=64, gt=0)  # prompts per generate call
    engine: EngineField = _engine  # generation engine (alignflow.engines): transformers, ...


class RankSection(Section):
    # who scores the candidates: `verifier`, `checker`, `{type: reward_model, model: DIR_OR_HUB_ID}`,
    # `{type: ensemble, rankers: [...]}` (alignflow.rankers), `{type: judge, model: ..., url: ...}`
    # (alignflow.rankers.judge)
    ranker: RankerField = _ranker
    min_margin: float = Field(default=0.0, ge=0)  # pairs whose reward gap is at most this are ties
    pairs: PairsField = _pairs  # which candidates make a pair (alignflow.rankers.pairs): best_worst, best_random
    # rankers the ranking is compared with, candidate pair by candidate pair (agreement, Cohen's kappa);
    # one that needs reference answers is skipped when the prompts lack them
    agree_with: list[RankerField] = Field(default=["verifier"], validate_default=True)


class EvalSection(Section):
    data: DataSource
    max_new_tokens: int = Field(default=32, gt=0)
    batch_size: int = Field(default=64, gt=0)
    engine: EngineField = _engine  # generation engine for eval and promotion answers
    samples_logged: int = Field(default=50, ge=0)  # eval answers kept per model in the MLflow table
    pass_k: int = Field(default=8, ge=0)  # also sample k answers per prompt for pass@k; 0 = skip
    pass_temperature: float = Field(default=1.0, gt=0)
    bootstrap: int = Field(default=1000, ge=0)  # resamples for the 95% intervals; 0 = none
    # eval prompts answered side by side in the report, drawn at random (seeded), plus one where SFT and DPO differ
    report_prompts: int = Field(default=5, ge=0)
    # who judges the head-to-head against SFT (win rate): the verifier (needs reference answers that are
    # the one right answer) or the rank stage's ranker (a reward model: open-ended instructions)
    win_rate_by: Literal["verifier", "ranker"] = "verifier"


class RegistrySection(Section):
    """MLflow Model Registry: SFT and DPO models are registered; each new DPO model (or `candidate`) is `challenger`.
    It is refused (never champion, the first one included) when it is worse than its own SFT model or
    degenerate next to it (alignflow.health.promotion_refusals, limits below); otherwise `champion` moves
    to it only if the lower bound of the 95% bootstrap interval of its held-out accuracy minus the
    champion's (same prompts, paired) is above `min_gain`."""

    enabled: bool = True
    # the evaluated model that is the challenger: `dpo`, or a baseline the config trains (`grpo`, `rft` ...)
    candidate: str = "dpo"
    sft_model: str | None = None  # registered model names; default <experiment>-sft / <experiment>-<candidate>
    dpo_model: str | None = None  # the challenger's
    min_gain: float = Field(default=0.0, ge=0)
    # refused when the whole 95% paired interval of (accuracy - SFT's) lies below -max_loss_vs_sft (without
    # reference answers: the win rate's interval against SFT below 0.5 - max_loss_vs_sft)
    max_loss_vs_sft: float = Field(default=0.0, ge=0, le=1)
    max_eos_rate_drop: float = Field(default=0.25, ge=0, le=1)  # EOS rate below SFT's by more: answers that never end
    max_repetition_rise: float = Field(default=0.25, ge=0, le=1)  # share of repetitive answers above SFT's by more
    max_repetition_rate: float = Field(default=0.5, ge=0, le=1)  # share of repetitive answers, whatever SFT's is
    max_length_ratio: float = Field(default=1.5, gt=1)  # mean answer length (tokens) over SFT's


class PipelineConfig(Section):
    experiment: str = "alignflow"
    seed: int = 0
    output_dir: str = "outputs"  # stage outputs are written here, then logged to MLflow
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache: bool = True  # reuse a stage's recorded output when its config, inputs and code are unchanged
    embedded: EmbeddedSpec = EmbeddedSpec()
    base: BaseSection
    sft: SFTSection
    sample: SampleSection
    rank: RankSection = RankSection()
    dpo: DPOSection = DPOSection()
    grpo: GRPOSection = GRPOSection()
    eval: EvalSection
    registry: RegistrySection = RegistrySection()

    def grpo_runs(self) -> bool:
        """Whether the GRPO stage trains beside DPO (tasks/grpo.py)."""
        return "grpo" in self.dpo.baselines

    def grpo_rewards(self) -> list[Ranker]:
        """The rankers the GRPO stage rewards with (GRPOSection.reward_rankers)."""
        return self.grpo.reward_rankers(self.rank)

    @model_validator(mode="after")
    def _evaluation_has_a_judge(self) -> PipelineConfig:
        if self.eval.win_rate_by == "ranker" and self.rank.ranker.type == "human":
            raise ValueError("eval.win_rate_by: ranker: the human ranker labels the sampled candidates, not the "
                             "evaluation; judge it by the verifier or by a judge/reward model ranker")
        return self

    def digest(self) -> str:
        """Content hash of the resolved config: the `config_hash` tag on every MLflow run."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[leaf] = value


def _plain(value: Any) -> Any:
    """A loaded YAML value that JSON can hold (configs are hashed as JSON): a YAML alias that contains
    itself (`&a [*a]`) is refused here instead of overflowing the validator's recursion."""
    json.dumps(value, default=str)  # ValueError: circular reference
    return value


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or any(not part.strip() for part in key.split(".")):  # `=1`, ` =1`, `sft.=1`: no key to set
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            value = _plain(_load_yaml(raw))  # YAML typing: 1e-4 -> float, [a, b] -> list
        except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: an integer of 4300+ digits
            raise ConfigError(f"override {key.strip()!r}: the value is not valid YAML: {_first_line(err)}") from None
        parsed.append((key.strip(), value))
    return parsed


def load_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    path = Path(path)
    try:
        tree = _plain(_load_yaml(path.read_bytes().decode("utf-8"))) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return validate_config(tree, source=str(path), overrides=overrides)


SECRET_QUERY = re.compile(r"(token|secret|password|passwd|api[_-]?key|apikey|signature|sig|credential|auth)",
                          re.IGNORECASE)


def refuse_credentials(tree: Any, source: str, key: str = "") -> None:
    """A config value that carries a credential: a URL with a password (`https://user:token@host/...`) or a
    secret-looking query parameter (`?token=...`). The config is logged (MLflow params, config.json) and is the
    flow run's Prefect parameter, so such a value would leak: it is refused, naming the key, before anything
    runs. Keys belong in the environment or a Prefect Secret block (HF_TOKEN, `api_key_env`, `api_key_block`)."""
    from urllib.parse import parse_qsl, urlsplit

    if isinstance(tree, dict):
        for k, v in tree.items():
            refuse_credentials(v, source, f"{key}.{k}" if key else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            refuse_credentials(v, source, f"{key}[{i}]")
    elif isinstance(tree, str) and "://" in tree:
        try:
            url = urlsplit(tree)
            password, query = url.password, parse_qsl(url.query)
        except ValueError:  # not a URL after all (a bad port, brackets): nothing to find in it
            return
        if password or any(SECRET_QUERY.search(name) for name, _ in query):
            raise ConfigError(f"{source}: {key}: the URL carries a credential, which would be logged with the config; "
                              "give it through the environment or a Prefect Secret block instead (HF_TOKEN for the "
                              "hub, api_key_env/api_key_block for an endpoint)")


def validate_config(tree: dict, source: str = "config", overrides: list[str] = ()) -> PipelineConfig:
    """A config tree (left unchanged) with dotted overrides applied, validated."""
    if overrides:
        tree = copy.deepcopy(tree)
        for key, value in parse_overrides(list(overrides)):
            set_dotted(tree, key, value)
    refuse_credentials(tree, source)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            problems.append(f"{key}: {e['msg']}" + (f" (got {e['input']!r})" if e["type"] != "missing" else ""))
        raise ConfigError(f"{source}: invalid config\n  " + "\n  ".join(problems)) from None

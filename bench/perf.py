"""Performance benchmarks: each comparison runs its variants interleaved in one process on the same
model and data, `--repeats` times; the results file gives medians and ratios (never a timed test).

    python bench/perf.py                       # everything, 3 repeats -> docs/perf.md
    python bench/perf.py --only sft sample     # some comparisons
    python bench/perf.py --repeats 5 --out /tmp/perf.md
    python bench/perf.py --model smollm2 [--vllm PYTHON]   # SmolLM2-135M, the constraint recipe's settings

Comparisons (CPU, the embedded default's model and data; tokens are real, non-padding tokens):
- sft:    alignflow's SFT stage settings vs a plain SFTTrainer script with TRL's defaults (plus
          use_cpu) vs a raw PyTorch loop, one epoch over the same rows, same batch size and lr;
- dpo:    alignflow's DPO stage settings vs a plain DPOTrainer script with TRL's defaults, same pairs;
- sample: alignflow's batched sampling vs one generate call per sample vs one call per prompt
          (num_return_sequences), same prompts, same number of candidates.
Model loading and dataset preparation are outside the timed part; training is trainer.train().

`--model smollm2` runs sft, dpo and sample on SmolLM2-135M-Instruct with configs/smollm2-ifeval.yaml's settings
(LoRA for both trainer variants: the comparison is of trainer settings; no raw loop), its section of docs/perf.md
between markers; with `--vllm PYTHON` (an interpreter of infra/vllm-env.sh) sampling also through the vllm engine,
its worker's start and model load included, as the sample stage pays them.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of 20 trainings would drown the numbers
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from alignflow import embedded  # noqa: E402
from alignflow.config import load_config  # noqa: E402
from alignflow.data.instructions import load_rows  # noqa: E402
from alignflow.models.generate import generate, stop_token_ids  # noqa: E402
from alignflow.models.loading import load_causal_lm, load_tokenizer
from alignflow.training.args import trainer_args

SFT_ROWS, DPO_PAIRS, SAMPLE_PROMPTS = 960, 320, 64
SMOL_SFT_ROWS, SMOL_DPO_PAIRS, SMOL_PROMPTS = 64, 32, 16  # SmolLM2: 8 SFT and 4 DPO steps, 64 candidates per repeat
SMOL_BEGIN, SMOL_END = "<!-- perf:smollm2:begin -->", "<!-- perf:smollm2:end -->"


class Setup:
    lora = None  # the trainers' PEFT config (SmolSetup's: the recipe's LoRA)
    vllm = None  # an interpreter with vllm: sampling through the vllm engine too

    def __init__(self, config_path: Path):
        self.config = load_config(config_path)
        spec = self.config.embedded
        self.model_path = embedded.model_path(spec, "embedded:tiny-m")
        self.tokenizer = load_tokenizer(self.model_path)
        self.sft_rows = load_rows(embedded.data_path(spec, "embedded:sft"))[:SFT_ROWS]
        prompts = load_rows(embedded.data_path(spec, "embedded:prompts"))
        self.prompts = [r["prompt"] for r in prompts[:SAMPLE_PROMPTS]]
        rng = random.Random(0)
        by_task: dict[str, list[dict]] = {}
        for r in load_rows(embedded.data_path(spec, "embedded:sft"))[SFT_ROWS:]:
            by_task.setdefault(r["task"], []).append(r)
        self.pairs = []
        for r in load_rows(embedded.data_path(spec, "embedded:sft"))[SFT_ROWS:SFT_ROWS + DPO_PAIRS]:
            wrong = [o for o in by_task[r["task"]] if o["completion"][0]["content"] != r["completion"][0]["content"]]
            self.pairs.append({"prompt": r["prompt"], "chosen": r["completion"],
                               "rejected": rng.choice(wrong)["completion"]})

    def length(self, prompt, completion, max_length: int) -> int:
        ids = self.tokenizer.apply_chat_template(prompt + completion, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return min(len(ids), max_length)

    def model(self, path: str | None = None):
        torch.manual_seed(0)
        return load_causal_lm(path or self.model_path, "cpu")

    def policy(self) -> str:
        """An instruction-tuned policy to sample from (answers end with EOS, as in the flow): the base
        model after one epoch of SFT on the benchmark rows, saved once."""
        if getattr(self, "_policy", None) is None:
            from trl import SFTConfig, SFTTrainer

            self._tmp = tempfile.TemporaryDirectory()
            args = trainer_args({**self.config.sft.trainer, "num_train_epochs": 2}, "cpu", 0, Path(self._tmp.name) / "t")
            data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in self.sft_rows])
            trainer = SFTTrainer(model=self.model(), args=SFTConfig(**args), train_dataset=data,
                                 processing_class=self.tokenizer)
            trainer.train()
            trainer.model.generation_config.eos_token_id = stop_token_ids(self.tokenizer, trainer.model)
            trainer.save_model(self._tmp.name + "/policy")
            self.tokenizer.save_pretrained(self._tmp.name + "/policy")
            self._policy = self._tmp.name + "/policy"
        return self._policy


class SmolSetup(Setup):
    """SmolLM2-135M-Instruct with configs/smollm2-ifeval.yaml's settings and data: its SFT rows, its sampling
    prompts, pairs of an SFT answer against another row's (the timing does not depend on which is better)."""

    def __init__(self, vllm: str | None = None):
        from alignflow.training.args import lora_config

        self.config = load_config(ROOT / "configs" / "smollm2-ifeval.yaml")
        spec = self.config.embedded
        self.model_path = embedded.resolve(spec, "embedded:smollm2-135m", "model")
        self.tokenizer = load_tokenizer(self.model_path)
        sft = load_rows(embedded.data_path(spec, "embedded:ifeval-sft"))
        self.sft_rows = sft[:SMOL_SFT_ROWS]
        self.prompts = [r["prompt"] for r in load_rows(embedded.data_path(spec, "embedded:ifeval-prompts"),
                                                       require_reference=False)[:SMOL_PROMPTS]]  # constraints only
        self.pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": sft[-1 - i]["completion"]}
                      for i, r in enumerate(sft[SMOL_SFT_ROWS:SMOL_SFT_ROWS + SMOL_DPO_PAIRS])]
        self.lora = lora_config(self.config.sft.lora)
        self.dpo_lora = lora_config(self.config.dpo.lora)  # the recipe's DPO adapter (no dropout)
        self.vllm = vllm

    def policy(self) -> str:
        return self.model_path  # instruction-tuned already: its answers end


def cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16): where TRL's bf16 default is fast, so
    alignflow's settings are also timed in bf16 (`trainer.bf16: true`) beside its fp32 CPU default."""
    return not torch.cuda.is_available() and (torch.cpu._is_amx_tile_supported() or
                                              torch.cpu._is_avx512_bf16_supported())


def timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def reset_peak_rss() -> None:
    """Start this process's peak RSS (VmHWM) afresh: Linux resets it on writing 5 to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float | None:
    """This process's peak RSS since the last reset (VmHWM), in MiB; None where /proc is not there."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


# ---------------------------------------------------------------- SFT

def sft_variants(s: Setup) -> dict:
    from trl import SFTConfig, SFTTrainer

    from alignflow.training.run import CheckpointMarker

    cfg = s.config.sft
    batch, lr = cfg.trainer["per_device_train_batch_size"], cfg.trainer["learning_rate"]
    max_length = cfg.trainer.get("max_length", 1024)
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in s.sft_rows])
    tokens = sum(s.length(r["prompt"], r["completion"], max_length) for r in s.sft_rows)

    def alignflow(tmp, bf16: bool = False):
        args = trainer_args({**cfg.trainer, "num_train_epochs": 1} | ({"bf16": True} if bf16 else {}), "cpu", 0,
                            Path(tmp), cfg.checkpoint_steps)
        trainer = SFTTrainer(model=s.model(), args=SFTConfig(**args), train_dataset=data, processing_class=s.tokenizer,
                             callbacks=[CheckpointMarker()], peft_config=s.lora)
        return lambda: trainer.train()

    def trl_defaults(tmp):
        args = SFTConfig(output_dir=tmp, use_cpu=True, per_device_train_batch_size=batch, learning_rate=lr,
                         num_train_epochs=1, seed=0)
        trainer = SFTTrainer(model=s.model(), args=args, train_dataset=data, processing_class=s.tokenizer,
                             peft_config=s.lora)
        return lambda: trainer.train()

    def raw_loop(tmp):
        model = s.model()
        model.train()
        tok = s.tokenizer
        examples = []
        for r in s.sft_rows:
            prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = tok(full, add_special_tokens=False)["input_ids"][:max_length]
            examples.append((ids, [-100] * len(p_ids) + ids[len(p_ids):]))
        order = list(range(len(examples)))
        random.Random(0).shuffle(order)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        pad = tok.pad_token_id

        def run():
            for start in range(0, len(order), batch):
                chunk = [examples[i] for i in order[start:start + batch]]
                width = max(len(ids) for ids, _ in chunk)
                input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk])
                labels = torch.tensor([lab[:len(ids)] + [-100] * (width - len(ids)) for ids, lab in chunk])
                mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk])
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return run

    variants = {"alignflow": alignflow, "trl_defaults": trl_defaults, "raw_pytorch": raw_loop}
    if cpu_bf16():
        variants["alignflow_bf16"] = lambda tmp: alignflow(tmp, bf16=True)
    if s.lora is not None:  # the raw loop trains every weight
        del variants["raw_pytorch"]
    return {"tokens": tokens, "variants": variants}


# ---------------------------------------------------------------- DPO

def dpo_variants(s: Setup) -> dict:
    from trl import DPOConfig, DPOTrainer

    from alignflow.training.run import CheckpointMarker

    cfg = s.config.dpo
    lora = getattr(s, "dpo_lora", s.lora)
    batch, lr = cfg.trainer["per_device_train_batch_size"], cfg.trainer["learning_rate"]
    max_length = cfg.trainer.get("max_length", 1024)
    data = Dataset.from_list(s.pairs)
    tokens = sum(s.length(p["prompt"], p["chosen"], max_length) + s.length(p["prompt"], p["rejected"], max_length)
                 for p in s.pairs)

    def alignflow(tmp, bf16: bool = False):
        args = trainer_args({**cfg.trainer, "num_train_epochs": 1} | ({"bf16": True} if bf16 else {}), "cpu", 0,
                            Path(tmp), cfg.checkpoint_steps)
        own_ref = args.get("precompute_ref_log_probs")
        ref = None if own_ref or lora is not None else s.model()  # with LoRA: the adapter disabled
        trainer = DPOTrainer(model=s.model(), ref_model=ref, args=DPOConfig(**args), train_dataset=data,
                             processing_class=s.tokenizer, callbacks=[CheckpointMarker()], peft_config=lora)
        return lambda: trainer.train()

    def trl_defaults(tmp):
        args = DPOConfig(output_dir=tmp, use_cpu=True, per_device_train_batch_size=batch, learning_rate=lr,
                         num_train_epochs=1, seed=0)
        trainer = DPOTrainer(model=s.model(), args=args, train_dataset=data, processing_class=s.tokenizer,
                             peft_config=lora)
        return lambda: trainer.train()

    variants = {"alignflow": alignflow, "trl_defaults": trl_defaults}
    if cpu_bf16():
        variants["alignflow_bf16"] = lambda tmp: alignflow(tmp, bf16=True)
    return {"tokens": tokens, "variants": variants}


# ---------------------------------------------------------------- sampling

def sample_variants(s: Setup) -> dict:
    cfg = s.config.sample
    n, kw = cfg.num_candidates, dict(max_new_tokens=cfg.max_new_tokens)
    counted: dict[str, int] = {}

    def alignflow(tmp):
        model = s.model(s.policy())

        def run():
            out = generate(model, s.tokenizer, s.prompts, num_return_sequences=n, do_sample=True,
                           temperature=cfg.temperature, batch_size=cfg.batch_size, seed=0, **kw)
            counted["alignflow"] = sum(c["tokens"] for cands in out for c in cands)
        return run

    def one_call(model, prompt, k):
        tok = s.tokenizer
        stops = stop_token_ids(tok, model)
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, num_return_sequences=k, do_sample=True, temperature=cfg.temperature,
                             eos_token_id=stops, pad_token_id=tok.pad_token_id, top_k=None, **kw)
        total = 0
        for row in out[:, ids["input_ids"].shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), None)
            total += len(row) if cut is None else cut
        return total

    def baseline(label: str, calls: int, k: int):
        """`calls` generate calls per prompt, `k` candidates each (calls * k == n)."""
        def make(tmp):
            model = s.model(s.policy())

            @torch.inference_mode()
            def run():
                torch.manual_seed(0)
                counted[label] = sum(one_call(model, p, k) for p in s.prompts for _ in range(calls))
            return run
        return make

    per_sample, per_prompt = baseline("per_sample", n, 1), baseline("per_prompt", 1, n)
    variants = {"alignflow": alignflow, "per_sample": per_sample, "per_prompt": per_prompt}
    if isinstance(s, SmolSetup):  # its goal is against the per-prompt loop; one call per sample is the slowest
        del variants["per_sample"]
    if s.vllm:
        def vllm(tmp):
            from alignflow.components import ENGINES
            from alignflow.engines.base import Sampling

            engine = ENGINES.validate({"type": "vllm", "python": s.vllm, "gpu_memory_utilization": 0.2})

            def run():  # one worker per call, as the sample stage runs it: start and model load included
                out = engine.open(s.policy(), "cpu").generate(s.prompts, n=n, sampling=Sampling(cfg.temperature),
                                                              batch_size=cfg.batch_size, seed=0, **kw)
                counted["vllm"] = sum(c["tokens"] for cands in out for c in cands)
            return run
        variants["vllm"] = vllm
    return {"tokens": counted, "variants": variants}


# ---------------------------------------------------------------- the whole flow

def direct(config_path: str, out: str) -> None:
    """The flow's body with every Prefect task called as a plain function (Prefect not involved;
    MLflow still records, into its own store). Prints {"seconds": ...} as JSON."""
    import json

    import prefect

    from flows.pipeline import align

    prefect.Task.__call__ = lambda self, *args, **kwargs: self.fn(*args, **kwargs)
    config = load_config(config_path, ["cache=false", f"output_dir={out}/outputs"])
    start = time.perf_counter()
    align.fn(config)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def watch(cmd: list[str], env: dict, cwd: str) -> tuple[float, float, str]:
    """Run a command; (wall seconds, peak RSS in GB of its whole process tree, stdout)."""
    import subprocess

    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, root = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed with exit code {proc.returncode}")
    return time.perf_counter() - start, peak / 2**30, out


def flow_comparison(config_path: str, repeats: int) -> dict:
    """The whole flow under Prefect (temporary server) vs its body without Prefect, each in a fresh
    process, interleaved; the flow's own duration comes from its MLflow parent run (server start and
    imports excluded, reported apart). Then the largest stages alone, for peak memory."""
    import json

    from mlflow.tracking import MlflowClient

    bin_dir = Path(sys.executable).parent
    config_path = str(Path(config_path).resolve())
    rows: dict[str, list] = {"flow": [], "direct": [], "startup": [], "flow_rss": [], "direct_rss": []}
    stage_rss: dict[str, float] = {}
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "PREFECT_HOME": f"{tmp}/prefect"}
            wall, rss, out = watch([str(bin_dir / "alignflow"), "run", config_path, "cache=false",
                                    f"output_dir={tmp}/outputs"], env, tmp)
            parent_id = out.split("MLflow parent run: ")[1].split()[0]
            info = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).get_run(parent_id).info
            flow_s = (info.end_time - info.start_time) / 1000
            rows["flow"].append(flow_s)
            rows["startup"].append(wall - flow_s)
            rows["flow_rss"].append(rss)
            print(f"[flow] repeat {r + 1}/{repeats} with Prefect: {flow_s:.1f} s (+{wall - flow_s:.1f} s start), "
                  f"peak {rss:.2f} GB", flush=True)
            if r == repeats - 1:
                from tasks import stages

                heavy = [n for n, s in stages.stages().items() if (s.trains and not s.baseline_of) or n == "evaluate"]
                for stage in heavy:  # the heavy ones (sft, dpo, evaluate), each alone from this run's outputs
                    _, stage_rss[stage], _ = watch([str(bin_dir / "alignflow"), "stage", stage, "--from-run", parent_id,
                                                    "cache=false"], env, tmp)
                    print(f"[flow] {stage} alone: peak {stage_rss[stage]:.2f} GB", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "PREFECT_HOME": f"{tmp}/prefect"}
            _, rss, out = watch([sys.executable, __file__, "--direct", config_path, tmp], env, tmp)
            seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
            rows["direct"].append(seconds)
            rows["direct_rss"].append(rss)
            print(f"[flow] repeat {r + 1}/{repeats} stage functions directly: {seconds:.1f} s, peak {rss:.2f} GB",
                  flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"flow": med, "stage_rss": stage_rss}


# ---------------------------------------------------------------- driver

OUT_OF_PROCESS = {"vllm"}  # variants whose work runs in another process: this one's peak RSS says nothing


def run_comparison(name: str, spec: dict, repeats: int) -> dict:
    times: dict[str, list[float]] = {v: [] for v in spec["variants"]}
    tokens: dict[str, list[int]] = {v: [] for v in spec["variants"]}
    peaks: dict[str, list[float]] = {v: [] for v in spec["variants"]}
    for r in range(repeats):
        for variant, make in spec["variants"].items():  # interleaved: A, B, C, A, B, C, ...
            with tempfile.TemporaryDirectory() as tmp:
                gc.collect()
                reset_peak_rss()  # the variant's peak: its model load and setup included
                run = make(tmp)
                seconds = timed(run)
                if variant not in OUT_OF_PROCESS and (peak := peak_rss_mib()) is not None:
                    peaks[variant].append(peak)
            counted = spec["tokens"] if isinstance(spec["tokens"], int) else spec["tokens"][variant]
            times[variant].append(seconds)
            tokens[variant].append(counted)
            print(f"[{name}] repeat {r + 1}/{repeats} {variant}: {seconds:.2f} s, {counted / seconds:,.0f} tok/s",
                  flush=True)
    return {v: {"seconds": statistics.median(times[v]), "tok_s": statistics.median(
        t / s for t, s in zip(tokens[v], times[v])), "tokens": statistics.median(tokens[v]),
        "peak_mib": statistics.median(peaks[v]) if peaks[v] else None} for v in times}


SMOL_GOALS = {  # issue 27's, on SmolLM2
    "sample": [("alignflow", "per_prompt", 2.0)],
    "sft": [("alignflow", "trl_defaults", 1.0), ("alignflow_bf16", "trl_defaults", 1.0)],
    "dpo": [("alignflow", "trl_defaults", 1.0), ("alignflow_bf16", "trl_defaults", 1.0)],
}
GOALS = {  # (comparison, numerator, denominator, goal); alignflow_bf16 only where the CPU has native bf16
    "sft": [("alignflow", "trl_defaults", 1.3), ("alignflow_bf16", "trl_defaults", 1.0),
            ("alignflow", "raw_pytorch", 0.6)],
    "dpo": [("alignflow", "trl_defaults", 1.2), ("alignflow_bf16", "trl_defaults", 1.2)],
    "sample": [("alignflow", "per_sample", 10.0), ("alignflow", "per_prompt", 2.0)],
}


def write_results(results: dict, out: Path, repeats: int, command: str, wall: float, model: str = "tiny") -> None:
    title = "# Performance benchmarks (bench/perf.py)" if model == "tiny" else \
        "## SmolLM2-135M-Instruct (`--model smollm2`: configs/smollm2-ifeval.yaml's settings)"
    lines = [title, "",
             f"- command: `{command}`",
             f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}), "
             f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, "
             f"Python {platform.python_version()}",
             "- versions: " + ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "trl", "prefect",
                                                                       "mlflow")),
             f"- {repeats} repeats per variant, interleaved in one process; medians; tokens are real (non-padding) "
             f"tokens; wall time {wall / 60:.1f} min", ""]
    lines += ["## Goals" if model == "tiny" else "### Goals", "", "| comparison | ratio | goal | met |",
              "|---|---|---|---|"]
    for name, goals in (GOALS if model == "tiny" else SMOL_GOALS).items():
        if name not in results:
            continue
        for a, b, goal in goals:
            if a not in results[name] or b not in results[name]:
                continue
            ratio = results[name][a]["tok_s"] / results[name][b]["tok_s"]
            lines.append(f"| {name}: {a} / {b} | {ratio:.2f}× | ≥ {goal}× | {'yes' if ratio >= goal else '**no**'} |")
    if "flow" in results:
        f, stages = results["flow"]["flow"], results["flow"]["stage_rss"]
        ratio, largest = f["flow"] / f["direct"], max(stages.values())
        lines.append(f"| flow: with Prefect / stage functions directly (wall) | {ratio:.3f}× | ≤ 1.05× | "
                     f"{'yes' if ratio <= 1.05 else '**no**'} |")
        lines.append(f"| flow: peak RSS / largest stage alone | {f['flow_rss'] / largest:.2f}× | ≤ 1.2× | "
                     f"{'yes' if f['flow_rss'] / largest <= 1.2 else '**no**'} |")
    for name, variants in results.items():
        if name == "flow":
            f, stages = variants["flow"], variants["stage_rss"]
            lines += ["", "## flow", "", "| | median |", "|---|---|",
                      f"| whole flow under Prefect (MLflow parent run start to end) | {f['flow']:.1f} s |",
                      f"| same flow body, tasks called as plain functions (no Prefect) | {f['direct']:.1f} s |",
                      f"| process start, imports and Prefect's temporary server (excluded above) | {f['startup']:.1f} s |",
                      f"| peak RSS, whole flow (process tree, incl. the temporary server) | {f['flow_rss']:.2f} GB |",
                      f"| peak RSS, plain-function flow | {f['direct_rss']:.2f} GB |"]
            lines += [f"| peak RSS, `alignflow stage {k}` alone | {v:.2f} GB |" for k, v in stages.items()]
            continue
        heading = "##" if model == "tiny" else "###"
        lines += ["", f"{heading} {name}", "", "| variant | median s | real tokens | tokens/s | peak RSS MiB |",
                  "|---|---|---|---|---|"]
        peak = lambda m: "–" if m.get("peak_mib") is None else f"{m['peak_mib']:,.0f}"  # noqa: E731
        lines += [f"| {v} | {m['seconds']:.2f} | {m['tokens']:,.0f} | {m['tok_s']:,.0f} | {peak(m)} |"
                  for v, m in variants.items()]
    if model != "tiny":  # its own section of the file, between markers, before the reading
        text = out.read_text() if out.exists() else "# Performance benchmarks (bench/perf.py)\n"
        block = "\n".join([SMOL_BEGIN, *lines, SMOL_END])
        if SMOL_BEGIN in text:
            text = text.split(SMOL_BEGIN)[0] + block + text.split(SMOL_END, 1)[1]
        elif "\n## Reading" in text:
            text = text.replace("\n## Reading", "\n" + block + "\n\n## Reading", 1)
        else:
            text += "\n" + block + "\n"
        out.write_text(text)
        return
    kept = ""  # the hand-written reading below the tables survives a rerun
    if out.exists() and "\n## Reading" in out.read_text():
        kept = "\n## Reading" + out.read_text().split("\n## Reading", 1)[1]
    out.write_text("\n".join(lines) + "\n" + kept)


MAKERS = {"sft": sft_variants, "dpo": dpo_variants, "sample": sample_variants}  # stage -> variants compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    benches = [*MAKERS, "flow"]  # the stage comparisons, then the whole flow
    parser.add_argument("--only", nargs="*", choices=benches, default=benches)
    parser.add_argument("--flow-repeats", type=int, default=1, help="the whole default flow takes ~3 min a run")
    parser.add_argument("--direct", nargs=2, metavar=("CONFIG", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "perf.md"))
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                        help="tiny: the embedded default's model; smollm2: SmolLM2-135M with the constraint recipe")
    parser.add_argument("--vllm", default=None, metavar="PYTHON", help="with --model smollm2: sample through vLLM too")
    args = parser.parse_args()
    if args.direct:
        return direct(*args.direct)
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.time()
    if args.model == "smollm2":
        args.only = [name for name in args.only if name != "flow"]  # the whole flow: the recipe's own wall time
    setup = (SmolSetup(args.vllm) if args.model == "smollm2" else Setup(Path(args.config))) \
        if set(args.only) - {"flow"} else None
    results = {name: run_comparison(name, MAKERS[name](setup), args.repeats) for name in args.only if name != "flow"}
    if "flow" in args.only:
        results["flow"] = flow_comparison(args.config, args.flow_repeats)
    write_results(results, Path(args.out), args.repeats, "python bench/perf.py " + " ".join(sys.argv[1:]),
                  time.time() - start, args.model)
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()

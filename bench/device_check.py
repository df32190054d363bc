"""alignflow's SFT, sampling and DPO code paths on one CUDA GPU, side by side with plain TRL defaults; its GRPO step.

    bash bench/device_check.sh OUT.json              # on a CUDA machine: <= 8 min on one H100 / H200
    bash bench/device_check.sh --dry-run OUT.json    # here, on CPU: the same code on tiny models

For a Llama- and a Qwen2-architecture model of ~0.5B parameters built from a config (random weights:
speed does not depend on them) it measures, for alignflow's path (alignflow.models's per-device
defaults, alignflow.training's trainers, alignflow.models.generate.generate) and for plain TRL defaults:
SFT tokens/s and MFU (6 x non-embedding parameters x tokens/s over the card's dense bf16 peak;
attention FLOPs left out), sampling tokens/s, DPO pairs/s, peak GPU memory, and which fast paths were
active (attention kernel, bf16, padding-free, Liger, torch.compile). Figures go to the JSON file named
on the command line, and a table to stdout.

Imports neither Prefect, MLflow nor pydantic: the GPU image has none of them (checked on
sys.modules before the figures are written). `--dry-run` runs everything on CPU with tiny models and
skips only CUDA calls (memory statistics, the device name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from alignflow.embedded.models import train_tokenizer  # noqa: E402
from alignflow.embedded.suite import TASKS, pretraining_text  # noqa: E402
from alignflow.models.generate import generate
from alignflow.models.loading import attn_implementation, load_causal_lm, load_tokenizer  # noqa: E402
from alignflow.training.args import cuda_trainer_defaults, needs_ref_copy, trainer_args
from alignflow.training.run import active_paths  # noqa: E402
from alignflow.training.trainers import dpo_trainer, grpo_trainer, sft_trainer

# dense bf16 peak of the cards this check is meant for (TFLOP/s, SXM, without sparsity)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}

# ~0.5B parameters each; the Qwen2 one is Qwen2.5-0.5B's shape
ARCHS = {
    "llama": dict(model_type="llama", vocab_size=32000, hidden_size=1536, intermediate_size=4096,
                  num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                  rope_theta=1e6),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

# the GPU recipe's trainer settings (configs/qwen2.5-0.5b-lora.yaml), minus the epochs
SFT_USER = {"per_device_train_batch_size": 8, "learning_rate": 2e-5, "logging_steps": 1, "max_length": 1024}
DPO_USER = {"per_device_train_batch_size": 8, "learning_rate": 5e-7, "beta": 0.1, "logging_steps": 1,
            "max_length": 1024}
# the grpo stage: 2 prompts x 4 completions per step, answers of the real-model recipe's length
GRPO_USER = {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 128,
             "learning_rate": 1e-6, "logging_steps": 1}


class StepTimer:
    """Wall time and token count between the end of warm-up and the last step (TRL's `num_tokens`)."""

    def __init__(self, warmup: int, device: str):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if device == "cuda":
                    torch.cuda.synchronize()
                if state.global_step == warmup:
                    timer.start = time.perf_counter()
                    timer.start_step = state.global_step
                timer.end, timer.end_step = time.perf_counter(), state.global_step

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "num_tokens" in logs:
                    timer.tokens[state.global_step] = float(logs["num_tokens"])

        self.callback, self.tokens = Callback(), {}
        self.start = self.end = None
        self.start_step = self.end_step = 0

    def seconds(self) -> float:
        return self.end - self.start

    def steps(self) -> int:
        return self.end_step - self.start_step

    def tokens_between(self) -> float | None:
        if self.start_step in self.tokens and self.end_step in self.tokens:
            return self.tokens[self.end_step] - self.tokens[self.start_step]
        return None


def build_assets(root: Path, dry_run: bool) -> tuple[Path, list[dict], list[dict], list[list[dict]]]:
    """A ChatML tokenizer trained here, SFT rows whose answers are prose of varied length (padding
    matters), preference pairs and sampling prompts; all from the embedded suite's generators."""
    rng = random.Random(0)
    docs = pretraining_text(0, 400 if not dry_run else 60)
    tokenizer = train_tokenizer(docs, vocab_size=4000 if not dry_run else 400)
    tok_dir = root / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    rows = []
    for i in range(256 if not dry_run else 24):
        instruction, input_text, _ = rng.choice(list(TASKS.values()))(rng)
        answer = " ".join(rng.sample(docs, rng.randint(1, 6 if not dry_run else 2)))
        rows.append({"prompt": [{"role": "user", "content": f"{instruction}\n\n{input_text}"}],
                     "completion": [{"role": "assistant", "content": answer}]})
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[(i + 1) % len(rows)]["completion"]}
             for i, r in enumerate(rows)]
    prompts = [r["prompt"] for r in rows[:64 if not dry_run else 4]]
    return tok_dir, rows, pairs, prompts


def build_model(arch: str, tok_dir: Path, out: Path, device: str, dry_run: bool) -> tuple[Path, dict]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    spec = dict(ARCHS[arch])
    if dry_run:
        spec |= TINY | {"vocab_size": len(tokenizer)}
    config = AutoConfig.for_model(**spec, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, max_position_embeddings=4096)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    non_embedding = params - (0 if config.tie_word_embeddings else embedding)  # the LM head's matmul counts
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    return out, {"params": params, "flop_params": non_embedding}


def peak_memory_gb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def reset_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_sft(model_dir: Path, rows, device: str, steps: int, warmup: int, alignflow_path: bool, out: Path) -> dict:
    from transformers import AutoTokenizer

    reset_memory(device)
    timer = StepTimer(warmup, device)
    if alignflow_path:
        attn = attn_implementation("auto", device)
        args = trainer_args({**SFT_USER, "max_steps": steps}, device, 0, out, 0, "SFTConfig", attn)
        model, tokenizer = load_causal_lm(str(model_dir), device, attn=attn), load_tokenizer(str(model_dir))
        trainer = sft_trainer(model, tokenizer, rows, args, callbacks=[timer.callback])
    else:  # plain TRL: its own defaults, the model given by path as TRL's scripts do
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(output_dir=str(out), per_device_train_batch_size=SFT_USER["per_device_train_batch_size"],
                         max_steps=steps, logging_steps=1, report_to="none", use_cpu=device == "cpu",
                         **({"bf16": False} if device == "cpu" else {}))
        trainer = SFTTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[timer.callback])
    trainer.train()
    paths = active_paths(trainer, trainer.model)
    paths["gradient_checkpointing"] = bool(trainer.args.gradient_checkpointing)
    tokens = timer.tokens_between()
    result = {"steps_timed": timer.steps(), "seconds": round(timer.seconds(), 3),
              "tokens_per_s": round(tokens / timer.seconds(), 1) if tokens else None,
              "peak_memory_gb": peak_memory_gb(device), "active": paths, "world_size": trainer.args.world_size,
              "distributed_type": trainer.accelerator.distributed_type.value}
    del trainer
    return result


def run_dpo(model_dir: Path, pairs, device: str, steps: int, warmup: int, alignflow_path: bool, out: Path) -> dict:
    from transformers import AutoTokenizer

    reset_memory(device)
    timer = StepTimer(warmup, device)
    batch = DPO_USER["per_device_train_batch_size"]
    if alignflow_path:
        attn = attn_implementation("auto", device)
        args = trainer_args({**DPO_USER, "max_steps": steps}, device, 0, out, 0, "DPOConfig", attn)
        model, tokenizer = load_causal_lm(str(model_dir), device, attn=attn), load_tokenizer(str(model_dir))
        ref = load_causal_lm(str(model_dir), device, attn=attn) if needs_ref_copy(args, False) else None
        trainer = dpo_trainer(model, tokenizer, pairs, args, ref_model=ref, callbacks=[timer.callback])
    else:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, logging_steps=1,
                         report_to="none", use_cpu=device == "cpu", **({"bf16": False} if device == "cpu" else {}))
        trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(pairs),
                             processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[timer.callback])
    trainer.train()
    result = {"steps_timed": timer.steps(), "seconds": round(timer.seconds(), 3),
              "pairs_per_s": round(batch * timer.steps() / timer.seconds(), 2),
              "peak_memory_gb": peak_memory_gb(device), "active": active_paths(trainer, trainer.model)}
    del trainer
    return result


@torch.inference_mode()
def run_sampling(model_dir: Path, prompts, device: str, new_tokens: int, alignflow_path: bool) -> dict:
    """4 candidates per prompt. Random weights never emit EOS, so both paths generate exactly
    `new_tokens` per candidate: equal work, compared by time."""
    reset_memory(device)
    model, tokenizer = load_causal_lm(str(model_dir), device), load_tokenizer(str(model_dir))
    n, batch_size = 4, 16
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start, generated = time.perf_counter(), 0
    if alignflow_path:
        outputs = generate(model, tokenizer, prompts, num_return_sequences=n, do_sample=True, max_new_tokens=new_tokens,
                           batch_size=batch_size)
        generated = sum(o["tokens"] for outs in outputs for o in outs)
    else:  # one plain generate per batch, transformers' num_return_sequences
        tokenizer.padding_side = "left"
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            out = model.generate(**batch, do_sample=True, num_return_sequences=n, max_new_tokens=new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
            generated += int((out[:, batch["input_ids"].shape[1]:] != tokenizer.pad_token_id).sum())
    sync()
    seconds = time.perf_counter() - start
    return {"candidates": len(prompts) * n, "seconds": round(seconds, 3), "tokens_per_s": round(generated / seconds, 1),
            "peak_memory_gb": peak_memory_gb(device),
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def run_launched_sft(model_dir: Path, rows, device: str, steps: int, warmup: int, out: Path) -> dict:
    """The SFT path under `accelerate launch --multi_gpu`, one process per card (2 CPU ranks over gloo in the
    dry run, as alignflow.training.run launches them): world size and distributed type as the trainer saw them,
    and tokens/s over all ranks (TRL's num_tokens is gathered across processes)."""
    import subprocess

    n = torch.cuda.device_count() if device == "cuda" else 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows))
    env = {**os.environ}
    if device == "cpu":
        env |= {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--main_process_port", "0", "--dynamo_backend", "no", str(Path(__file__)),
           "--launch-worker", str(model_dir), str(out), "--out", str(out / "result.json"), "--steps", str(steps),
           "--warmup", str(warmup)] + (["--dry-run"] if device == "cpu" else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"processes": n, "error": (done.stdout + done.stderr)[-2000:]}
    return {"processes": n, **json.loads((out / "result.json").read_text())}


def launch_worker(model_dir: str, out: Path, result_file: str, steps: int, warmup: int, device: str) -> None:
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rows = json.loads((out / "rows.json").read_text())
    result = run_sft(Path(model_dir), rows, device, steps, warmup, True, out / f"rank-{os.environ.get('RANK')}")
    if os.environ.get("RANK") == "0":
        Path(result_file).write_text(json.dumps(result))


def environment(device: str) -> dict:
    import importlib.util

    import transformers
    import trl

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
            "liger_installed": importlib.util.find_spec("liger_kernel") is not None}
    if device == "cuda":
        name = torch.cuda.get_device_name()
        info |= {"device": name, "cuda": torch.version.cuda, "bf16_supported": torch.cuda.is_bf16_supported(),
                 "sdpa_flash_enabled": torch.backends.cuda.flash_sdp_enabled(),
                 "peak_bf16_tflops": next((v for k, v in PEAK_TFLOPS.items() if k in name), None)}
    else:
        info |= {"device": "cpu (dry run)", "peak_bf16_tflops": None}
    return info


def mfu(tokens_per_s: float | None, flop_params: int, peak_tflops: float | None) -> float | None:
    if not tokens_per_s or not peak_tflops:
        return None
    return round(6 * flop_params * tokens_per_s / (peak_tflops * 1e12), 4)


def shorter_is_better(completions, **_) -> list[float]:
    """The check's reward: needs no model (random weights never end an answer, so every completion runs to
    max_completion_length and the work per step is fixed)."""
    return [-float(len(c[-1]["content"] if isinstance(c, list) else c)) for c in completions]


def run_grpo(model_dir: Path, prompts, device: str, steps: int, warmup: int, out: Path) -> dict:
    """alignflow's grpo stage trainer (alignflow.training.trainers.grpo_trainer): generation by transformers, or
    by TRL's vLLM colocate mode where vLLM is installed (the GPU image usually lacks it)."""
    import importlib.util

    from alignflow.training.rewards import REFERENCE_COLUMN

    reset_memory(device)
    timer = StepTimer(warmup, device)
    attn = attn_implementation("auto", device)
    vllm = device == "cuda" and importlib.util.find_spec("vllm") is not None
    user = {**GRPO_USER, "max_steps": steps}
    if vllm:
        user |= {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3}
    args = trainer_args(user, device, 0, out, 0, "GRPOConfig", attn)
    model, tokenizer = load_causal_lm(str(model_dir), device, attn=attn), load_tokenizer(str(model_dir))
    rows = [{"prompt": p, REFERENCE_COLUMN: "null"} for p in prompts]
    trainer = grpo_trainer(model, tokenizer, rows, args, callbacks=[timer.callback], rewards=[shorter_is_better],
                           device=device)
    trainer.train()
    completions = GRPO_USER["per_device_train_batch_size"] * timer.steps()
    result = {"steps_timed": timer.steps(), "seconds": round(timer.seconds(), 3),
              "steps_per_s": round(timer.steps() / timer.seconds(), 3),
              "completion_tokens_per_s": round(completions * GRPO_USER["max_completion_length"] / timer.seconds(), 1),
              "generation": "vllm colocate" if vllm else "transformers", "peak_memory_gb": peak_memory_gb(device),
              "active": active_paths(trainer, trainer.model)}
    del trainer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--archs", default="llama,qwen2")
    parser.add_argument("--launch-worker", nargs=2, metavar=("MODEL_DIR", "WORK_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    device = "cpu" if opts.dry_run else "cuda"
    if opts.launch_worker:  # one rank of run_launched_sft
        return launch_worker(opts.launch_worker[0], Path(opts.launch_worker[1]), opts.out, opts.steps, opts.warmup,
                             device)
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run to check the script on CPU")
    steps, warmup = (12, 2) if device == "cuda" else (3, 1)
    new_tokens = 128 if device == "cuda" else 8
    # what alignflow resolves on a CUDA card (also shown by the dry run, which cannot train with it)
    cuda_defaults = {stage: cuda_trainer_defaults(trl_config, user, attn_implementation("auto", "cuda"),
                                                  bf16=True if opts.dry_run else None)
                     for stage, user, trl_config in (("sft", SFT_USER, "SFTConfig"), ("dpo", DPO_USER, "DPOConfig"))}
    report = {"environment": environment(device), "dry_run": opts.dry_run, "archs": {},
              "cuda_defaults": cuda_defaults,
              "command": "bash bench/device_check.sh " + ("--dry-run " if opts.dry_run else "") + opts.out}
    with tempfile.TemporaryDirectory(prefix="alignflow-device-check-") as tmp:
        root = Path(tmp)
        tok_dir, rows, pairs, prompts = build_assets(root, opts.dry_run)
        for arch in opts.archs.split(","):
            t0 = time.perf_counter()
            model_dir, sizes = build_model(arch, tok_dir, root / arch, device, opts.dry_run)
            entry: dict = {**sizes}
            for path_name, ours in (("alignflow", True), ("trl_defaults", False)):
                sft = run_sft(model_dir, rows, device, steps, warmup, ours, root / f"{arch}-sft-{path_name}")
                sft["mfu"] = mfu(sft["tokens_per_s"], sizes["flop_params"], report["environment"]["peak_bf16_tflops"])
                entry[f"sft.{path_name}"] = sft
                entry[f"sample.{path_name}"] = run_sampling(model_dir, prompts, device, new_tokens, ours)
                entry[f"dpo.{path_name}"] = run_dpo(model_dir, pairs, device, steps, warmup, ours,
                                                    root / f"{arch}-dpo-{path_name}")
            entry["grpo.alignflow"] = run_grpo(model_dir, prompts, device, steps, warmup, root / f"{arch}-grpo")
            if arch == opts.archs.split(",")[0] and (device == "cpu" or torch.cuda.device_count() > 1):
                launched = run_launched_sft(model_dir, rows, device, steps, warmup, root / f"{arch}-sft-launched")
                one = entry["sft.alignflow"]["tokens_per_s"]
                launched["scaling_vs_one_process"] = (round(launched["tokens_per_s"] / one, 3)
                                                      if launched.get("tokens_per_s") and one else None)
                entry["sft.launched"] = launched
            for stage, unit in (("sft", "tokens_per_s"), ("sample", "tokens_per_s"), ("dpo", "pairs_per_s")):
                ours, theirs = entry[f"{stage}.alignflow"][unit], entry[f"{stage}.trl_defaults"][unit]
                entry[f"{stage}.ratio"] = round(ours / theirs, 3) if ours and theirs else None
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            report["archs"][arch] = entry
            print_arch(arch, entry)
    imported = sorted({m.split(".")[0] for m in sys.modules} & {"prefect", "mlflow", "pydantic"})
    if imported:
        sys.exit(f"the GPU code paths imported {imported}, which the GPU image does not have")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(report, indent=1))
    print(f"figures written to {opts.out}")


def print_arch(arch: str, entry: dict) -> None:
    print(f"\n== {arch}: {entry['params'] / 1e6:.0f}M parameters, {entry['seconds']} s")
    for stage, unit in (("sft", "tokens_per_s"), ("sample", "tokens_per_s"), ("dpo", "pairs_per_s")):
        for path_name in ("alignflow", "trl_defaults"):
            e = entry[f"{stage}.{path_name}"]
            extra = f" MFU {e['mfu']}" if e.get("mfu") is not None else ""
            print(f"  {stage:6s} {path_name:12s} {unit} {e[unit]}{extra}  peak {e['peak_memory_gb']} GB  "
                  f"{json.dumps(e.get('active', e.get('attn_implementation')))}")
        print(f"  {stage:6s} ratio alignflow / TRL defaults: {entry[f'{stage}.ratio']}")
    e = entry["grpo.alignflow"]
    print(f"  grpo   alignflow    steps_per_s {e['steps_per_s']} completion tokens/s {e['completion_tokens_per_s']}  "
          f"generation {e['generation']}  peak {e['peak_memory_gb']} GB")
    if "sft.launched" in entry:
        e = entry["sft.launched"]
        print(f"  sft    launched on {e['processes']} processes: world size {e.get('world_size')}, "
              f"{e.get('distributed_type')}, tokens_per_s {e.get('tokens_per_s')}, "
              f"x{e.get('scaling_vs_one_process')} of one process" + (f"\n{e['error']}" if "error" in e else ""))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

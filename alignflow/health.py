"""What users of DPO watch, measured: signs that preference tuning hurt a model, and the rules that keep
such a model from being promoted.

    from alignflow.health import answer_health, preference_watch, promotion_refusals

- **While training** (every preference stage): how far the policy's log-probability of the chosen and
  the rejected answers moved from the reference model's (TRL's `rewards/*` / beta, per token of the
  chosen answers; TRL's raw `logps/*` kept beside them), and the length gap of the pairs it trains on.
  A chosen log-prob that falls (both falling while the loss looks fine is the classic DPO failure), or
  chosen answers much longer than rejected ones (the preference may be for length), is a warning.
- **At evaluation** (every model): mean answer length in tokens, the repetition rate, EOS rate, and for
  each preference-trained model the change against its SFT model.
- **At promotion**: a challenger worse than its SFT model, or degenerate next to it, is refused with
  the reason and the numbers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from alignflow.config import RegistrySection, WatchSection

REPEAT_N = 8  # characters per n-gram of the repetition measure
REPETITIVE = 0.5  # an answer whose seq-rep is at least this is counted as repetitive


def repetition(text: str, n: int = REPEAT_N) -> float:
    """seq-rep-n of one answer: 1 - distinct n-grams / n-grams (Welleck et al. 2019, "Neural text
    degeneration with unlikelihood training"), over characters with whitespace collapsed rather than over
    tokens, so it reads the same for any tokenizer and sees repetition without spaces (`2222222222…`).
    Ordinary prose scores near 0, a phrase said over and over near 1. Chosen over a compression ratio,
    which over-rates short answers (a 20-character answer does not compress at all). An answer shorter
    than 3n characters is read in shorter n-grams (a third of its length), so a short collapse
    (`111111111111`) still shows; under 6 characters nothing can be told: 0."""
    text = " ".join(text.split())
    n = min(n, len(text) // 3)
    if n < 2:
        return 0.0
    grams = len(text) - n + 1
    return 1.0 - len({text[i:i + n] for i in range(grams)}) / grams


def answer_health(answers: list[dict]) -> dict[str, float]:
    """Over one model's answers ({text, ended, tokens}): mean length in tokens (`mean_tokens`; words
    miss a model that repeats one token without spaces), the share of repetitive answers
    (`repetition_rate`: seq-rep-8 >= 0.5) and the mean seq-rep-8 (`mean_repetition`)."""
    if not answers:
        return {}
    reps = np.array([repetition(a["text"]) for a in answers])
    return {"mean_tokens": float(np.mean([a.get("tokens") or 0 for a in answers])),
            "repetition_rate": float((reps >= REPETITIVE).mean()), "mean_repetition": float(reps.mean())}


def versus_sft(metrics: dict[str, float], sft: dict[str, float]) -> dict[str, float]:
    """A model's length, repetition and EOS rate against its SFT model's: the ratio of mean lengths in
    tokens and the changes of the two rates."""
    out = {}
    if "mean_tokens" in metrics and "mean_tokens" in sft:
        out["length_ratio_vs_sft"] = metrics["mean_tokens"] / max(sft["mean_tokens"], 1.0)
    for key in ("repetition_rate", "eos_rate"):
        if key in metrics and key in sft:
            out[f"{key}_change_vs_sft"] = metrics[key] - sft[key]
    return out


# --- while training ----------------------------------------------------------------------------------------

def answer_text(answer) -> str:
    """The text of a pair's answer: a conversational answer (a list of messages) or a plain string."""
    if isinstance(answer, list):
        return " ".join(str(m.get("content", "")) for m in answer)
    return str(answer)


def trend(values: list[float]) -> tuple[float, float]:
    """(start, end) of a logged series: the means of its first and last quarter (at least one value
    each), so one noisy logging step does not decide."""
    k = max(1, len(values) // 4)
    return float(np.mean(values[:k])), float(np.mean(values[-k:]))


def preference_watch(logged: dict[str, list[float]], beta: float, pairs: list[dict], chosen_tokens: float | None,
                     limits: WatchSection) -> tuple[dict[str, float], list[str]]:
    """A preference stage's health: metrics (`watch.*`) and warnings (plain sentences, empty when healthy).

    `logged`: TRL's series in step order, by name (`logps/chosen`, `logps/rejected`, `rewards/chosen`,
    `rewards/rejected`; absent or empty where the trainer logs none, as SFT-style baselines do); `beta`: the
    DPO beta those rewards are scaled by; `chosen_tokens`: the chosen answers' mean length in tokens.

    The warning reads the *shift* of the chosen answers' log-prob: TRL's `rewards/chosen` / beta, the policy's
    log-prob of the batch's chosen answers minus the reference model's of the same answers. It is paired,
    so it moves only when training moved the policy; the raw `logps/chosen` of the first and last batches
    (kept for the report) compare different answers, and on SmolLM2 fell 8 nats between two batches of
    a run whose policy barely moved (rewards ~0)."""
    metrics: dict[str, float] = {}
    warnings: list[str] = []
    per_token = max(chosen_tokens or 1.0, 1.0)
    for name in ("chosen", "rejected"):
        if logged.get(f"logps/{name}"):
            start, end = trend(logged[f"logps/{name}"])
            metrics |= {f"watch.{name}_logp_start": start, f"watch.{name}_logp_end": end}
        if logged.get(f"rewards/{name}"):
            shift = trend(logged[f"rewards/{name}"])[1] / beta  # nats per answer, against the reference, at the end
            metrics |= {f"watch.{name}_logp_shift": shift, f"watch.{name}_logp_shift_per_token": shift / per_token}
    drop = -metrics.get("watch.chosen_logp_shift_per_token", 0.0)
    if drop > limits.max_chosen_logp_drop:
        also = " (the rejected answers' fell too)" if metrics.get("watch.rejected_logp_shift", 0) < 0 else ""
        warnings.append(f"the chosen answers' log-prob fell over training: {metrics['watch.chosen_logp_shift']:.2f} "
                        f"nats per answer below the reference model's ({drop:.3f} per token, more than "
                        f"dpo.watch.max_chosen_logp_drop {limits.max_chosen_logp_drop}){also}: the policy is moving "
                        "away from the answers it is told to prefer, the usual start of degenerate output")
    if pairs:
        chosen = np.array([len(answer_text(p["chosen"]).split()) for p in pairs], dtype=float)
        rejected = np.array([len(answer_text(p["rejected"]).split()) for p in pairs], dtype=float)
        ratio = chosen.mean() / max(rejected.mean(), 1.0)
        metrics |= {"watch.chosen_words": float(chosen.mean()), "watch.rejected_words": float(rejected.mean()),
                    "watch.length_ratio": float(ratio), "watch.chosen_longer_share": float((chosen > rejected).mean())}
        if ratio > limits.max_length_ratio and (chosen > rejected).mean() > 0.5:  # most pairs, not a few long ones
            warnings.append(f"the chosen answers are {ratio:.2f}x as long as the rejected ones ({chosen.mean():.1f} vs "
                            f"{rejected.mean():.1f} words, chosen longer in {(chosen > rejected).mean():.0%} of "
                            f"{len(pairs)} pairs; dpo.watch.max_length_ratio {limits.max_length_ratio}): what the "
                            "preference rewards may be length")
    metrics["watch.warnings"] = float(len(warnings))
    return metrics, warnings


# --- at promotion ------------------------------------------------------------------------------------------

def _bound(metrics: dict, key: str) -> float:
    """The upper bound of a metric's 95% interval; the point value where no interval was computed."""
    high = metrics.get(f"{key}_ci95_high")
    return metrics[key] if high is None or math.isnan(high) else high


def promotion_refusals(challenger: dict[str, float], sft: dict[str, float] | None, limits: RegistrySection
                       ) -> list[str]:
    """Why a challenger must not be promoted, judged against its own SFT model on the same prompts (empty:
    nothing against it). Worse: the whole 95% paired interval of its accuracy minus SFT's lies below
    -max_loss_vs_sft (without reference answers: the interval of its win rate against SFT below
    0.5 - max_loss_vs_sft): a loss the eval set can tell from noise. Degenerate: its EOS rate fell, its
    repetition rate rose (or is above an absolute limit: a degenerate SFT model excuses nothing), or its
    answers grew longer, beyond the configured limits."""
    if sft is None:
        return ["no SFT model was evaluated beside it: nothing says it is not worse"]
    reasons = []
    if "delta_vs_sft" in challenger:
        high = _bound(challenger, "delta_vs_sft")
        if high < -limits.max_loss_vs_sft:
            reasons.append(f"worse than its SFT model: accuracy {challenger.get('accuracy', float('nan')):.3f} vs "
                           f"{sft.get('accuracy', float('nan')):.3f}, difference {challenger['delta_vs_sft']:+.3f} "
                           f"[{challenger.get('delta_vs_sft_ci95_low', float('nan')):.3f}, {high:.3f}], the whole "
                           f"interval below -{limits.max_loss_vs_sft} (registry.max_loss_vs_sft)")
    elif "win_rate_vs_sft" in challenger:
        high = _bound(challenger, "win_rate_vs_sft")
        if high < 0.5 - limits.max_loss_vs_sft:
            reasons.append(f"worse than its SFT model: win rate {challenger['win_rate_vs_sft']:.3f} "
                           f"[{challenger.get('win_rate_vs_sft_ci95_low', float('nan')):.3f}, {high:.3f}] against "
                           f"it, the whole interval below 0.5 - {limits.max_loss_vs_sft} (registry.max_loss_vs_sft)")
    if "eos_rate" in challenger and "eos_rate" in sft:
        drop = sft["eos_rate"] - challenger["eos_rate"]
        if drop > limits.max_eos_rate_drop:
            reasons.append(f"degenerate: EOS rate {challenger['eos_rate']:.3f} vs its SFT model's "
                           f"{sft['eos_rate']:.3f} "
                           f"(fell {drop:.3f}, more than registry.max_eos_rate_drop {limits.max_eos_rate_drop}): "
                           "answers that no longer end")
    if "repetition_rate" in challenger and "repetition_rate" in sft:
        rate, rise = challenger["repetition_rate"], challenger["repetition_rate"] - sft["repetition_rate"]
        why = ([f"rose {rise:.3f}, more than registry.max_repetition_rise {limits.max_repetition_rise}"]
               if rise > limits.max_repetition_rise else []) + (
            [f"above registry.max_repetition_rate {limits.max_repetition_rate} whatever its SFT model does"]
            if rate > limits.max_repetition_rate else [])
        if why:
            reasons.append(f"degenerate: repetition rate {rate:.3f} vs its SFT model's {sft['repetition_rate']:.3f} "
                           f"({'; '.join(why)})")
    if "mean_tokens" in challenger and "mean_tokens" in sft:
        ratio = challenger["mean_tokens"] / max(sft["mean_tokens"], 1.0)
        if ratio > limits.max_length_ratio:
            reasons.append(f"degenerate: answers {ratio:.2f}x as long as its SFT model's "
                           f"({challenger['mean_tokens']:.1f} "
                           f"vs {sft['mean_tokens']:.1f} tokens; registry.max_length_ratio {limits.max_length_ratio})")
    return reasons

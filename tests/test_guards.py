"""Nothing that says OK while failing (fast tier): the measures of degenerate preference tuning, the rules that
refuse such a model, and `alignflow serve` refusing where no schedule would ever fire."""

import os
import time

import pytest

from alignflow.config import RegistrySection, WatchSection
from alignflow.health import answer_health, preference_watch, promotion_refusals, repetition, versus_sft
from tests.conftest import BIN, QUIET, ROOT, free_port, run_in_session

PROSE = ("The river runs past the old mill, where children fish on summer evenings and the miller's dog "
         "sleeps in the shade of a walnut tree.")


def answers(texts: list[str], ended: bool = True, tokens: int | None = None) -> list[dict]:
    return [{"text": t, "ended": ended, "tokens": tokens if tokens is not None else len(t.split())} for t in texts]


def evaluated(texts: list[str], correct: list[float], ended: bool = True, tokens: int | None = None) -> dict:
    """A model's evaluation metrics as the evaluate stage computes them from its answers."""
    given = answers(texts, ended, tokens)
    return {"accuracy": sum(correct) / len(correct), "eos_rate": sum(a["ended"] for a in given) / len(given),
            **answer_health(given)}


def test_repetition_tells_prose_from_repeated_output():
    assert repetition(PROSE) < 0.05
    assert repetition("2" * 40) > 0.9  # one token, no spaces: words would not see it
    assert repetition("the answer is 12 " * 6) > 0.7
    assert repetition("42") == 0.0  # too short to repeat
    health = answer_health(answers([PROSE, "2" * 40, "ok"]))
    assert health["repetition_rate"] == pytest.approx(1 / 3)


def test_promotion_refuses_a_challenger_that_repeats_one_token():
    n = 20
    sft = evaluated([PROSE] * n, [1.0] * 4 + [0.0] * 16)
    collapsed = evaluated(["2" * 60] * n, [0.0] * n, ended=False, tokens=32)
    collapsed |= versus_sft(collapsed, sft)
    reasons = promotion_refusals(collapsed, sft, RegistrySection())
    assert any(r.startswith("degenerate: EOS rate 0.000 vs its SFT model's 1.000") for r in reasons), reasons
    assert any(r.startswith("degenerate: repetition rate 1.000 vs its SFT model's 0.000") for r in reasons), reasons
    # only the limits decide: loosen them and nothing is left against it
    loose = RegistrySection(max_eos_rate_drop=1.0, max_repetition_rise=1.0, max_repetition_rate=1.0,
                            max_length_ratio=10)
    assert promotion_refusals(collapsed, sft, loose) == []
    # an SFT model as degenerate as its challenger excuses nothing: repetition has an absolute limit too
    reasons = promotion_refusals(collapsed, collapsed, RegistrySection())
    assert len(reasons) == 1 and "above registry.max_repetition_rate 0.5" in reasons[0], reasons


def test_promotion_refuses_twice_the_length_and_a_significant_loss_but_not_a_healthy_model():
    sft = evaluated([PROSE] * 20, [1.0] * 10 + [0.0] * 10)
    long = evaluated([PROSE + " " + PROSE] * 20, [1.0] * 10 + [0.0] * 10)
    reasons = promotion_refusals(long, sft, RegistrySection())
    assert len(reasons) == 1 and reasons[0].startswith("degenerate: answers 2.00x as long as its SFT model's"), reasons
    # a loss the interval tells from noise: the whole interval of the paired difference lies below 0
    worse = sft | {"delta_vs_sft": -0.4, "delta_vs_sft_ci95_low": -0.6, "delta_vs_sft_ci95_high": -0.2}
    assert promotion_refusals(worse, sft, RegistrySection())[0].startswith("worse than its SFT model: accuracy")
    assert promotion_refusals(worse, sft, RegistrySection(max_loss_vs_sft=0.3)) == []
    noisy = sft | {"delta_vs_sft": -0.05, "delta_vs_sft_ci95_low": -0.2, "delta_vs_sft_ci95_high": 0.1}
    assert promotion_refusals(noisy, sft, RegistrySection()) == []
    # without reference answers the win rate against SFT decides
    judged = sft | {"win_rate_vs_sft": 0.2, "win_rate_vs_sft_ci95_low": 0.1, "win_rate_vs_sft_ci95_high": 0.35}
    assert "win rate 0.200" in promotion_refusals(judged, sft, RegistrySection())[0]
    assert promotion_refusals(sft, None, RegistrySection())[0].startswith("no SFT model was evaluated")


def test_the_watch_warns_of_a_falling_chosen_log_prob_and_of_length_preferences():
    pairs = [{"chosen": [{"role": "assistant", "content": "yes"}],
              "rejected": [{"role": "assistant", "content": "no it is not"}]}] * 8
    limits = WatchSection()
    # the raw log-probs of different batches may fall while the policy barely moved: no warning
    noisy = {"logps/chosen": [-10, -6, -6, -18], "rewards/chosen": [0.0, 0.001, -0.001, -0.001],
             "rewards/rejected": [0.0, -0.001, -0.002, -0.002]}
    metrics, warnings = preference_watch(noisy, 0.1, pairs, 3, limits)
    assert warnings == [] and metrics["watch.chosen_logp_end"] == -18
    healthy = {"rewards/chosen": [0.0, 0.1, 0.2, 0.3], "rewards/rejected": [0.0, -0.3, -0.6, -0.9]}
    metrics, warnings = preference_watch(healthy, 0.1, pairs, 3, limits)
    assert warnings == [] and metrics["watch.chosen_logp_shift_per_token"] == pytest.approx(1.0)
    collapsing = {"rewards/chosen": [0.0, -1.0, -2.0, -3.0], "rewards/rejected": [0.0, -2.0, -4.0, -6.0]}
    metrics, warnings = preference_watch(collapsing, 0.1, pairs, 10, limits)
    assert metrics["watch.chosen_logp_shift"] == pytest.approx(-30.0)
    assert metrics["watch.chosen_logp_shift_per_token"] == pytest.approx(-3.0)
    assert len(warnings) == 1 and "chosen answers' log-prob fell" in warnings[0] and "rejected" in warnings[0]
    longer = [{"chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    metrics, warnings = preference_watch({}, 0.1, longer, None, limits)
    assert metrics["watch.length_ratio"] == pytest.approx(4.0) and "as long as the rejected" in warnings[0]


@pytest.mark.slow  # a server or a subprocess: the full suite's tier
def test_serve_refuses_at_once_without_a_server_that_schedules(tmp_path):
    """`alignflow serve` as README shows it, on a machine with no Prefect server: Prefect's temporary server
    would poll for scheduled runs that its missing scheduler never creates; alignflow refuses instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | QUIET | {
        "PREFECT_HOME": str(tmp_path / "prefect")}
    command = [str(BIN / "alignflow"), "serve", "configs/smoke.yaml", f"output_dir={tmp_path}", "--interval", "45"]
    started = time.monotonic()
    done = run_in_session(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "prefect server start" in done.stderr and "PREFECT_API_URL" in done.stderr
    assert time.monotonic() - started < 60  # at once: no server was started and nothing was served
    # a URL where nothing answers is refused the same way, naming it
    url = f"http://127.0.0.1:{free_port()}/api"
    done = run_in_session(command, cwd=ROOT, env=env | {"PREFECT_API_URL": url}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and f"no Prefect server answers at PREFECT_API_URL={url}" in done.stderr


@pytest.mark.parametrize("override, key", [("registry.max_length_ratio=0.5", "max_length_ratio"),
                                           ("registry.max_repetition_rise=2", "max_repetition_rise"),
                                           ("registry.max_loss_vs_sft=-0.1", "max_loss_vs_sft"),
                                           ("dpo.watch.max_chosen_logp_drop=-1", "max_chosen_logp_drop"),
                                           ("dpo.watch.max_length_ratio=1", "max_length_ratio")])
def test_limits_out_of_range_are_config_errors_naming_the_key(override, key):
    from alignflow.config import ConfigError, load_config
    from tests.conftest import SMOKE

    with pytest.raises(ConfigError, match=key):
        load_config(SMOKE, [override])

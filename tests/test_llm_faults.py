"""Faults in `llmalign grpo`: a reward that returns NaN, the wrong number of scores, or raises stops the
run naming the reward and the batch (exit 3), or with reward.on_bad_score=drop its samples are dropped
and counted; a loss that becomes NaN stops with the step and keeps the last good checkpoint (exit 4)."""

import json
import math

import pytest

from llmalign import grpo
from llmalign.cli import main
from shared.checkpoint import latest_checkpoint
from tests.test_llm_grpo import overrides, tiny_lm_dir  # noqa: F401  (fixture)


def nan_for_first(prompts, completions, **kwargs):
    return [math.nan] + [1.0] * (len(completions) - 1)


def none_for_first(prompts, completions, **kwargs):
    return [None] + [float(i % 2) for i in range(1, len(completions))]


def too_few(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def raises(prompts, completions, **kwargs):
    raise KeyError("solution")


@pytest.mark.parametrize("reward, message", [
    ("nan_for_first", "gave nan for completion 0"),
    ("none_for_first", "gave None for completion 0"),
    ("too_few", "returned 5 scores for 6 completions"),
    ("raises", "raised KeyError"),
])
def test_bad_reward_stops_with_its_name(tiny_lm_dir, tmp_path, capsys, reward, message):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", *overrides(tiny_lm_dir, tmp_path), f"reward.weights={{tests.test_llm_faults:{reward}: 1.0}}"])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert f"reward 'tests.test_llm_faults:{reward}'" in err and message in err and "iteration 1" in err


def test_drop_counts_bad_samples_and_trains_on(tiny_lm_dir, tmp_path):  # noqa: F811
    main(["grpo", *overrides(tiny_lm_dir, tmp_path), "reward.on_bad_score=drop",
          "reward.weights={tests.test_llm_faults:none_for_first: 1.0, tests.test_llm_grpo:char_count_reward: 1.0}"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/dropped"] for r in records[1:]] == [1, 1]  # one bad sample per iteration, counted
    assert records[1]["train/kept"] == pytest.approx(5 / 6)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000002"


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_lm_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    real = grpo.micro_batch_loss
    calls = []

    def nan_in_second_iteration(config, logp, *args):
        calls.append(1)
        loss, metrics = real(config, logp, *args)
        return (loss * math.nan if len(calls) > 2 else loss), metrics  # iteration 1 has 2 micro-batches

    monkeypatch.setattr(grpo, "micro_batch_loss", nan_in_second_iteration)
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", *overrides(tiny_lm_dir, tmp_path)])
    assert exit_info.value.code == 4
    err = capsys.readouterr().err
    assert "iteration 2" in err and "the loss is nan" in err and "step-000001" in err
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000001"
    from shared.checkpoint import load_state

    assert load_state(latest_checkpoint(tmp_path / "checkpoints"), "trainer")["iteration"] == 1

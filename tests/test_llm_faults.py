"""Faults in `llmalign grpo`: a reward that returns NaN, the wrong number of scores, or raises stops the
run naming the reward and the batch (exit 3), or with reward.on_bad_score=drop its samples are dropped
and counted; a loss that becomes NaN stops with the step and keeps the last good checkpoint (exit 4)."""

import json
import math
import threading
import time

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


def none_output(prompts, completions, **kwargs):
    return None


def string_for_first(prompts, completions, **kwargs):
    return ["abc"] + [1.0] * (len(completions) - 1)


def dict_for_first(prompts, completions, **kwargs):
    return [{"score": 1.0}] + [1.0] * (len(completions) - 1)


def huge_for_first(prompts, completions, **kwargs):
    return [10**400] + [1.0] * (len(completions) - 1)


RELEASE_HUNG = threading.Event()  # set after each timeout test so the abandoned reward threads end


def hangs(prompts, completions, **kwargs):
    RELEASE_HUNG.wait(60)
    return [1.0] * len(completions)


@pytest.fixture
def release_hung_threads():
    RELEASE_HUNG.clear()
    yield
    RELEASE_HUNG.set()


@pytest.mark.parametrize(
    "reward, message",
    [
        ("nan_for_first", "gave nan for completion 0"),
        ("none_for_first", "gave None for completion 0"),
        ("too_few", "returned 5 scores for 6 completions"),
        ("raises", "raised KeyError"),
        ("none_output", "returned NoneType scores for 6 completions"),
        ("string_for_first", "returned a str at position 0 ('abc'), not a number"),
        ("dict_for_first", "returned a dict at position 0 ({'score': 1.0}), not a number"),
        ("huge_for_first", "returned an integer of 401 digits at position 0, too large for a float"),
    ],
)
def test_bad_reward_stops_with_its_name(tiny_lm_dir, tmp_path, capsys, reward, message):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", *overrides(tiny_lm_dir, tmp_path), f"reward.weights={{tests.test_llm_faults:{reward}: 1.0}}"])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert f"reward 'tests.test_llm_faults:{reward}'" in err and message in err and "iteration 1" in err


def test_drop_counts_bad_samples_and_trains_on(tiny_lm_dir, tmp_path):  # noqa: F811
    main(
        [
            "grpo",
            *overrides(tiny_lm_dir, tmp_path),
            "reward.on_bad_score=drop",
            "reward.weights={tests.test_llm_faults:none_for_first: 1.0, tests.test_llm_grpo:char_count_reward: 1.0}",
        ]
    )
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


def test_timeout_exits_3_naming_the_reward(tiny_lm_dir, tmp_path, capsys, release_hung_threads):  # noqa: F811
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "grpo",
                *overrides(tiny_lm_dir, tmp_path),
                "reward.timeout_s=0.5",
                "reward.weights={tests.test_llm_faults:hangs: 1.0}",
            ]
        )
    assert exit_info.value.code == 3 and time.perf_counter() - started < 30  # the reward alone would wait 60 s
    err = capsys.readouterr().err
    assert "reward 'tests.test_llm_faults:hangs' did not return within reward.timeout_s=0.5 s" in err
    assert "iteration 1" in err and "Traceback" not in err


def test_timeout_under_drop_drops_the_batch(tiny_lm_dir, tmp_path, capsys, release_hung_threads):  # noqa: F811
    main(
        [
            "grpo",
            *overrides(tiny_lm_dir, tmp_path),
            "reward.timeout_s=0.5",
            "reward.on_bad_score=drop",
            "reward.weights={tests.test_llm_faults:hangs: 1.0, tests.test_llm_grpo:char_count_reward: 1.0}",
        ]
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/dropped"] for r in records[1:]] == [6, 6]  # 2 prompts x 3 completions, all dropped
    assert capsys.readouterr().err.count("completions are dropped") == 2
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000002"


@pytest.mark.parametrize("path", [":fn", ".:fn", "tests..test_llm_faults:raises", "tests.test_llm_faults:"])
def test_empty_or_relative_module_name_exits_2(tiny_lm_dir, tmp_path, capsys, path):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", *overrides(tiny_lm_dir, tmp_path), f"reward.weights={{'{path}': 1.0}}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"config error: config field 'reward.weights': {path!r} has module name")

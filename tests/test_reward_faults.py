"""A broken reward is reported with its name before or during training; with reward.on_bad_score=drop
its NaN samples get advantage 0 and are counted instead."""

import dataclasses
import json
import threading
import time

import numpy as np
import pytest
import torch

from flowalign.rewards.plugins import (
    RewardError,
    call_reward,
    check_rewards_on_dummy_batch,
    load_reward,
    scores_as_floats,
    with_deadline,
)
from flowalign.train import train
from tests.test_train_smoke import tiny_config, tiny_pipeline_dir  # noqa: F401  (fixture)


def nan_on_first_sample(images, prompts, metadata):
    scores = images.mean(dim=(1, 2, 3))
    scores[0] = float("nan")
    return scores


def one_score_too_few(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))[1:]


def raises(images, prompts, metadata):
    raise KeyError("missing field 'aesthetic'")


def two_arguments(images, prompts):
    return torch.zeros(len(prompts))


RELEASE_HUNG = threading.Event()  # set at the end of each timeout test so abandoned threads finish


def hangs_in_training(images, prompts, metadata):
    """Answers the start-up check and the evaluation at once; a training batch hangs (until released)."""
    if metadata[0].get("split") == "train":
        RELEASE_HUNG.wait(60)
    return images.mean(dim=(1, 2, 3))  # [B]


def none_for_first_sample(images, prompts, metadata):
    return [None] + images.mean(dim=(1, 2, 3))[1:].tolist()


def returns_a_string(images, prompts, metadata):
    return "0.5"


def test_nan_score_stops_the_run_naming_the_reward(tiny_pipeline_dir, tmp_path):  # noqa: F811
    config = tiny_config(
        tiny_pipeline_dir, tmp_path / "run", "reward.weights={tests.test_reward_faults:nan_on_first_sample: 1.0}"
    )
    with pytest.raises(RewardError, match="nan_on_first_sample' returned non-finite scores at positions \\[0\\]"):
        train(config)


def test_drop_counts_bad_samples_and_keeps_training(tiny_pipeline_dir, tmp_path):  # noqa: F811
    config = tiny_config(
        tiny_pipeline_dir,
        tmp_path / "run",
        "reward.on_bad_score=drop",
        "reward.weights={tests.test_reward_faults:nan_on_first_sample: 1.0}",
    )
    result = train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/dropped"] for r in records[1:]] == [1, 1]  # one bad sample per rollout, counted
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in records[1:])
    assert torch.isfinite(torch.tensor(list(result["after"].values()))).all()


@pytest.mark.parametrize(
    "name, message",
    [
        ("one_score_too_few", "returned 1 scores for 2 images; return one score per image"),  # start-up check
        ("raises", "raised KeyError: \"missing field 'aesthetic'\""),
    ],
)
def test_broken_rewards_stop_before_training_with_their_name(tiny_pipeline_dir, tmp_path, name, message):  # noqa: F811
    config = tiny_config(
        tiny_pipeline_dir, tmp_path / "run", f"reward.weights={{tests.test_reward_faults:{name}: 1.0}}"
    )
    with pytest.raises(RewardError, match=name) as info:
        train(config)
    assert message in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing written


def test_wrong_signature_and_bad_paths_are_refused_at_load():
    with pytest.raises(RewardError, match="must accept \\(images, prompts, metadata\\)"):
        load_reward("tests.test_reward_faults:two_arguments")
    with pytest.raises(RewardError, match="has no 'nope'"):
        load_reward("tests.test_reward_faults:nope")
    with pytest.raises(RewardError, match="cannot import module 'no_such_module'"):
        load_reward("no_such_module:reward")


def test_overlong_prompts_are_counted_and_reported(tiny_pipeline_dir, tmp_path, capsys):  # noqa: F811
    from flowalign.adapters import SD3Adapter

    adapter = SD3Adapter.from_pretrained(str(tiny_pipeline_dir))
    long_prompt = "the digit " + " ".join(["three"] * 40)  # the toy tokenizers keep 16 tokens
    assert adapter.prompts_over_context(["the digit one", long_prompt]) == [long_prompt]
    train(
        tiny_config(
            tiny_pipeline_dir, tmp_path / "run", f"data.prompts=[the digit one, {long_prompt}]", "train.iterations=1"
        )
    )
    assert "warning: 1 prompt(s) exceed the text encoder's context and are truncated" in capsys.readouterr().out


def test_nan_loss_stops_with_the_iteration_and_keeps_the_checkpoint(tiny_pipeline_dir, tmp_path, monkeypatch):  # noqa: F811
    import flowalign.train as recipe

    config = tiny_config(tiny_pipeline_dir, tmp_path / "run", "train.iterations=3")
    algorithm = recipe.ALGORITHMS[config.algorithm.name]  # the recipe calls its algorithm's update
    real_update, calls = algorithm.update, {"n": 0}

    def update_that_fails_on_the_second_call(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("loss became nan; lower train.learning_rate or check the rewards")
        return real_update(*args)

    failing = dataclasses.replace(algorithm, update=update_that_fails_on_the_second_call)
    monkeypatch.setitem(recipe.ALGORITHMS, config.algorithm.name, failing)
    with pytest.raises(FloatingPointError, match="iteration 2: loss became nan.*last good checkpoint is .*step-000001"):
        recipe.train(config)
    from shared.checkpoint import latest_checkpoint, load_state

    assert load_state(latest_checkpoint(tmp_path / "run" / "checkpoints"), "trainer")["iteration"] == 1


def test_factories_with_required_arguments_take_their_kwargs():
    reward = load_reward("flowalign.rewards.server:remote_reward", {"url": "http://127.0.0.1:9", "token": "t"})
    assert callable(reward) and reward.__name__ != "remote_reward"
    with pytest.raises(RewardError, match="calling it with reward.kwargs \\{'quality': 50, 'colour': 1\\} failed"):
        load_reward("flowalign.rewards:jpeg_compressibility", {"quality": 50, "colour": 1})


@pytest.fixture
def release_hung_threads():
    RELEASE_HUNG.clear()
    yield
    RELEASE_HUNG.set()  # the abandoned reward threads return and end


def test_timeout_stops_the_run_naming_the_reward(tiny_pipeline_dir, tmp_path, release_hung_threads):  # noqa: F811
    config = tiny_config(
        tiny_pipeline_dir,
        tmp_path / "run",
        "reward.timeout_s=0.5",
        "reward.weights={tests.test_reward_faults:hangs_in_training: 1.0}",
    )
    started = time.perf_counter()
    with pytest.raises(
        RewardError,
        match="reward 'tests.test_reward_faults:hangs_in_training' did not return "
        "within reward.timeout_s=0.5 s.*raise reward.timeout_s",
    ):
        train(config)
    assert time.perf_counter() - started < 30  # without the deadline it waits 60 s for the release
    assert not (tmp_path / "run" / "checkpoints").exists()  # the first training batch hung: nothing trained


def test_timeout_under_drop_drops_the_batch_and_trains_on(
    tiny_pipeline_dir,
    tmp_path,
    release_hung_threads,  # noqa: F811
    capsys,
):
    config = tiny_config(
        tiny_pipeline_dir,
        tmp_path / "run",
        "reward.timeout_s=0.5",
        "reward.on_bad_score=drop",
        "reward.weights={tests.test_reward_faults:hangs_in_training: 1.0}",
    )
    result = train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/dropped"] for r in records[1:]] == [4, 4]  # 2 prompts x 2 samples, all dropped each time
    # every advantage is 0 and the policy equals its reference: nothing moves, so the evaluation is unchanged
    assert [(r["train/loss"], r["train/grad_norm"]) for r in records[1:]] == [(0.0, 0.0), (0.0, 0.0)]
    assert result["after"] == result["before"]
    assert "did not return within reward.timeout_s=0.5 s" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "step-000002").is_dir()


def test_a_timeout_in_the_start_up_check_stops_even_under_drop(release_hung_threads):
    def loads_forever(images, prompts, metadata):  # a model load that never finishes
        RELEASE_HUNG.wait(60)

    bounded = load_reward("tests.test_reward_faults:hangs_in_training", timeout_s=0.2)
    assert bounded.__wrapped__ is hangs_in_training  # load_reward wraps the reward in the deadline
    with pytest.raises(
        RewardError, match="'slow' did not return within reward.timeout_s=0.2 s.*raise reward.timeout_s"
    ):
        check_rewards_on_dummy_batch(
            {"slow": with_deadline(loads_forever, 0.2)}, torch.zeros(2, 3, 2, 2), ["a", "b"], allow_nonfinite=True
        )


def test_none_score_is_dropped_under_drop_and_stops_otherwise(tiny_pipeline_dir, tmp_path):  # noqa: F811
    weights = "reward.weights={tests.test_reward_faults:none_for_first_sample: 1.0}"
    with pytest.raises(
        RewardError, match="none_for_first_sample' returned non-finite scores at positions \\[0\\].*values \\[None\\]"
    ):
        train(tiny_config(tiny_pipeline_dir, tmp_path / "stop", weights))
    train(tiny_config(tiny_pipeline_dir, tmp_path / "drop", weights, "reward.on_bad_score=drop"))
    records = [json.loads(line) for line in (tmp_path / "drop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/dropped"] for r in records[1:]] == [1, 1]  # one None per rollout, counted


@pytest.mark.parametrize(
    "output, message",
    [
        (None, "returned None, not one score per image"),
        ("abc", "returned a str ('abc'), not a list or tensor of numbers"),
        ({"score": 1.0}, "returned a dict ({'score': 1.0}), not a list or tensor of numbers"),
        ([1.0, 10**400], "returned an integer of 401 digits at position 1, too large for a float"),
        ([1.0, "2"], "returned a str at position 1 ('2'), not a number"),
        (np.array(["a", "b"]), "returned a numpy array of dtype <U1, not real numbers"),
    ],
)
def test_outputs_that_are_not_numbers_are_reward_errors_even_under_drop(output, message):
    images, prompts = torch.zeros(2, 3, 2, 2), ["a", "b"]  # [2, 3, 2, 2]
    with pytest.raises(RewardError, match="reward 'r' ") as info:
        call_reward("r", lambda *args: output, images, prompts, [{}, {}], allow_nonfinite=True)
    assert message in str(info.value)


def test_scores_as_floats_keeps_values_and_marks_none():
    scores, missing = scores_as_floats([0.25, None, np.float32(-2.0), torch.tensor(3.5), 7, True])
    assert missing == [1] and scores.dtype == torch.float32 and scores[1].isnan()
    assert scores[[0, 2, 3, 4, 5]].tolist() == [0.25, -2.0, 3.5, 7.0, 1.0]
    assert scores_as_floats(torch.tensor([[1.0], [2.0]], dtype=torch.float64))[0].tolist() == [1.0, 2.0]


def test_string_output_exits_3_through_the_cli(tiny_pipeline_dir, tmp_path, capsys):  # noqa: F811
    from flowalign.cli import flow_grpo_main as main
    from tests.test_train_smoke import tiny_overrides

    with pytest.raises(SystemExit) as info:
        main(
            tiny_overrides(
                tiny_pipeline_dir, tmp_path / "run", "reward.weights={tests.test_reward_faults:returns_a_string: 1.0}"
            )
        )
    err = capsys.readouterr().err.strip()  # the pipeline's loading bars, then one line
    assert info.value.code == 3 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(
        "reward error: reward 'tests.test_reward_faults:returns_a_string' returned a str ('0.5')"
    )


@pytest.mark.parametrize("path", [":digit_classifier_reward", ".:fn", "flowalign..rewards:fn", "flowalign.rewards:"])
def test_empty_or_relative_module_names_exit_2_through_the_cli(tiny_pipeline_dir, tmp_path, capsys, path):  # noqa: F811
    from flowalign.cli import flow_grpo_main as main
    from tests.test_train_smoke import tiny_overrides

    with pytest.raises(SystemExit) as info:
        main(tiny_overrides(tiny_pipeline_dir, tmp_path / "run", f"reward.weights={{'{path}': 1.0}}"))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err
    assert err.startswith(f"config error: config field 'reward.weights': {path!r}")
    with pytest.raises(RewardError, match="reward " + repr(path).replace(".", "\\.")):
        load_reward(path)  # the loader refuses them too (flowalign-score, flowalign-reward-serve)


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "0.0 must be positive seconds"),
        ("-1", "-1.0 must be positive"),
        ("abc", "expected float or None, got 'abc'"),
    ],
)
def test_timeout_must_be_positive_seconds_in_both_front_ends(value, message):
    from llmalign.config import GRPOConfig
    from shared.config import ConfigError, load_config

    from flowalign.config import FlowGRPOConfig

    for config_class in (FlowGRPOConfig, GRPOConfig):
        with pytest.raises(ConfigError, match=f"config field 'reward.timeout_s': {message}"):
            load_config(config_class, None, [f"reward.timeout_s={value}"])
        assert load_config(config_class, None, ["reward.timeout_s=5"]).reward.timeout_s == 5.0

"""A broken reward is reported with its name before or during training; with reward.on_bad_score=drop
its NaN samples get advantage 0 and are counted instead."""

import json

import pytest
import torch

from flowalign.reward_plugins import RewardError, load_reward
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


def test_nan_score_stops_the_run_naming_the_reward(tiny_pipeline_dir, tmp_path):  # noqa: F811
    config = tiny_config(tiny_pipeline_dir, tmp_path / "run",
                         "reward.weights={tests.test_reward_faults:nan_on_first_sample: 1.0}")
    with pytest.raises(RewardError, match="nan_on_first_sample' returned non-finite scores at positions \\[0\\]"):
        train(config)


def test_drop_counts_bad_samples_and_keeps_training(tiny_pipeline_dir, tmp_path):  # noqa: F811
    config = tiny_config(tiny_pipeline_dir, tmp_path / "run", "reward.on_bad_score=drop",
                         "reward.weights={tests.test_reward_faults:nan_on_first_sample: 1.0}")
    result = train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/dropped"] for r in records[1:]] == [1, 1]  # one bad sample per rollout, counted
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in records[1:])
    assert torch.isfinite(torch.tensor(list(result["after"].values()))).all()


@pytest.mark.parametrize("name, message", [
    ("one_score_too_few", "returned 1 scores for 2 images; return one score per image"),  # start-up check
    ("raises", "raised KeyError: \"missing field 'aesthetic'\""),
])
def test_broken_rewards_stop_before_training_with_their_name(tiny_pipeline_dir, tmp_path, name, message):  # noqa: F811
    config = tiny_config(tiny_pipeline_dir, tmp_path / "run", f"reward.weights={{tests.test_reward_faults:{name}: 1.0}}")
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

"""A broken reward is reported with its name before or during training; with reward.on_bad_score=drop
its NaN samples get advantage 0 and are counted instead."""

import json

import pytest
import torch

from flowalign.rewards.plugins import RewardError, load_reward
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


def test_overlong_prompts_are_counted_and_reported(tiny_pipeline_dir, tmp_path, capsys):  # noqa: F811
    from flowalign.adapters import SD3Adapter

    adapter = SD3Adapter.from_pretrained(str(tiny_pipeline_dir))
    long_prompt = "the digit " + " ".join(["three"] * 40)  # the toy tokenizers keep 16 tokens
    assert adapter.prompts_over_context(["the digit one", long_prompt]) == [long_prompt]
    train(tiny_config(tiny_pipeline_dir, tmp_path / "run", f"data.prompts=[the digit one, {long_prompt}]",
                      "train.iterations=1"))
    assert "warning: 1 prompt(s) exceed the text encoder's context and are truncated" in capsys.readouterr().out


def test_nan_loss_stops_with_the_iteration_and_keeps_the_checkpoint(tiny_pipeline_dir, tmp_path, monkeypatch):  # noqa: F811
    import flowalign.train as recipe

    config = tiny_config(tiny_pipeline_dir, tmp_path / "run", "train.iterations=3")
    real_update, calls = recipe.update, {"n": 0}

    def update_that_fails_on_the_second_call(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("loss became nan; lower train.learning_rate or check the rewards")
        return real_update(*args)

    monkeypatch.setattr(recipe, "update", update_that_fails_on_the_second_call)
    with pytest.raises(FloatingPointError, match="iteration 2: loss became nan.*last good checkpoint is .*step-000001"):
        recipe.train(config)
    from shared.checkpoint import latest_checkpoint, load_state

    assert load_state(latest_checkpoint(tmp_path / "run" / "checkpoints"), "trainer")["iteration"] == 1


def test_factories_with_required_arguments_take_their_kwargs():
    reward = load_reward("flowalign.rewards.server:remote_reward", {"url": "http://127.0.0.1:9", "token": "t"})
    assert callable(reward) and reward.__name__ != "remote_reward"
    with pytest.raises(RewardError, match="calling it with reward.kwargs \\{'quality': 50, 'colour': 1\\} failed"):
        load_reward("flowalign.rewards:jpeg_compressibility", {"quality": 50, "colour": 1})

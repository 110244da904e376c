"""PromptStatTracker: per-prompt advantages across updates, and its JSON-safe state."""

import json
import math

import pytest
import torch
from torch.testing import assert_close

from shared.advantages import group_advantages
from shared.stats import PromptStatTracker, mean_with_standard_error, paired_gain

EPS = 1e-4
PROMPTS_1 = ["a", "b", "a", "b"]
REWARDS_1 = torch.tensor([1.0, 0.0, 3.0, 4.0])  # a: (1, 3), b: (0, 4)
PROMPTS_2 = ["a", "b", "a"]
REWARDS_2 = torch.tensor([5.0, 4.0, 5.0])  # a: (5, 5), b: (4)


def test_first_update_by_hand():
    # a (1, 3): mean 2, std 1 -> -+1 / (1 + eps); b (0, 4): mean 2, std 2 -> -+2 / (2 + eps)
    out = PromptStatTracker().update(PROMPTS_1, REWARDS_1)
    assert_close(out, torch.tensor([-1 / (1 + EPS), -2 / (2 + EPS), 1 / (1 + EPS), 2 / (2 + EPS)]))


def test_without_history_matches_group_advantages():
    tracker = PromptStatTracker()
    tracker.update(PROMPTS_1, REWARDS_1)
    # second update uses only its own rewards: a (5, 5) constant, b a single reward -> exactly 0
    assert torch.equal(tracker.update(PROMPTS_2, REWARDS_2), torch.zeros(3))
    rewards, prompts = torch.tensor([0.3, 2.0, 0.9, 0.3, 0.4]), ["x", "y", "x", "z", "y"]
    assert_close(PromptStatTracker().update(prompts, rewards), group_advantages(rewards, torch.tensor([0, 1, 0, 2, 1])))


def test_history_across_two_updates_by_hand():
    tracker = PromptStatTracker(history=True)
    tracker.update(PROMPTS_1, REWARDS_1)
    out = tracker.update(PROMPTS_2, REWARDS_2)
    # a pool (1, 3, 5, 5): mean 3.5, variance (6.25 + 0.25 + 2.25 + 2.25) / 4 = 2.75, std 1.658312
    #   A(5) = 1.5 / 1.658412 = 0.904482
    # b pool (0, 4, 4): mean 8/3, variance (64/9 + 16/9 + 16/9) / 3 = 32/9, std 1.885618
    #   A(4) = (4/3) / 1.885718 = 0.707069
    assert_close(out, torch.tensor([0.904482, 0.707069, 0.904482]))
    assert tracker.prompt_stats() == {"num_prompts": 2, "mean_group_size": 3.5}  # 4 and 3 rewards kept


def test_global_std_by_hand():
    # batch population std of (1, 0, 3, 4): mean 2, variance (1 + 4 + 1 + 4) / 4 = 2.5, std 1.581139
    # a: (-1, 1) / 1.581239; b: (-2, 2) / 1.581239
    out = PromptStatTracker(global_std=True).update(PROMPTS_1, REWARDS_1)
    s = math.sqrt(2.5) + EPS
    assert_close(out, torch.tensor([-1 / s, -2 / s, 1 / s, 2 / s]))


def test_state_dict_json_round_trip_matches_uninterrupted_run():
    uninterrupted = PromptStatTracker(history=True)
    uninterrupted.update(PROMPTS_1, REWARDS_1)
    expected = uninterrupted.update(PROMPTS_2, REWARDS_2)

    first = PromptStatTracker(history=True)
    first.update(PROMPTS_1, REWARDS_1)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = PromptStatTracker(history=True)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == first.state_dict()
    assert torch.equal(resumed.update(PROMPTS_2, REWARDS_2), expected)


def test_load_rejects_other_options():
    state = PromptStatTracker(history=True).state_dict()
    with pytest.raises(ValueError, match="history=True but this tracker has history=False"):
        PromptStatTracker().load_state_dict(state)


def test_clear_and_prompt_stats():
    tracker = PromptStatTracker()
    assert tracker.prompt_stats() == {"num_prompts": 0, "mean_group_size": 0.0}
    tracker.update(PROMPTS_1, REWARDS_1)
    tracker.update(PROMPTS_2, REWARDS_2)  # without history the latest update replaces: a 2, b 1
    assert tracker.prompt_stats() == {"num_prompts": 2, "mean_group_size": 1.5}
    tracker.clear()
    assert tracker.prompt_stats() == {"num_prompts": 0, "mean_group_size": 0.0}
    assert tracker.state_dict()["rewards"] == {}


def test_errors():
    with pytest.raises(ValueError, match="one prompt per reward"):
        PromptStatTracker().update(["a"], torch.ones(2))
    with pytest.raises(ValueError, match="NaN"):
        PromptStatTracker().update(["a", "a"], torch.tensor([1.0, float("nan")]))


def test_history_size_keeps_the_last_rewards_by_hand():
    tracker = PromptStatTracker(history=True, history_size=3)
    tracker.update(PROMPTS_1, REWARDS_1)
    out = tracker.update(PROMPTS_2, REWARDS_2)
    # a keeps (3, 5, 5) of (1, 3, 5, 5): mean 13/3, variance (16/9 + 4/9 + 4/9) / 3 = 8/9, std 0.942809
    #   A(5) = (2/3) / 0.942909 = 0.707032
    # b keeps all of (0, 4, 4): A(4) = 0.707069 as in test_history_across_two_updates_by_hand
    assert_close(out, torch.tensor([0.707032, 0.707069, 0.707032]))
    assert tracker.rewards == {"a": [3.0, 5.0, 5.0], "b": [0.0, 4.0, 4.0]}
    # fewer kept than one update brings: the whole update is kept (at least its own rewards)
    small = PromptStatTracker(history=True, history_size=1)
    small.update(PROMPTS_1, REWARDS_1)
    assert small.rewards == {"a": [1.0, 3.0], "b": [0.0, 4.0]}
    with pytest.raises(ValueError, match="history_size must be >= 1"):
        PromptStatTracker(history=True, history_size=0)
    with pytest.raises(ValueError, match="history_size=3 but this tracker has history_size=None"):
        PromptStatTracker(history=True).load_state_dict(tracker.state_dict())


def test_mean_with_standard_error_by_hand():
    # [1, 2, 3, 4]: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; s^2 = 5/3; SE = sqrt(5/3)/2
    mean, se, n = mean_with_standard_error(torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")]))
    assert (mean, n) == (2.5, 4) and se == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-12)
    assert math.isnan(mean_with_standard_error(torch.tensor([7.0]))[1])  # one value: no spread to estimate
    assert mean_with_standard_error(torch.tensor([float("nan")]))[2] == 0


def test_paired_gain_uses_the_differences():
    before = torch.tensor([0.1, 0.5, 0.9, float("nan")])
    after = torch.tensor([0.3, 0.6, 1.2, 0.4])
    # differences 0.2, 0.1, 0.3 (the NaN pair left out): mean 0.2, s^2 = (0.01 + 0.01) / 2 = 0.01, SE = 0.1/sqrt(3)
    gain, se, n = paired_gain(before, after)
    assert (
        n == 3 and gain == pytest.approx(0.2, rel=1e-6) and se == pytest.approx(0.1 / math.sqrt(3), rel=1e-5)
    )  # float32 in
    # the unpaired SEs would be far larger: the prompts' spread (0.1 .. 0.9) is shared by both and cancels
    assert se < mean_with_standard_error(before)[1] / 3
    with pytest.raises(ValueError, match="shapes"):
        paired_gain(before, after[:2])

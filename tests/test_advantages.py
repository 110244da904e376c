import math

import pytest
import torch
from torch.testing import assert_close

from shared.advantages import clip_advantages, compose_rewards, group_advantages

EPS = 1e-4


def test_one_group_by_hand():
    # mean 2, population std sqrt(2/3) -> A = (-1, 0, 1) / (sqrt(2/3) + eps)
    scale = 1 / (math.sqrt(2 / 3) + EPS)
    assert_close(group_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 0])),
                 torch.tensor([-scale, 0.0, scale]))


def test_shuffled_ids_different_sizes_and_single_member_group():
    # group 7: {5, 7} mean 6 std 1; group 2: {1, 3} mean 2 std 1; group 9: one member -> 0
    rewards, ids = torch.tensor([5.0, 1.0, 7.0, 3.0, 4.0]), torch.tensor([7, 2, 7, 2, 9])
    one = 1 / (1 + EPS)
    assert_close(group_advantages(rewards, ids), torch.tensor([-one, -one, one, one, 0.0]))


def test_batch_and_none_scales_and_all_equal_group():
    # group 0 {0, 2}: centred (-1, 1); group 1 {4, 4}: all equal -> exactly 0
    # batch population std of (0, 2, 4, 4): mean 2.5, variance (6.25 + 0.25 + 2.25 + 2.25) / 4 = 2.75
    rewards, ids = torch.tensor([0.0, 2.0, 4.0, 4.0]), torch.tensor([0, 0, 1, 1])
    batch = 1 / (math.sqrt(2.75) + EPS)
    assert_close(group_advantages(rewards, ids, scale="batch"), torch.tensor([-batch, batch, 0.0, 0.0]))
    assert_close(group_advantages(rewards, ids, scale="none"), torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(group_advantages(torch.full((3,), 0.1), torch.zeros(3, dtype=torch.long)), torch.zeros(3))


def test_nan_rewards_raise_or_are_masked():
    rewards, ids = torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([0, 0, 0])
    with pytest.raises(ValueError, match="nan_policy"):
        group_advantages(rewards, ids)
    # masked: stats over {1, 3}: mean 2, std 1; the NaN member gets 0
    one = 1 / (1 + EPS)
    assert_close(group_advantages(rewards, ids, nan_policy="mask"), torch.tensor([-one, 0.0, one]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(torch.ones(2), torch.zeros(2, dtype=torch.long), scale="global")
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3), torch.zeros(2, dtype=torch.long))


def test_clip_advantages():
    assert_close(clip_advantages(torch.tensor([-7.0, 2.0, 9.0]), 5.0), torch.tensor([-5.0, 2.0, 5.0]))


def test_compose_rewards_both_modes_by_hand():
    rewards = {"a": torch.tensor([0.0, 1.0, 0.0, 1.0]), "b": torch.tensor([2.0, 0.0, 4.0, 0.0])}
    weights, ids = {"a": 1.0, "b": 0.5}, torch.zeros(4, dtype=torch.long)
    # sum then normalise: total = (1, 1, 2, 1), mean 1.25, variance 0.75 / 4 = 0.1875
    advantages, stats = compose_rewards(rewards, weights, ids, mode="sum_then_normalize")
    assert_close(advantages, torch.tensor([-0.25, -0.25, 0.75, -0.25]) / (math.sqrt(0.1875) + EPS))
    # normalise then sum: a -> (-.5, .5, -.5, .5) / (.5 + eps); b: mean 1.5, variance 2.75
    advantages, _ = compose_rewards(rewards, weights, ids, mode="normalize_then_sum")
    expected = (torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (0.5 + EPS)
                + 0.5 * torch.tensor([0.5, -1.5, 2.5, -1.5]) / (math.sqrt(2.75) + EPS))
    assert_close(advantages, expected)
    assert stats == pytest.approx({"a/mean": 0.5, "a/std": 0.5, "b/mean": 1.5, "b/std": math.sqrt(2.75),
                                   "total/mean": 1.25, "total/std": math.sqrt(0.1875)})
    with pytest.raises(ValueError, match="no weight for reward"):
        compose_rewards(rewards, {"a": 1.0}, ids)

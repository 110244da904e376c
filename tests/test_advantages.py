"""group_advantages, clip_advantages, compose_rewards: hand-worked values."""

import math

import pytest
import torch
from torch.testing import assert_close

from shared.advantages import ADVANTAGE_SCALES, REWARD_COMPOSITIONS, clip_advantages, compose_rewards, group_advantages

EPS = 1e-4


def ids(*values):
    return torch.tensor(values, dtype=torch.long)


# ------------------------------------------------------------------------ group_advantages


def test_one_group_by_hand():
    # rewards (1, 2, 3): mean 2; population variance (1 + 0 + 1) / 3 = 2/3, std 0.816497
    # A = (-1, 0, 1) / (0.816497 + 1e-4) = (-1.224595, 0, 1.224595)
    out = group_advantages(torch.tensor([1.0, 2.0, 3.0]), ids(0, 0, 0))
    assert_close(out, torch.tensor([-1.224595, 0.0, 1.224595]))
    assert_close(out, torch.tensor([-1.0, 0.0, 1.0]) / (math.sqrt(2 / 3) + EPS))


def test_population_std_not_sample_std():
    # (0, 2): population std 1 (sample std would be sqrt(2)); eps = 0 gives exactly -1, 1
    assert_close(group_advantages(torch.tensor([0.0, 2.0]), ids(5, 5), eps=0.0), torch.tensor([-1.0, 1.0]))


def test_shuffled_ids_groups_of_different_sizes():
    rewards = torch.tensor([5.0, 1.0, 7.0, 3.0, 4.0, 8.0])
    group = ids(7, -2, 7, -2, 9, -2)
    # group 7: (5, 7): mean 6, std 1               -> -1/(1+eps), +1/(1+eps)
    # group -2: (1, 3, 8): mean 4, deviations (-3, -1, 4), variance 26/3, std 2.943920
    # group 9: a single member                     -> exactly 0
    s = math.sqrt(26 / 3) + EPS
    expected = torch.tensor([-1 / (1 + EPS), -3 / s, 1 / (1 + EPS), -1 / s, 0.0, 4 / s])
    out = group_advantages(rewards, group)
    assert_close(out, expected)
    assert out[4].item() == 0.0
    # Same batch, permuted: the advantages follow their members.
    perm = torch.tensor([3, 0, 5, 2, 4, 1])
    assert_close(group_advantages(rewards[perm], group[perm]), expected[perm])


def test_all_equal_and_single_member_groups_are_exactly_zero():
    # 0.11 is not representable: in float32 (0.11 * 3) / 3 - 0.11 = 7.45e-9, not 0, which
    # divided by (0 + eps) would look like signal. Constant groups must give exact zeros under every scale.
    rewards = torch.tensor([0.11, 0.11, 0.11, 0.7, 0.0, 1.0])
    group = ids(0, 0, 0, 1, 2, 2)
    for scale in ADVANTAGE_SCALES:
        out = group_advantages(rewards, group, scale=scale)
        assert torch.equal(out[:4], torch.zeros(4)), scale
    assert torch.equal(group_advantages(torch.full((4,), 0.3), ids(1, 1, 1, 1)), torch.zeros(4))


def test_batch_scale_by_hand():
    # group 0 (0, 2): centred (-1, 1); group 1 (4, 4): constant -> 0
    # batch population std of (0, 2, 4, 4): mean 2.5, variance (6.25 + 0.25 + 2.25 + 2.25) / 4 = 2.75
    # A = (-1, 1, 0, 0) / (sqrt(2.75) + eps) = (-0.602986, 0.602986, 0, 0)
    out = group_advantages(torch.tensor([0.0, 2.0, 4.0, 4.0]), ids(0, 0, 1, 1), scale="batch")
    assert_close(out, torch.tensor([-0.602986, 0.602986, 0.0, 0.0]))


def test_none_scale_is_centred_rewards():
    # Dr. GRPO: group 3 (1, 2, 6): mean 3 -> (-2, -1, 3); group 4 (10, 0): mean 5 -> (5, -5)
    out = group_advantages(torch.tensor([1.0, 10.0, 2.0, 0.0, 6.0]), ids(3, 4, 3, 4, 3), scale="none")
    assert_close(out, torch.tensor([-2.0, 5.0, -1.0, -5.0, 3.0]))


def test_integer_rewards():
    # 0/1 correctness (0, 1, 1, 0): mean 0.5, std 0.5 -> +-0.5 / 0.5001 = +-0.999800
    out = group_advantages(torch.tensor([0, 1, 1, 0]), ids(0, 0, 0, 0))
    assert out.dtype == torch.get_default_dtype()
    assert_close(out, torch.tensor([-0.999800, 0.999800, 0.999800, -0.999800]))


def test_float64_is_kept():
    out = group_advantages(torch.tensor([1.0, 3.0], dtype=torch.float64), ids(0, 0), eps=0.0)
    assert out.dtype == torch.float64
    assert_close(out, torch.tensor([-1.0, 1.0], dtype=torch.float64))


def test_nan_rewards_raise_with_count_and_positions():
    rewards = torch.tensor([1.0, float("nan"), 3.0, float("nan")])
    with pytest.raises(ValueError, match=r"2 NaN value\(s\) at positions \[1, 3\].*nan_policy='mask'"):
        group_advantages(rewards, ids(0, 0, 0, 1))


def test_nan_rewards_masked():
    rewards = torch.tensor([1.0, float("nan"), 3.0, float("nan"), 2.0, 6.0])
    group = ids(0, 0, 0, 1, 2, 2)
    # group 0 over the valid (1, 3): mean 2, std 1 -> (-1/(1+eps), 0, 1/(1+eps)); the NaN member gets 0
    # group 1: its only member is NaN -> 0
    # group 2 (2, 6): mean 4, std 2 -> (-2, 2) / (2 + eps)
    out = group_advantages(rewards, group, nan_policy="mask")
    one, two = 1 / (1 + EPS), 2 / (2 + EPS)
    assert_close(out, torch.tensor([-one, 0.0, one, 0.0, -two, two]))
    # batch std over the valid (1, 3, 2, 6): mean 3, variance (4 + 0 + 1 + 9) / 4 = 3.5
    out = group_advantages(rewards, group, scale="batch", nan_policy="mask")
    b = math.sqrt(3.5) + EPS
    assert_close(out, torch.tensor([-1 / b, 0.0, 1 / b, 0.0, -2 / b, 2 / b]))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"scale must be one of \['batch', 'group', 'none'\], got 'global'"):
        group_advantages(torch.ones(2), ids(0, 0), scale="global")
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        group_advantages(torch.ones(2), ids(0, 0), nan_policy="ignore")
    with pytest.raises(ValueError, match=r"rewards has shape \(3,\) but group_ids has shape \(2,\)"):
        group_advantages(torch.ones(3), ids(0, 0))
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.ones(2, 2), ids(0, 0, 1, 1))
    with pytest.raises(ValueError, match="integer dtype"):
        group_advantages(torch.ones(2), torch.zeros(2))
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.ones(2), ids(0, 0), eps=-1.0)


def test_empty_batch():
    assert group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


# ------------------------------------------------------------------------ clip_advantages


def test_clip_advantages():
    assert_close(clip_advantages(torch.tensor([-7.0, -5.0, 2.0, 9.0]), 5.0), torch.tensor([-5.0, -5.0, 2.0, 5.0]))
    with pytest.raises(ValueError, match="max_abs"):
        clip_advantages(torch.ones(2), 0.0)


# ------------------------------------------------------------------------ compose_rewards

REWARDS = {"a": torch.tensor([0.0, 1.0, 0.0, 1.0]), "b": torch.tensor([2.0, 0.0, 4.0, 0.0])}
WEIGHTS = {"a": 1.0, "b": 0.5}
ONE_GROUP = ids(0, 0, 0, 0)


def test_sum_then_normalize_by_hand():
    # total = a + 0.5 b = (1, 1, 2, 1): mean 1.25; variance (3 * 0.0625 + 0.5625) / 4 = 0.1875, std 0.433013
    # A = (-0.25, -0.25, 0.75, -0.25) / (0.433013 + eps) = (-0.577217, -0.577217, 1.731651, -0.577217)
    advantages, stats = compose_rewards(REWARDS, WEIGHTS, ONE_GROUP, mode="sum_then_normalize")
    assert_close(advantages, torch.tensor([-0.577217, -0.577217, 1.731651, -0.577217]))
    assert stats == pytest.approx(
        {
            "a/mean": 0.5,
            "a/std": 0.5,  # (0, 1, 0, 1)
            "b/mean": 1.5,
            "b/std": math.sqrt(2.75),  # (2, 0, 4, 0): deviations (.5, -1.5, 2.5, -1.5), variance 11/4
            "total/mean": 1.25,
            "total/std": math.sqrt(0.1875),
        }
    )


def test_normalize_then_sum_by_hand():
    # a: mean 0.5, std 0.5 -> (-0.5, 0.5, -0.5, 0.5) / 0.5001 = (-0.99980, 0.99980, ...)
    # b: mean 1.5, std sqrt(2.75) = 1.658312 -> (0.5, -1.5, 2.5, -1.5) / 1.658412
    #    = (0.301493, -0.904479, 1.507466, -0.904479)
    # A = a_adv + 0.5 b_adv = (-0.99980 + 0.150747, 0.99980 - 0.452240, -0.99980 + 0.753733, 0.99980 - 0.452240)
    #   = (-0.849053, 0.547560, -0.246067, 0.547560)
    advantages, stats = compose_rewards(REWARDS, WEIGHTS, ONE_GROUP, mode="normalize_then_sum")
    assert_close(advantages, torch.tensor([-0.849053, 0.547560, -0.246067, 0.547560]))
    assert stats["total/mean"] == pytest.approx(1.25)  # stats describe the raw rewards in both modes


def test_single_reward_equals_group_advantages_in_both_modes():
    rewards, group = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0]), ids(2, 2, 0, 0, 0)
    expected = group_advantages(rewards, group)
    for mode in REWARD_COMPOSITIONS:
        advantages, _ = compose_rewards({"r": rewards}, {"r": 1.0}, group, mode=mode)
        assert_close(advantages, expected)


def test_compose_scale_and_groups_pass_through():
    # scale "none", two groups: total = (1, 1 | 2, 1) -> centred (0, 0 | 0.5, -0.5)
    advantages, _ = compose_rewards(REWARDS, WEIGHTS, ids(0, 0, 1, 1), scale="none")
    assert_close(advantages, torch.tensor([0.0, 0.0, 0.5, -0.5]))


def test_compose_errors():
    with pytest.raises(ValueError, match=r"no weight for reward\(s\) \['b'\]"):
        compose_rewards(REWARDS, {"a": 1.0}, ONE_GROUP)
    with pytest.raises(ValueError, match=r"\['c'\] that are not in rewards"):
        compose_rewards(REWARDS, {**WEIGHTS, "c": 1.0}, ONE_GROUP)
    with pytest.raises(ValueError, match="mode must be one of"):
        compose_rewards(REWARDS, WEIGHTS, ONE_GROUP, mode="average")
    with pytest.raises(ValueError, match="rewards is empty"):
        compose_rewards({}, {}, ONE_GROUP)
    with pytest.raises(ValueError, match=r"rewards\['a'\] has shape \(3,\)"):
        compose_rewards({"a": torch.ones(3)}, {"a": 1.0}, ONE_GROUP)


def test_compose_nan_policy():
    rewards = {"a": torch.tensor([0.0, float("nan"), 2.0]), "b": torch.tensor([1.0, 1.0, 1.0])}
    with pytest.raises(ValueError, match="NaN"):
        compose_rewards(rewards, {"a": 1.0, "b": 1.0}, ids(0, 0, 0))
    # masked: total (1, NaN, 3) -> over (1, 3): mean 2, std 1 -> (-1, 0, 1) / (1 + eps)
    advantages, stats = compose_rewards(rewards, {"a": 1.0, "b": 1.0}, ids(0, 0, 0), nan_policy="mask")
    assert_close(advantages, torch.tensor([-1.0, 0.0, 1.0]) / (1 + EPS))
    assert stats["a/mean"] == pytest.approx(1.0) and stats["total/std"] == pytest.approx(1.0)

"""zero_variance_group_mask (DAPO dynamic sampling)."""

import pytest
import torch

from shared.filtering import zero_variance_group_mask


def test_zero_variance_groups_dropped_by_hand():
    # 0/1 correctness, G = 2: group 0 (1, 1) all right, group 2 (0, 0) all wrong -> dropped;
    # group 1 (0, 1) has 0 < #correct < G -> kept. 2 of 3 groups dropped.
    keep, dropped = zero_variance_group_mask(torch.tensor([1, 1, 0, 1, 0, 0]), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert keep.tolist() == [False, False, True, True, False, False]
    assert dropped == pytest.approx(2 / 3)


def test_tolerance_shuffled_ids_and_single_member_group():
    rewards = torch.tensor([0.5, 0.0, 0.51, 1.0, 3.0])
    group = torch.tensor([3, 8, 3, 8, -1])
    # group 3 (0.5, 0.51): std 0.005 <= tol 0.01 -> dropped; group 8 (0, 1): std 0.5 -> kept;
    # group -1: one member, std 0 -> dropped. 2 of 3 dropped.
    keep, dropped = zero_variance_group_mask(rewards, group, tol=0.01)
    assert keep.tolist() == [False, True, False, True, False]
    assert dropped == pytest.approx(2 / 3)
    keep, dropped = zero_variance_group_mask(rewards, group)  # tol 0: group 3 is kept
    assert keep.tolist() == [True, True, True, True, False] and dropped == pytest.approx(1 / 3)


def test_equal_non_representable_rewards_count_as_zero_variance():
    # (0.11, 0.11, 0.11): in float32 the mean is off by 7.45e-9; the std must still be exactly 0, not > tol = 0
    keep, dropped = zero_variance_group_mask(torch.full((3,), 0.11), torch.zeros(3, dtype=torch.long))
    assert keep.tolist() == [False, False, False] and dropped == 1.0


def test_errors_and_empty():
    with pytest.raises(ValueError, match="NaN"):
        zero_variance_group_mask(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="tol"):
        zero_variance_group_mask(torch.ones(2), torch.tensor([0, 0]), tol=-1.0)
    with pytest.raises(ValueError, match="group_ids has shape"):
        zero_variance_group_mask(torch.ones(2), torch.tensor([0, 0, 0]))
    keep, dropped = zero_variance_group_mask(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert keep.shape == (0,) and dropped == 0.0

import torch

from shared.filtering import zero_variance_group_mask


def test_zero_variance_groups_dropped_by_hand():
    # group 0 (1, 1) and group 2 (2, 2) have no spread; group 1 (0, 1) does
    keep, dropped = zero_variance_group_mask(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]),
                                             torch.tensor([0, 0, 1, 1, 2, 2]))
    assert keep.tolist() == [False, False, True, True, False, False]
    assert abs(dropped - 2 / 3) < 1e-12


def test_tolerance_and_shuffled_ids():
    rewards, ids = torch.tensor([0.5, 0.0, 0.51, 1.0]), torch.tensor([3, 8, 3, 8])
    keep, dropped = zero_variance_group_mask(rewards, ids, tol=0.01)  # group 3 std 0.005 <= 0.01
    assert keep.tolist() == [False, True, False, True] and dropped == 0.5

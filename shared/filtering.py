"""Group filtering: DAPO dynamic sampling drops groups that carry no advantage signal."""

from __future__ import annotations

import torch
from torch import Tensor

from shared.advantages import _as_float, _check_rewards_and_groups, _group_index, _group_moments

__all__ = ["zero_variance_group_mask"]


def zero_variance_group_mask(rewards: Tensor, group_ids: Tensor, tol: float = 0.0) -> tuple[Tensor, float]:
    """Keep the members of groups whose reward std exceeds ``tol``.

    With 0/1 correctness rewards and tol = 0 this is DAPO's 0 < #correct < G. The std is the
    population std; a group whose rewards are all equal (single-member groups included) has
    std exactly 0 and is dropped.

    Args:
        rewards: [N] rewards (NaN not allowed: handle failed rewards first).
        group_ids: [N] integer group ids, any order, any group sizes.
        tol: groups with std <= tol are dropped.

    Returns:
        (keep [N] bool, dropped_fraction) with dropped_fraction = dropped groups / groups
        (0.0 for an empty batch).
    """
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    _check_rewards_and_groups(rewards, group_ids)
    rewards = _as_float(rewards)  # [N]
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=rewards.device), 0.0
    nan = torch.isnan(rewards)  # [N]
    if bool(nan.any()):
        raise ValueError(
            f"rewards contain {int(nan.sum())} NaN value(s) at positions {torch.nonzero(nan).flatten().tolist()[:20]}; "
            "replace or drop them before filtering"
        )
    index, num_groups = _group_index(group_ids.to(rewards.device))  # [N]
    _, std, _ = _group_moments(rewards, index, ~nan, num_groups)  # [num_groups]
    keep_group = std > tol  # [num_groups]
    dropped_fraction = float((~keep_group).sum()) / num_groups
    return keep_group[index], dropped_fraction

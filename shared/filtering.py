"""Group filtering: DAPO's dynamic sampling keeps only groups whose rewards differ."""

from __future__ import annotations

import torch
from torch import Tensor


def zero_variance_group_mask(rewards: Tensor, group_ids: Tensor, tol: float = 0.0) -> tuple[Tensor, float]:
    """(keep [N] bool, dropped_fraction): keep members of groups whose population reward std > tol.
    A group with all-equal rewards has zero advantage everywhere and so no gradient; dropping it keeps
    the batch's effective size honest. dropped_fraction = dropped groups / groups."""
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    unique, index = torch.unique(group_ids, return_inverse=True)  # index [N]
    count = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, index, torch.ones_like(rewards, dtype=torch.float64))
    values = rewards.double()
    mean = torch.zeros_like(count).index_add_(0, index, values) / count  # [G]
    variance = torch.zeros_like(count).index_add_(0, index, (values - mean[index]) ** 2) / count  # [G]
    keep_group = variance.sqrt() > tol  # [G]
    dropped = 1.0 - keep_group.double().mean().item() if len(unique) else 0.0
    return keep_group[index], dropped

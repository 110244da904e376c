"""Group-relative advantages and reward composition (GRPO family).

For member i of group g with reward r_i:

    A_i = (r_i - mean_g(r)) / (scale + eps)

where the scale is chosen by name through ``ADVANTAGE_SCALES``:

- ``"group"``: the population std of the rewards in i's group (GRPO);
- ``"batch"``: the population std of all rewards in the batch (Flow-GRPO "global std");
- ``"none"``:  no division at all, A_i = r_i - mean_g(r) (Dr. GRPO).

All stds here are population stds (divide by n, ``unbiased=False``): a group of G samples is
the whole population we normalise, and the sample std is undefined for G = 1.

A group whose rewards are all equal (a single-member group included) gets advantages that are
exactly 0: it carries no learning signal, and computing r - mean in floating point could
otherwise leave values of order 1e-8 / eps = 1e-4 that look like signal.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGE_SCALES",
    "REWARD_COMPOSITIONS",
    "clip_advantages",
    "compose_rewards",
    "group_advantages",
    "sequence_to_tokens",
]

NAN_POLICIES = ("raise", "mask")


# ----------------------------------------------------------------------------- helpers


def _check_rewards_and_groups(rewards: Tensor, group_ids: Tensor, name: str = "rewards") -> None:
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"{name} must be a 1-D tensor [N], got {shape}; flatten it with .reshape(-1)")
    if not isinstance(group_ids, Tensor) or group_ids.dim() != 1:
        shape = tuple(group_ids.shape) if isinstance(group_ids, Tensor) else type(group_ids).__name__
        raise ValueError(f"group_ids must be a 1-D integer tensor [N], got {shape}")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(
            f"group_ids must have an integer dtype, got {group_ids.dtype}; "
            "pass e.g. torch.arange(B).repeat_interleave(G)"
        )
    if rewards.shape != group_ids.shape:
        raise ValueError(
            f"{name} has shape {tuple(rewards.shape)} but group_ids has shape "
            f"{tuple(group_ids.shape)}; give one group id per reward"
        )


def _as_float(rewards: Tensor) -> Tensor:
    # Integer rewards (e.g. 0/1 correctness) are fine; the arithmetic needs floats.
    return rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())


def _nan_mask(rewards: Tensor, nan_policy: str) -> Tensor:
    """Bool [N]: members whose reward is usable. Raises on NaN under nan_policy="raise"."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    nan = torch.isnan(rewards)  # [N]
    if nan_policy == "raise" and bool(nan.any()):
        positions = torch.nonzero(nan).flatten().tolist()
        shown = positions[:20] + (["..."] if len(positions) > 20 else [])
        raise ValueError(
            f"rewards contain {len(positions)} NaN value(s) at positions {shown}; fix the reward "
            "function, or pass nan_policy='mask' to give those members advantage 0 and leave "
            "them out of the group statistics"
        )
    return ~nan


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary integer ids to 0..num_groups-1. Returns (index [N], num_groups)."""
    uniques, index = torch.unique(group_ids, return_inverse=True)
    return index, int(uniques.numel())


def _group_moments(values: Tensor, index: Tensor, valid: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group mean, population std and "constant" flag over the valid members.

    Returns (mean [num_groups], std [num_groups], constant [num_groups] bool). A group is
    constant when all its valid members are equal (or it has at most one, or none); its std
    is then exactly 0, not a rounding residue.
    """
    zeros = values.new_zeros(num_groups)
    weight = valid.to(values.dtype)  # [N]
    safe = torch.where(valid, values, torch.zeros_like(values))  # [N] NaN-free
    count = zeros.index_add(0, index, weight).clamp(min=1)  # [num_groups]
    mean = zeros.index_add(0, index, safe) / count  # [num_groups]
    dev = torch.where(valid, values - mean[index], torch.zeros_like(values))  # [N]
    std = (zeros.index_add(0, index, dev * dev) / count).sqrt()  # [num_groups]
    # Exact equality test: max == min over valid members (empty groups: -inf <= inf).
    high = torch.where(valid, values, torch.full_like(values, -math.inf)).detach()  # [N]
    low = torch.where(valid, values, torch.full_like(values, math.inf)).detach()  # [N]
    gmax = torch.full_like(zeros, -math.inf).scatter_reduce(0, index, high, "amax")  # [num_groups]
    gmin = torch.full_like(zeros, math.inf).scatter_reduce(0, index, low, "amin")  # [num_groups]
    constant = gmax <= gmin  # [num_groups]
    std = torch.where(constant, torch.zeros_like(std), std)
    return mean, std, constant


def _population_std(values: Tensor, valid: Tensor) -> Tensor:
    """Population std (unbiased=False) of the valid entries; 0 if fewer than two or all equal."""
    kept = values[valid]
    if kept.numel() < 2 or bool(kept.max() == kept.min()):
        return values.new_zeros(())
    return kept.std(unbiased=False)


# ----------------------------------------------------------------------------- scales
# Each scale maps the centred rewards to advantages. Arguments:
#   centred [N] (r - group mean, exactly 0 for constant groups and masked members),
#   rewards [N], index [N] (group of each member), valid [N] bool, group_std [num_groups], eps.


def _scale_group(
    centred: Tensor, rewards: Tensor, index: Tensor, valid: Tensor, group_std: Tensor, eps: float
) -> Tensor:
    return centred / (group_std[index] + eps)  # [N]


def _scale_batch(
    centred: Tensor, rewards: Tensor, index: Tensor, valid: Tensor, group_std: Tensor, eps: float
) -> Tensor:
    # Flow-GRPO global std: one std over every valid reward in the batch, not around group means.
    return centred / (_population_std(rewards, valid) + eps)  # [N]


def _scale_none(
    centred: Tensor, rewards: Tensor, index: Tensor, valid: Tensor, group_std: Tensor, eps: float
) -> Tensor:
    # Dr. GRPO: dividing by the std up-weights easy/hard prompts with tiny spread; don't.
    return centred  # [N]


ADVANTAGE_SCALES: dict[str, Callable[..., Tensor]] = {
    "group": _scale_group,
    "batch": _scale_batch,
    "none": _scale_none,
}


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    scale: str = "group",
    eps: float = 1e-4,
    nan_policy: str = "raise",
) -> Tensor:
    """Group-relative advantages A_i = (r_i - mean_g r) / (std + eps).

    Args:
        rewards: [N] rewards (float or integer).
        group_ids: [N] integer group of each member; ids in any order, not contiguous,
            groups of any size.
        scale: "group" (population std of i's group), "batch" (population std of the whole
            batch, Flow-GRPO global std) or "none" (no division, Dr. GRPO); see
            ``ADVANTAGE_SCALES``. Stds use ``unbiased=False`` (divide by n).
        eps: added to the std before dividing (GRPO uses 1e-4).
        nan_policy: "raise" (ValueError naming the NaN positions) or "mask" (NaN members get
            advantage 0 and are excluded from every mean and std).

    Returns:
        [N] advantages, in rewards' float dtype. Groups whose (valid) rewards are all equal,
        single-member groups included, get exactly 0.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {sorted(ADVANTAGE_SCALES)}, got {scale!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    _check_rewards_and_groups(rewards, group_ids)
    rewards = _as_float(rewards)  # [N]
    if rewards.numel() == 0:
        return rewards.clone()
    valid = _nan_mask(rewards, nan_policy)  # [N] bool
    index, num_groups = _group_index(group_ids.to(rewards.device))  # [N]
    mean, std, constant = _group_moments(rewards, index, valid, num_groups)
    live = valid & ~constant[index]  # [N] members that carry signal
    centred = torch.where(live, rewards - mean[index], torch.zeros_like(rewards))  # [N]
    return ADVANTAGE_SCALES[scale](centred, rewards, index, valid, std, eps)


def clip_advantages(advantages: Tensor, max_abs: float) -> Tensor:
    """Clamp advantages to [-max_abs, max_abs] (Flow-GRPO uses max_abs = 5)."""
    if not max_abs > 0:
        raise ValueError(f"max_abs must be > 0, got {max_abs}; to disable clipping, don't call clip_advantages")
    return advantages.clamp(-max_abs, max_abs)


def sequence_to_tokens(advantages: Tensor, width: int) -> Tensor:
    """[B] per-sequence advantages as per-token advantages [B, T=width]: each sequence's value on every token.

    Per-token advantages are the interface between the advantage and the update: sequence methods (GRPO, Dr. GRPO,
    DAPO) broadcast one value like this; token- or segment-level methods fill [B, T] themselves. Padding positions
    hold the value too; the losses mask them.
    """
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be [B], got shape {tuple(advantages.shape)}")
    return advantages[:, None].expand(-1, width).clone()  # [B, T]


# ----------------------------------------------------------------------------- composition


def _sum_then_normalize(rewards, weights, group_ids, scale, eps, nan_policy) -> Tensor:
    # One scalar reward per sample, then one normalisation: rewards on large scales dominate.
    total = sum(weights[name] * _as_float(r) for name, r in rewards.items())  # [N]
    return group_advantages(total, group_ids, scale=scale, eps=eps, nan_policy=nan_policy)


def _normalize_then_sum(rewards, weights, group_ids, scale, eps, nan_policy) -> Tensor:
    # MixGRPO / DanceGRPO: each reward is normalised in its group first, so the weights
    # compare rewards on equal footing whatever their raw scales.
    return sum(
        weights[name] * group_advantages(r, group_ids, scale=scale, eps=eps, nan_policy=nan_policy)
        for name, r in rewards.items()
    )  # [N]


REWARD_COMPOSITIONS: dict[str, Callable[..., Tensor]] = {
    "sum_then_normalize": _sum_then_normalize,
    "normalize_then_sum": _normalize_then_sum,
}


def _mean_std(values: Tensor) -> tuple[float, float]:
    """Mean and population std of the non-NaN entries, as python floats (NaN if none)."""
    kept = values[~torch.isnan(values)].detach().double()
    if kept.numel() == 0:
        return math.nan, math.nan
    return float(kept.mean()), float(kept.std(unbiased=False))


def compose_rewards(
    rewards: dict[str, Tensor],
    weights: dict[str, float],
    group_ids: Tensor,
    mode: str = "sum_then_normalize",
    scale: str = "group",
    eps: float = 1e-4,
    nan_policy: str = "raise",
) -> tuple[Tensor, dict[str, float]]:
    """Advantages from several named rewards.

    mode "sum_then_normalize": A = group_advantages(sum_k w_k r_k).
    mode "normalize_then_sum": A = sum_k w_k group_advantages(r_k) (MixGRPO / DanceGRPO).

    Args:
        rewards: name -> [N] raw rewards.
        weights: name -> weight; must have exactly the same names as ``rewards``.
        group_ids, scale, eps, nan_policy: as in ``group_advantages``.

    Returns:
        (advantages [N], stats) with stats[f"{name}/mean"], stats[f"{name}/std"] for each raw
        reward and stats["total/mean"], stats["total/std"] for the weighted raw sum
        sum_k w_k r_k (population std, NaN entries ignored).
    """
    if mode not in REWARD_COMPOSITIONS:
        raise ValueError(f"mode must be one of {sorted(REWARD_COMPOSITIONS)}, got {mode!r}")
    if not rewards:
        raise ValueError("rewards is empty; give at least one name -> [N] reward tensor")
    missing = sorted(set(rewards) - set(weights))
    unknown = sorted(set(weights) - set(rewards))
    if missing:
        raise ValueError(f"no weight for reward(s) {missing}; add them to weights (weights has {sorted(weights)})")
    if unknown:
        raise ValueError(f"weights name reward(s) {unknown} that are not in rewards {sorted(rewards)}; remove them")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weights[{name!r}] must be a finite number, got {w!r}")
    for name, r in rewards.items():
        _check_rewards_and_groups(r, group_ids, name=f"rewards[{name!r}]")

    advantages = REWARD_COMPOSITIONS[mode](rewards, weights, group_ids, scale, eps, nan_policy)  # [N]

    stats: dict[str, float] = {}
    for name, r in rewards.items():
        stats[f"{name}/mean"], stats[f"{name}/std"] = _mean_std(_as_float(r))
    total = sum(weights[name] * _as_float(r) for name, r in rewards.items())  # [N]
    stats["total/mean"], stats["total/std"] = _mean_std(total)
    return advantages, stats

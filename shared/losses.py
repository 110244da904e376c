"""Clipped policy-gradient loss (PPO/GRPO family) and its aggregation modes.

Per element t of sequence i (a token, or a denoising step for flows):
    ratio = exp(logp_new - logp_old)
    l_it  = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i)
Aggregation over the mask M (chosen by name through LOSS_AGGREGATIONS):
    grpo:    mean over sequences of (sum_t M l / sum_t M)        rows with no unmasked element are left out
    dapo:    sum_{i,t} M l / sum_{i,t} M                          token mean over the whole batch
    dr_grpo: sum_{i,t} M l / (B * L_max)                          constant normaliser (Dr. GRPO)
"""

from __future__ import annotations

import torch
from torch import Tensor


def _grpo(loss: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    tokens = mask.sum(dim=1)  # [B]
    per_sequence = (loss * mask).sum(dim=1) / tokens.clamp_min(1)  # [B]
    rows = (tokens > 0).float()  # [B] fully masked rows have no loss to average
    return (per_sequence * rows).sum() / rows.sum().clamp_min(1)


def _dapo(loss: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def _dr_grpo(loss: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    return (loss * mask).sum() / (loss.shape[0] * (max_length or loss.shape[1]))


LOSS_AGGREGATIONS = {"grpo": _grpo, "dapo": _dapo, "dr_grpo": _dr_grpo}


def clipped_policy_loss(logp_new: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor | None = None,
                        eps_low: float = 0.2, eps_high: float | None = None, aggregation: str = "grpo",
                        max_length: int | None = None) -> tuple[Tensor, dict[str, float]]:
    """Scalar loss and metrics (clip_frac_low/high, clip_frac, ratio_mean, ratio_max over unmasked elements).

    logp_new, logp_old: [B, T]; advantages: [B] (one per sequence) or [B, T]; mask: [B, T] (None = all).
    Gradients flow to logp_new only. eps_high defaults to eps_low (DAPO's clip-higher sets it larger).
    """
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {sorted(LOSS_AGGREGATIONS)}, got {aggregation!r}")
    if logp_new.shape != logp_old.shape or logp_new.ndim != 2:
        raise ValueError(f"logp_new and logp_old must both be [B, T]; got {tuple(logp_new.shape)} and {tuple(logp_old.shape)}")
    eps_high = eps_low if eps_high is None else eps_high
    if advantages.ndim == 1:
        advantages = advantages[:, None]  # [B, 1] broadcasts over T
    mask = torch.ones_like(logp_new) if mask is None else mask.to(logp_new.dtype)  # [B, T]
    ratio = torch.exp(logp_new - logp_old.detach())  # [B, T]
    advantages = advantages.detach().to(logp_new.dtype)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)  # [B, T]
    total = LOSS_AGGREGATIONS[aggregation](loss, mask, max_length)
    with torch.no_grad():
        active = mask > 0
        count = active.sum().clamp_min(1)
        low = (ratio < 1 - eps_low) & (advantages < 0) & active  # the lower clip binds
        high = (ratio > 1 + eps_high) & (advantages > 0) & active  # the upper clip binds
        metrics = {
            "clip_frac_low": (low.sum() / count).item(),
            "clip_frac_high": (high.sum() / count).item(),
            "ratio_mean": (ratio * mask).sum().div(count).item(),
            "ratio_max": ratio[active].max().item() if active.any() else 1.0,
        }
        metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    return total, metrics

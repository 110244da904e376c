"""GRPO-Guard (Wang et al., 2025, arXiv 2510.22319): RatioNorm and gradient reweighting for flow GRPO.

One denoising step is a Gaussian x' ~ N(mu, s^2) with s = sigma_t * sqrt(dt) (Flow-GRPO's SDE step, dt = sigma -
sigma_next > 0). With x' drawn from the old policy, x' = mu_old + s * eps, and d = mu_theta - mu_old, the log
importance ratio of one latent element is

    log r = [(x' - mu_old)^2 - (x' - mu_theta)^2] / (2 s^2) = -d^2 / (2 s^2) + eps * d / s.

Its mean -d^2 / (2 s^2) is below 0 and its spread d / s differs from step to step (the paper's observation: the
ratio is "left-shifted", so positive-advantage samples rarely reach the upper clip, and it is inconsistent across
steps, so one clip range acts unevenly). RatioNorm adds the bias back and rescales by s (the formula as the official
code computes it; the paper's text was not readable here beyond its abstract, which names ratio normalisation and
gradient reweighting across noise conditions):

    log r_hat = s * (log r + d^2 / (2 s^2)) = eps * d,

centred at 0 with a spread that no longer carries 1/s. Gradient reweighting: d moves with the velocity through
mu = x + v * dt * (1 + sigma_t^2 (1 - sigma) / (2 sigma)), so the gradient of eps * d carries a factor dt; the
official code divides each step's policy loss by dt (its `sqrt_dt.mean() ** 2`), which equalises the steps.

Two averaging orders over the C*H*W latent elements (GUARD_LOSSES), argued in yifan123/flow_grpo issues #223
and #244:
- "before_ratio" (the official code, train_sd3_GRPO_Guard.py): the log-ratio and the bias are averaged over the
  latent elements first (Flow-GRPO's log-prob is a mean over C*H*W), then normalised, then one ratio per sample
  is formed and clipped;
- "after_ratio" (the reading of issue #223, "the bias term is computed at the per-sample level first, and then
  the ratio is averaged afterward"): each latent element's log-ratio is normalised and exponentiated into its own
  ratio, clipped, and the clipped surrogate is averaged over the elements afterwards (a per-element PPO).
Normalising per element and then averaging the log-ratio gives exactly the "before_ratio" log-ratio (the
normalisation is affine with the same s for every element): the orders differ only in whether the mean over
elements is taken before or after exp and the clip.

Departures from the official code, and why:
- the official code averages sigma_t, sqrt(dt) and the bias over the batch before forming the ratio; every
  sample of its batch is at the same step, so sigma_t and sqrt(dt) are unchanged by that mean, but the bias
  `.mean(dim=tuple(range(1, log_prob.ndim)))` with a [B] log_prob is a mean over the batch too, which the authors
  confirmed a bug in issue #244 (it should be per sample). Here the bias is per row (sample, step), which also
  keeps the loss independent of the micro-batch size and the number of processes;
- s and dt are each row's own (flowalign's micro-batches mix steps), where the official code takes them from the
  step that its whole batch shares: the same numbers;
- x' - mu_old and d are formed from the recorded old mean and x' (float32/64), not from the difference of two
  rounded log-probs: mathematically the same log-ratio (the log std and log(2 pi) terms cancel).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["GUARD_LOSSES", "guard_log_ratio", "guard_loss_after_ratio", "guard_loss_before_ratio"]


def guard_log_ratio(next_latents: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor) -> Tensor:
    """RatioNorm's per-element log-ratio s * (log r + d^2 / (2 s^2)) (arXiv 2510.22319; official code), [B, D].

    next_latents, mean, old_mean: [B, ...] (x', mu_theta, mu_old); std: [B] or [B, 1, ...] the step's s > 0.
    Gradients reach `mean` only."""
    B = mean.shape[0]
    x = next_latents.detach().reshape(B, -1).to(mean.dtype)  # [B, D]
    mu, mu_old = mean.reshape(B, -1), old_mean.detach().reshape(B, -1).to(mean.dtype)  # [B, D] each
    s = std.detach().reshape(B, 1).to(mean.dtype)  # [B, 1]
    log_ratio = ((x - mu_old) ** 2 - (x - mu) ** 2) / (2 * s**2)  # [B, D] Gaussian log r per element
    bias = (mu - mu_old) ** 2 / (2 * s**2)  # [B, D] minus the mean of log r: the left shift
    return s * (log_ratio + bias)  # [B, D]


def _clipped_surrogate(ratio: Tensor, advantages: Tensor, clip_range: float) -> tuple[Tensor, Tensor]:
    """max(-A r, -A clip(r, 1 - eps, 1 + eps)) and whether the clip is active, elementwise (A broadcast)."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    active = ((advantages > 0) & (ratio > 1 + clip_range)) | ((advantages < 0) & (ratio < 1 - clip_range))
    return torch.maximum(unclipped, clipped), active


def _reweighted_mean(row_loss: Tensor, step_size: Tensor) -> Tensor:
    """Gradient reweighting: each row's loss over its step's dt (the official code's `/ sqrt_dt.mean()**2`)."""
    return (row_loss / step_size.detach().to(row_loss.dtype)).mean()


def guard_loss_before_ratio(
    next_latents: Tensor,
    mean: Tensor,
    old_mean: Tensor,
    std: Tensor,
    step_size: Tensor,
    advantages: Tensor,
    clip_range: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """GRPO-Guard, statistics averaged over the latent elements BEFORE the ratio (the official code's order).

    ratio_b = exp(s_b * (mean_i log r_bi + mean_i d_bi^2 / (2 s_b^2))); loss = mean_b l_b / dt_b with
    l_b = max(-A_b ratio_b, -A_b clip(ratio_b, 1 - eps, 1 + eps)).
    step_size: [B] dt = sigma - sigma_next > 0; advantages: [B]. Returns (loss, ratio [B], clipped [B] in {0, 1})."""
    log_ratio = guard_log_ratio(next_latents, mean, old_mean, std).mean(dim=1)  # [B]
    ratio = torch.exp(log_ratio)  # [B]
    row_loss, active = _clipped_surrogate(ratio, advantages.detach().to(ratio.dtype), clip_range)  # [B] each
    return _reweighted_mean(row_loss, step_size), ratio.detach(), active.to(ratio.dtype)


def guard_loss_after_ratio(
    next_latents: Tensor,
    mean: Tensor,
    old_mean: Tensor,
    std: Tensor,
    step_size: Tensor,
    advantages: Tensor,
    clip_range: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """GRPO-Guard, a ratio per latent element, averaged AFTER the ratio and the clip (issue #223's reading).

    ratio_bi = exp(s_b * (log r_bi + d_bi^2 / (2 s_b^2))); l_b = mean_i max(-A_b ratio_bi, -A_b clip(ratio_bi));
    loss = mean_b l_b / dt_b. Returns (loss, ratio [B] (mean over elements), clipped [B] (fraction of elements))."""
    ratio = torch.exp(guard_log_ratio(next_latents, mean, old_mean, std))  # [B, D]
    adv = advantages.detach().to(ratio.dtype)[:, None]  # [B, 1]
    elem_loss, active = _clipped_surrogate(ratio, adv, clip_range)  # [B, D] each
    return (
        _reweighted_mean(elem_loss.mean(dim=1), step_size),
        ratio.detach().mean(dim=1),
        active.to(ratio.dtype).mean(1),
    )


GuardLoss = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor, Tensor]]
GUARD_LOSSES: dict[str, GuardLoss] = {
    "before_ratio": guard_loss_before_ratio,
    "after_ratio": guard_loss_after_ratio,
}

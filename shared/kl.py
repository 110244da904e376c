"""KL estimators between the policy and a reference, per token or per denoising step.

With d = logp_ref - logp (log-probs of samples drawn from the policy):
    k1 = -d = logp - logp_ref              (unbiased, high variance, can be negative)
    k2 = d^2 / 2                           (biased, low variance)
    k3 = exp(d) - d - 1                    (unbiased, always >= 0; GRPO's choice)
For flows, where each step is Gaussian with the same std under both models:
    KL(N(m, s^2) || N(m_ref, s^2)) = ||m - m_ref||^2 / (2 s^2).
"""

from __future__ import annotations

from torch import Tensor


def kl_k1(logp: Tensor, logp_ref: Tensor) -> Tensor:
    return logp - logp_ref


def kl_k2(logp: Tensor, logp_ref: Tensor) -> Tensor:
    return 0.5 * (logp - logp_ref) ** 2


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    log_ratio = logp_ref - logp
    return log_ratio.exp() - log_ratio - 1


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def gaussian_mean_kl(mean: Tensor, mean_ref: Tensor, std: Tensor | float) -> Tensor:
    """||mean - mean_ref||^2 / (2 std^2) per element, averaged over all non-batch dims -> [B].
    std broadcasts (a float, [B, 1, ...] or the full shape)."""
    per_element = (mean - mean_ref) ** 2 / (2 * std**2)  # [B, ...]
    return per_element.flatten(1).mean(dim=1) if per_element.ndim > 1 else per_element

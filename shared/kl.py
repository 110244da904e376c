"""KL estimators to a reference policy.

Per-element estimators of KL(pi || pi_ref) from samples x ~ pi (Schulman's k1/k2/k3), with
logp = log pi(x), logp_ref = log pi_ref(x) and d = logp_ref - logp:

- k1 = -d = logp - logp_ref            (unbiased, high variance, can be negative)
- k2 = 0.5 * d^2                       (biased, low variance, >= 0)
- k3 = exp(d) - d - 1                  (unbiased, low variance, >= 0; GRPO's choice)

Gradients flow through both arguments; detach ``logp_ref`` when the reference is frozen.

``gaussian_mean_kl`` is the closed form used by flow samplers: two Gaussians with the same
std and different means (one SDE step of the policy vs. the reference). The std passed in decides
the form: the step's own std gives the exact one-step KL; the official Flow-GRPO code divides by
sigma_t^2 instead of the step variance sigma_t^2 (-dt) (flowalign.samplers.kl_std chooses).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["KL_ESTIMATORS", "gaussian_mean_kl", "kl_k1", "kl_k2", "kl_k3"]


def _check_same_shape(logp: Tensor, logp_ref: Tensor) -> None:
    if logp.shape != logp_ref.shape:
        raise ValueError(
            f"logp has shape {tuple(logp.shape)} but logp_ref has {tuple(logp_ref.shape)}; they must match"
        )


def kl_k1(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k1 = logp - logp_ref, per element."""
    _check_same_shape(logp, logp_ref)
    return logp - logp_ref


def kl_k2(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k2 = 0.5 * (logp - logp_ref)^2, per element."""
    _check_same_shape(logp, logp_ref)
    return 0.5 * (logp - logp_ref).square()


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1, per element (>= 0)."""
    _check_same_shape(logp, logp_ref)
    d = logp_ref - logp
    # expm1(d) - d == exp(d) - 1 - d, without cancellation for small d.
    return torch.expm1(d) - d


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def gaussian_mean_kl(mean: Tensor, mean_ref: Tensor, std: Tensor | float) -> Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) = ||mean - mean_ref||^2 / (2 std^2), averaged.

    Args:
        mean: [B, ...] policy mean.
        mean_ref: [B, ...] reference mean.
        std: shared std, > 0: a python float or 0-d tensor, a [B] tensor (one std per sample),
            or any tensor broadcastable to mean's shape (e.g. the full [B, ...] shape). A 1-D
            std of length B is always read as per-sample.

    Returns:
        [B]: the per-element KL averaged over all non-batch dimensions (Flow-GRPO averages
        over C*H*W).
    """
    if mean.shape != mean_ref.shape:
        raise ValueError(
            f"mean has shape {tuple(mean.shape)} but mean_ref has {tuple(mean_ref.shape)}; they must match"
        )
    if mean.dim() < 1:
        raise ValueError("mean must have a batch dimension, got a 0-d tensor")
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    B = mean.shape[0]
    if std.dim() == 1 and std.shape[0] == B and mean.dim() > 1:
        std = std.view(B, *([1] * (mean.dim() - 1)))  # [B, 1, ...] per-sample std
    try:
        shape = torch.broadcast_shapes(std.shape, mean.shape)
    except RuntimeError:
        shape = None
    if shape != mean.shape:
        raise ValueError(
            f"std of shape {tuple(std.shape)} does not broadcast to mean's shape {tuple(mean.shape)}; "
            "give a scalar, a [B] tensor or the full shape"
        )
    if bool((std <= 0).any()):
        raise ValueError("std must be > 0 everywhere; an ODE step (std = 0) has no Gaussian KL")
    kl = (mean - mean_ref).square() / (2 * std.square())  # [B, ...]
    return kl.reshape(B, -1).mean(dim=1)  # [B]

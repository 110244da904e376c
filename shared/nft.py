"""DiffusionNFT's loss (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
ICLR 2026, arXiv:2509.16117): negative-aware fine-tuning on the forward (noising) process.

A clean sample x0 with optimality probability r in [0, 1] is noised by the forward process at level t,
x_t = (1 - t) x0 + t eps (rectified flow), and the trained velocity v and the sampling ("old") policy's v_old
(no gradient) define two implicit policies:

    v+ = beta v + (1 - beta) v_old        (positive)
    v- = (1 + beta) v_old - beta v        (negative)

The paper's training loss pulls v+ towards the data of good samples and v- towards that of bad ones:

    L = r ||v+ - (eps - x0)||^2 + (1 - r) ||v- - (eps - x0)||^2

The official code (github NVlabs/DiffusionNFT, scripts/train_nft_sd3.py, read 2026-12-06) writes each term as an
x0 error, x0_hat = x_t - t v, which is t^2 times the velocity error, and divides it by its own detached mean
absolute error (the paper's adaptive loss weighting, clamped at 1e-5); both terms are divided by beta, and the
batch mean is multiplied by the advantage clip (5). The functions below follow the code; with
`adaptive=False` each term is the plain per-element mean of the x0 error.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["diffusion_nft_loss", "old_policy_decay", "optimality_probability", "velocity_gap"]

ADAPTIVE_FLOOR = 1e-5  # the official code's lower bound on the adaptive weight


def optimality_probability(advantages: Tensor, clip: float) -> Tensor:
    """DiffusionNFT's r from the advantages (its code): r = clip(A, -c, c) / (2 c) + 1/2, so A = -c, 0, c give
    r = 0, 1/2, 1. advantages: [N]; returns [N]."""
    return (advantages.clamp(-clip, clip) / clip / 2.0 + 0.5).clamp(0.0, 1.0)  # [N]


def _x0_error(predicted_x0: Tensor, clean: Tensor, adaptive: bool) -> Tensor:
    """Per-row mean squared x0 error [R], divided by its detached mean absolute error when `adaptive`."""
    dims = tuple(range(1, clean.ndim))
    error = predicted_x0 - clean  # [R, ...]
    squared = (error**2).mean(dim=dims)  # [R]
    if not adaptive:
        return squared
    with torch.no_grad():
        weight = error.double().abs().mean(dim=dims).clamp_min(ADAPTIVE_FLOOR)  # [R] (double, as the official code)
    return squared / weight.to(squared.dtype)  # [R]


def diffusion_nft_loss(
    velocity: Tensor,
    old_velocity: Tensor,
    noised: Tensor,
    clean: Tensor,
    t: Tensor,
    optimality: Tensor,
    beta: float,
    adaptive: bool = True,
    scale: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """DiffusionNFT's per-row loss (arXiv:2509.16117, in its code's x0 form; see the module docstring):

        x0+ = x_t - t v+,  x0- = x_t - t v-
        loss = scale * (r e(x0+) + (1 - r) e(x0-)) / beta,   e(x) = mean((x - x0)^2) [/ sg(mean|x - x0|)]

    velocity: [R, C, h, w] the trained policy's (differentiable); old_velocity: [R, C, h, w] the sampling policy's
    (treated as a constant); noised: [R, C, h, w] x_t; clean: [R, C, h, w] x0; t: [R] noise levels;
    optimality: [R] r in [0, 1]; scale: the official code multiplies by the advantage clip. Returns the per-row
    loss [R] and metrics: the positive and negative terms' means and old_deviation, mean (v - v_old)^2."""
    old_velocity = old_velocity.detach()
    t = t.to(velocity.dtype).view(-1, *([1] * (velocity.ndim - 1)))  # [R, 1, 1, 1]
    positive = beta * velocity + (1.0 - beta) * old_velocity  # [R, C, h, w]
    negative = (1.0 + beta) * old_velocity - beta * velocity  # [R, C, h, w]
    positive_error = _x0_error(noised - t * positive, clean, adaptive)  # [R]
    negative_error = _x0_error(noised - t * negative, clean, adaptive)  # [R]
    loss = scale * (optimality * positive_error + (1.0 - optimality) * negative_error) / beta  # [R]
    metrics = {
        "nft_positive": positive_error.detach().mean().item(),
        "nft_negative": negative_error.detach().mean().item(),
        "old_deviation": ((velocity.detach() - old_velocity) ** 2).mean().item(),
    }
    return loss, metrics


def velocity_gap(velocity: Tensor, reference_velocity: Tensor) -> Tensor:
    """DiffusionNFT code's KL term: per-row mean squared velocity gap to the reference [R]
    (mean over C, h, w of (v - v_ref)^2; the update weighs its batch mean by algorithm.kl_beta)."""
    dims = tuple(range(1, velocity.ndim))
    return ((velocity - reference_velocity.detach()) ** 2).mean(dim=dims)  # [R]


def old_policy_decay(optimizer_steps: int, rate: float, maximum: float, start: int = 0) -> float:
    """DiffusionNFT's soft update of the sampling ("old") policy, its code's return_decay: after each iteration
    old <- d old + (1 - d) current with d = min(rate (steps - start), maximum), and d = 0 before `start` steps.
    The official decay_type 1 is (0.001, 0.5, 0), type 2 (0.0075, 0.999, 75), type 0 d = 0 (on-policy)."""
    if optimizer_steps < start:
        return 0.0
    return min((optimizer_steps - start) * rate, maximum)

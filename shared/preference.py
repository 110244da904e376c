"""Pairwise preference losses on summed sequence log-probs.

Notation (all tensors [B], one entry per preference pair):
    pc, pr: policy log-prob of the chosen / rejected completion (summed over tokens);
    rc, rr: the same under the frozen reference;
    D = (pc - rc) - (pr - rr): margin of the implied rewards, s = sigmoid.

Every loss returns (losses [B], chosen_rewards [B], rejected_rewards [B]); the rewards are the
implied rewards for logging, detached: beta * (pc - rc) and beta * (pr - rr) for the losses
with a reference, beta / |y| * logp(y) for SimPO. Take ``losses.mean()`` for the batch loss.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PREFERENCE_LOSSES",
    "chosen_nll_loss",
    "dpo_sigmoid_loss",
    "dpop_loss",
    "hinge_loss",
    "ipo_loss",
    "robust_dpo_loss",
    "simpo_loss",
]


def _check_pairs(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(
            f"preference inputs must all be 1-D of the same shape [B], got {shapes}; sum log-probs over tokens first"
        )


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_lengths(**lengths: Tensor) -> None:
    for name, value in lengths.items():
        if bool((value <= 0).any()):
            raise ValueError(f"{name} must be > 0 (number of completion tokens), got {value.tolist()}")


def _logratio_margin(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    chosen = pc - rc  # [B]
    rejected = pr - rr  # [B]
    return chosen - rejected, chosen, rejected


def dpo_sigmoid_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO: -(1 - e) log s(beta D) - e log s(-beta D); e = label_smoothing in [0, 0.5) (cDPO)."""
    _check_pairs(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected
    )
    _check_beta(beta)
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    margin, chosen, rejected = _logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    logits = beta * margin  # [B]
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)  # [B]
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def dpop_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    lambda_: float = 50.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO-Positive (Pal et al., 2024, eq. 3): -log s(beta (D - lambda max(0, rc - pc))).

    The penalty is zero while the chosen completion is at least as likely as under the reference, and
    outweighs the margin once it falls below: when chosen and rejected differ in a few tokens (a wrong
    digit), plain DPO can widen D by lowering both, and the chosen answer loses probability to others.
    """
    _check_pairs(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected
    )
    _check_beta(beta)
    if not lambda_ >= 0:
        raise ValueError(f"lambda_ must be >= 0, got {lambda_}")
    margin, chosen, rejected = _logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    penalty = torch.relu(-chosen)  # [B] how far the chosen log-prob fell below the reference's
    losses = -F.logsigmoid(beta * (margin - lambda_ * penalty))  # [B]
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO: (D_avg - 1 / (2 beta))^2 with D_avg = (pc - rc) / |y_w| - (pr - rr) / |y_l|.

    The per-token average keeps the regression target 1/(2 beta) independent of length.
    """
    _check_pairs(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    _check_beta(beta)
    _check_lengths(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    chosen = policy_chosen - ref_chosen  # [B]
    rejected = policy_rejected - ref_rejected  # [B]
    margin_avg = chosen / chosen_lengths - rejected / rejected_lengths  # [B]
    losses = (margin_avg - 1 / (2 * beta)).square()  # [B]
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def robust_dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    flip_rate: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Robust DPO (labels flipped with probability e = flip_rate):

    [-(1 - e) log s(beta D) + e log s(-beta D)] / (1 - 2e), unbiased for the clean-label loss.
    """
    _check_pairs(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected
    )
    _check_beta(beta)
    if not 0 <= flip_rate < 0.5:
        raise ValueError(f"flip_rate must be in [0, 0.5), got {flip_rate}; at 0.5 the labels carry no information")
    margin, chosen, rejected = _logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    logits = beta * margin  # [B]
    losses = (-(1 - flip_rate) * F.logsigmoid(logits) + flip_rate * F.logsigmoid(-logits)) / (1 - 2 * flip_rate)  # [B]
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def hinge_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge (SLiC): relu(1 - beta D)."""
    _check_pairs(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected
    )
    _check_beta(beta)
    margin, chosen, rejected = _logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = torch.relu(1 - beta * margin)  # [B]
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def simpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO: -log s(beta / |y_w| logp(y_w) - beta / |y_l| logp(y_l) - gamma). No reference model.

    The implied rewards are the length-normalised beta / |y| logp(y).
    """
    _check_pairs(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    _check_beta(beta)
    _check_lengths(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    chosen = beta * policy_chosen / chosen_lengths  # [B]
    rejected = beta * policy_rejected / rejected_lengths  # [B]
    losses = -F.logsigmoid(chosen - rejected - gamma)  # [B]
    return losses, chosen.detach(), rejected.detach()


def chosen_nll_loss(policy_chosen: Tensor, chosen_lengths: Tensor) -> Tensor:
    """The length-normalised negative log-likelihood of the chosen completion, -logp(y_w) / |y_w|, [B].

    Added to a preference loss with a weight alpha it gives iterative RPO (Pang et al., 2024):
    -log s(beta D) - alpha logp(y_w) / |y_w|. When chosen and rejected answers share most of their
    tokens (a wrong digit), DPO alone can lower both; the NLL term keeps the chosen one likely.
    """
    _check_pairs(policy_chosen=policy_chosen, chosen_lengths=chosen_lengths)
    _check_lengths(chosen_lengths=chosen_lengths)
    return -policy_chosen / chosen_lengths  # [B]


# Names follow TRL's loss_type values; dpop, which TRL 1.16 lacks, is the paper's name. Signatures
# differ: ipo and simpo need lengths, simpo takes no reference log-probs.
PREFERENCE_LOSSES: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {
    "sigmoid": dpo_sigmoid_loss,
    "dpop": dpop_loss,
    "ipo": ipo_loss,
    "robust": robust_dpo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
}

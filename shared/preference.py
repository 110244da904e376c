"""Preference losses on summed sequence log-probs (DPO family).

Implied rewards r_w = logp(y_w) - logp_ref(y_w), r_l likewise; D = r_w - r_l. Per pair:
    sigmoid (DPO):  -(1 - e) log s(b D) - e log s(-b D)             (e = label smoothing)
    ipo:            (D_avg - 1 / (2 b))^2, D_avg from per-token averaged log-ratios
    robust (rDPO):  [-(1 - e) log s(b D) + e log s(-b D)] / (1 - 2e) (e = flip rate)
    hinge:          relu(1 - b D)
    simpo:          -log s(b / |y_w| logp(y_w) - b / |y_l| logp(y_l) - gamma)   (no reference)
Each returns (losses [B], chosen_rewards [B], rejected_rewards [B]); the rewards are detached, for logging.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def _implied(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected  # [B]
    return chosen - rejected, beta * chosen.detach(), beta * rejected.detach()


def dpo_sigmoid_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                     beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    margin, chosen, rejected = _implied(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    return losses, chosen, rejected


def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             chosen_lengths: Tensor, rejected_lengths: Tensor, beta: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    chosen = (policy_chosen - ref_chosen) / chosen_lengths  # [B] per-token averaged log-ratio
    rejected = (policy_rejected - ref_rejected) / rejected_lengths
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return losses, beta * chosen.detach(), beta * rejected.detach()


def robust_dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                    beta: float = 0.1, flip_rate: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    if not 0 <= flip_rate < 0.5:
        raise ValueError(f"flip_rate must be in [0, 0.5), got {flip_rate}; it is the assumed label-flip probability")
    margin, chosen, rejected = _implied(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    losses = (-(1 - flip_rate) * F.logsigmoid(beta * margin) + flip_rate * F.logsigmoid(-beta * margin)) / (1 - 2 * flip_rate)
    return losses, chosen, rejected


def hinge_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
               beta: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    margin, chosen, rejected = _implied(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return F.relu(1 - beta * margin), chosen, rejected


def simpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
               beta: float = 2.0, gamma: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    chosen = beta * policy_chosen / chosen_lengths  # [B] length-normalised, no reference model
    rejected = beta * policy_rejected / rejected_lengths
    return -F.logsigmoid(chosen - rejected - gamma), chosen.detach(), rejected.detach()


PREFERENCE_LOSSES = {"sigmoid": dpo_sigmoid_loss, "ipo": ipo_loss, "robust": robust_dpo_loss, "hinge": hinge_loss,
                     "simpo": simpo_loss}

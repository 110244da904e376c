"""Token-weighted DPO: TGDPO's per-token weights and the sigmoid DPO loss on weighted token log-ratios.

Notation (chosen y_w, rejected y_l; tensors [B, T], right-padded, with a 0/1 mask [B, T]):
    pc_t, pr_t: policy log-prob of token t of the chosen / rejected completion;
    rc_t, rr_t: the same under the frozen reference;
    rhat_t:     a guidance model's per-token log-ratio, log pi_guide(y_t) - log pi_ref(y_t).

TGDPO (token-level reward guidance) replaces DPO's constant beta by per-token weights

    w_w,t = beta (1 + alpha beta rhat_w,t)        on the chosen tokens,
    w_l,t = beta (1 - alpha beta rhat_l,t)        on the rejected tokens,

so a chosen token the guidance model rewards (beta rhat > 0) and a rejected token it penalises count
more, and the loss is the sigmoid DPO loss of the weighted margin

    z = sum_t w_w,t (pc_t - rc_t) - sum_t w_l,t (pr_t - rr_t),
    loss = -(1 - e) log s(z) - e log s(-z)       (e = label smoothing, s = sigmoid).

With alpha = 0 (or rhat = 0) every weight is beta and this is `shared.preference.dpo_sigmoid_loss`
on the summed log-probs. The weights are constants of the loss (the guidance model is frozen).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["tgdpo_token_weights", "weighted_dpo_sigmoid_loss"]


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"token tensors must all be 2-D [B, T] of the same shape, got {shapes}")


def tgdpo_token_weights(
    guidance_chosen: Tensor, guidance_rejected: Tensor, beta: float = 0.1, alpha: float = 1.0
) -> tuple[Tensor, Tensor]:
    """TGDPO weights: beta (1 + alpha beta rhat_w,t) on chosen tokens, beta (1 - alpha beta rhat_l,t) on rejected.

    guidance_chosen [B, T], guidance_rejected [B, T']: the guidance model's per-token log-ratios rhat.
    Returns (chosen_weights [B, T], rejected_weights [B, T']), detached.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0 (0 = plain DPO), got {alpha}")
    chosen = beta * (1 + alpha * beta * guidance_chosen.detach())  # [B, T]
    rejected = beta * (1 - alpha * beta * guidance_rejected.detach())  # [B, T']
    return chosen, rejected


def weighted_dpo_sigmoid_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    chosen_weights: Tensor,
    rejected_weights: Tensor,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """-(1 - e) log s(z) - e log s(-z), z = sum_t w_w,t (pc_t - rc_t) - sum_t w_l,t (pr_t - rr_t).

    Chosen tensors are [B, T], rejected [B, T'] (T and T' may differ); padded positions (mask 0) count
    nothing, whatever they hold. Returns (losses [B], chosen_rewards [B], rejected_rewards [B]) with the
    implied rewards sum_t w_t (p_t - r_t), detached, as `shared.preference` does.
    """
    _check_same_shape(
        policy_chosen=policy_chosen, ref_chosen=ref_chosen, chosen_mask=chosen_mask, chosen_weights=chosen_weights
    )
    _check_same_shape(
        policy_rejected=policy_rejected,
        ref_rejected=ref_rejected,
        rejected_mask=rejected_mask,
        rejected_weights=rejected_weights,
    )
    if policy_chosen.shape[0] != policy_rejected.shape[0]:
        raise ValueError(
            f"chosen has {policy_chosen.shape[0]} rows but rejected has {policy_rejected.shape[0]}; "
            f"pass one rejected completion per chosen one"
        )
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    # where(), not a product with the mask: the values at padded positions are arbitrary
    chosen = (chosen_weights * (policy_chosen - ref_chosen)).where(chosen_mask.bool(), 0.0).sum(-1)  # [B]
    rejected = (rejected_weights * (policy_rejected - ref_rejected)).where(rejected_mask.bool(), 0.0).sum(-1)  # [B]
    logits = chosen - rejected  # [B]
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)  # [B]
    return losses, chosen.detach(), rejected.detach()

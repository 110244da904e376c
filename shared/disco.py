"""DisCO: discriminative constrained optimisation for binary-reward reasoning (Li et al., 2025).

Per question, the completions split into correct (o+) and wrong (o-) ones. With a score s(o):

    "log_likelihood":   s(o) = (1/|o|) sum_t log pi(o_t | q, o_<t)
    "likelihood_ratio": s(o) = (1/|o|) sum_t pi(o_t | ...) / pi_old(o_t | ...)

the objective of a group is the mean score of its correct answers minus a soft maximum
(log-sum-exp with temperature tau) of the scores of its wrong ones:

    J_g = mean_{o+} s(o+) - tau * log mean_{o-} exp(s(o-) / tau)

Groups without both kinds carry no signal and are left out. The loss is
-mean_g J_g + (beta / 2) * max(KL - delta, 0)^2 with KL = KL(pi_old || pi), estimated on the
sampled tokens as the token mean of (logp_old - logp): a squared hinge that is zero inside the
trust region KL <= delta and pulls the policy back once it leaves it. No advantage, no clipping,
no std normalisation (whose difficulty bias DisCO removes).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["DISCO_SCORES", "disco_loss"]


def _score_log_likelihood(logp: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    return (logp * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [N]


def _score_likelihood_ratio(logp: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    log_ratio = torch.where(mask.bool(), logp - logp_old, torch.zeros_like(logp))  # [N, T]; no inf - inf
    return (log_ratio.exp() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [N]


DISCO_SCORES: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "log_likelihood": _score_log_likelihood,
    "likelihood_ratio": _score_likelihood_ratio,
}


def disco_loss(
    logp: Tensor,
    logp_old: Tensor,
    mask: Tensor,
    correct: Tensor,
    group_ids: Tensor,
    score: str = "log_likelihood",
    tau: float = 10.0,
    delta: float = 1e-4,
    penalty: float = 1e3,
) -> tuple[Tensor, dict[str, float]]:
    """DisCO loss over a batch of groups.

    Args:
        logp: [N, T] token log-probs under the policy being trained.
        logp_old: [N, T] token log-probs under the sampling policy (detached).
        mask: [N, T] 1 for completion tokens, 0 for padding.
        correct: [N] bool, whether each completion is right.
        group_ids: [N] integer group (question) of each completion.
        score: "log_likelihood" or "likelihood_ratio" (see ``DISCO_SCORES``).
        tau: temperature of the log-sum-exp over wrong answers (DisCO: 10).
        delta: KL budget of the trust region (DisCO: 1e-4).
        penalty: beta of the squared hinge (DisCO: 1e3).

    Returns:
        (loss, metrics) with metrics "groups_used" (groups with both kinds), "kl", "score_pos",
        "score_neg" (mean scores, NaN when there are none).
    """
    if score not in DISCO_SCORES:
        raise ValueError(f"score must be one of {sorted(DISCO_SCORES)}, got {score!r}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not (delta >= 0 and penalty >= 0):
        raise ValueError(f"delta and penalty must be >= 0, got delta={delta}, penalty={penalty}")
    if logp.dim() != 2 or logp_old.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, logp_old and mask must all be [N, T]; got {tuple(logp.shape)}, "
                         f"{tuple(logp_old.shape)}, {tuple(mask.shape)}")
    N = logp.shape[0]
    if correct.shape != (N,) or group_ids.shape != (N,):
        raise ValueError(f"correct and group_ids must be [N]={N}; got {tuple(correct.shape)}, {tuple(group_ids.shape)}")

    mask = mask.to(logp.dtype)  # [N, T]
    logp_old = logp_old.detach()
    scores = DISCO_SCORES[score](logp, logp_old, mask)  # [N]
    correct = correct.bool()
    objectives, used = [], torch.zeros(N, dtype=torch.bool, device=logp.device)
    groups = torch.unique(group_ids)
    for g in groups.tolist():
        member = group_ids == g  # [N]
        pos, neg = member & correct, member & ~correct  # [N]
        if not (pos.any() and neg.any()):
            continue
        soft_max_neg = tau * (torch.logsumexp(scores[neg] / tau, dim=0) - math.log(int(neg.sum())))
        objectives.append(scores[pos].mean() - soft_max_neg)
        used |= member
    objective = torch.stack(objectives).mean() if objectives else scores.sum() * 0.0  # stays in the graph

    token_mask = mask * used[:, None].to(mask.dtype)  # [N, T]: the trust region covers the groups trained on
    kl = ((logp_old - logp) * token_mask).sum() / token_mask.sum().clamp(min=1)
    loss = -objective + penalty / 2 * torch.relu(kl - delta) ** 2
    with torch.no_grad():
        metrics = {
            "groups_used": len(objectives) / max(len(groups), 1),
            "kl": float(kl),
            "score_pos": float(scores[correct].mean()) if correct.any() else float("nan"),
            "score_neg": float(scores[~correct].mean()) if (~correct).any() else float("nan"),
        }
    return loss, metrics

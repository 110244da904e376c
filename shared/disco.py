"""DisCO: discriminative constrained optimisation for binary-reward reasoning.

Li et al., 2025, "DisCO: Reinforcing Large Reasoning Models with Discriminative Constrained
Optimization", arXiv 2505.12366 (the objective and the squared-hinge penalty form of its constraint).

Per question q, the completions split into correct (o+) and wrong (o-) ones. With a score s(o):

    "log_likelihood":   s(o) = (1/|o|) sum_t log pi(o_t | q, o_<t)
    "likelihood_ratio": s(o) = (1/|o|) sum_t pi(o_t | ...) / pi_old(o_t | ...)

the objective of a question is the mean score of its correct answers minus a soft maximum
(log-sum-exp with temperature tau) of the scores of its wrong ones:

    J_q = mean_{o+} s(o+) - tau * log mean_{o-} exp(s(o-) / tau)

A question without both kinds has J_q = 0 (no contrast, no gradient) but still counts: the
objective is the mean over ALL questions of the batch, (1/Q) sum_q J_q, as in the authors' code
(the sum over mixed questions divided by the number of questions). The trust region is
KL(pi_old || pi) <= delta, estimated as the token mean over EVERY sampled completion of the batch
(all-correct and all-wrong questions included) of k1 = logp_old - logp, the authors' `ppo_kl_type=kl`
in their training scripts. The loss is

    L = -(1/Q) sum_q J_q + (beta / 2) * max(KL - delta, 0)^2

a squared hinge that is zero inside the trust region and pulls the policy back once it leaves it.
No advantage, no clipping, no std normalisation (whose difficulty bias DisCO removes).

Gradient accumulation. The hinge is not a sum over completions, so it does not split over micro-batches
as it stands. Its gradient is beta * max(K - delta, 0) * dK, with K the VALUE of the batch KL and dK a
sum over the batch's tokens. So a micro-batch that knows K (the caller computes it first: a no-grad pass
over the batch, or the in-graph value when the batch is one forward) and the batch's normalisers
(questions Q, KL tokens) contributes

    -(1/Q) sum_{q in part} J_q
    + (beta / 2) * max(K - delta, 0)^2 * (its tokens / the batch's tokens)        (value share, no gradient)
    + beta * max(K - delta, 0) * (k_part - stop_grad(k_part))                   (gradient, value 0)

with k_part = sum over its tokens of k1 / the batch's tokens. The parts' values and gradients sum to
the whole batch's loss and gradient exactly (tests/test_disco.py). The authors' code applies the same
gradient (their `max(beta (kl - delta), 0).detach() * kl`) with the KL of each micro-batch; here the
trust region is the one of the whole optimizer step, so micro-batching changes nothing.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["DISCO_SCORES", "disco_kl_sum", "disco_loss"]


def _score_log_likelihood(logp: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    return (logp * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [N]


def _score_likelihood_ratio(logp: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    log_ratio = torch.where(mask.bool(), logp - logp_old, torch.zeros_like(logp))  # [N, T]; no inf - inf
    return (log_ratio.exp() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [N]


DISCO_SCORES: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "log_likelihood": _score_log_likelihood,
    "likelihood_ratio": _score_likelihood_ratio,
}


def disco_kl_sum(logp: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    """Sum over the unmasked tokens of k1 = logp_old - logp (0-dim): the numerator of the trust-region KL.
    The batch KL is the sum of this over the batch's parts divided by their token count."""
    return torch.where(mask.bool(), logp_old.detach() - logp, torch.zeros_like(logp)).sum()  # no inf - inf


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
    questions: float | None = None,
    kl_tokens: float | None = None,
    batch_kl: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """DisCO loss of a batch of questions, or a part's share of it (module docstring).

    Args:
        logp: [N, T] token log-probs under the policy being trained.
        logp_old: [N, T] token log-probs under the sampling policy (detached).
        mask: [N, T] 1 for completion tokens, 0 for padding; a row without tokens (a dropped sample)
            takes no part, and a question without any such row is not counted.
        correct: [N] bool, whether each completion is right.
        group_ids: [N] integer group (question) of each completion.
        score: "log_likelihood" or "likelihood_ratio" (see ``DISCO_SCORES``).
        tau: temperature of the log-sum-exp over wrong answers (DisCO: 10).
        delta: KL budget of the trust region (DisCO: 1e-4).
        penalty: beta of the squared hinge (DisCO: 1e3).
        questions: Q, the number of questions of the whole batch (None: those here).
        kl_tokens: the number of tokens of the whole batch (None: those here).
        batch_kl: K, the value of the whole batch's KL when these rows are a part of it (None: these rows are
            the whole batch and K is computed here, in the graph).

    Returns:
        (loss, metrics): the loss (or this part's share of it: the shares sum to the batch's loss, and so do
        their gradients); metrics "groups_used" (the fraction of the questions here with both kinds),
        "trust_region_kl" (K), "score_pos", "score_neg" (mean scores here, NaN when there are none).
    """
    if score not in DISCO_SCORES:
        raise ValueError(f"score must be one of {sorted(DISCO_SCORES)}, got {score!r}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not (delta >= 0 and penalty >= 0):
        raise ValueError(f"delta and penalty must be >= 0, got delta={delta}, penalty={penalty}")
    if logp.dim() != 2 or logp_old.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, logp_old and mask must all be [N, T]; got {tuple(logp.shape)}, "
            f"{tuple(logp_old.shape)}, {tuple(mask.shape)}"
        )
    N = logp.shape[0]
    if correct.shape != (N,) or group_ids.shape != (N,):
        raise ValueError(f"correct and group_ids must be [N]={N}; got {tuple(correct.shape)}, {tuple(group_ids.shape)}")

    mask = mask.to(logp.dtype)  # [N, T]
    logp_old = logp_old.detach()
    scores = DISCO_SCORES[score](logp, logp_old, mask)  # [N]
    present = mask.sum(dim=1) > 0  # [N] a dropped sample is no answer at all
    pos_rows, neg_rows = present & correct.bool(), present & ~correct.bool()  # [N]
    objective_sum, mixed, counted = scores.sum() * 0.0, 0, 0  # the zero stays in the graph
    for g in torch.unique(group_ids[present]).tolist():
        member = group_ids == g  # [N]
        pos, neg = member & pos_rows, member & neg_rows  # [N]
        counted += 1
        if not (pos.any() and neg.any()):
            continue  # J_q = 0: nothing to contrast
        soft_max_neg = tau * (torch.logsumexp(scores[neg] / tau, dim=0) - math.log(int(neg.sum())))
        objective_sum = objective_sum + scores[pos].mean() - soft_max_neg
        mixed += 1
    questions = counted if questions is None else questions
    objective = objective_sum / max(questions, 1)

    tokens = mask.sum()
    kl_part = disco_kl_sum(logp, logp_old, mask) / (tokens.clamp(min=1) if kl_tokens is None else max(kl_tokens, 1))
    if batch_kl is None:  # these rows are the batch: the squared hinge itself
        kl_value = float(kl_part.detach())
        hinge = penalty / 2 * torch.relu(kl_part - delta) ** 2
    else:  # a part: its value share of the hinge and the hinge's exact gradient through its own tokens
        kl_value = float(batch_kl)
        excess = max(kl_value - delta, 0.0)
        share = float(tokens) / max(kl_tokens if kl_tokens is not None else float(tokens), 1.0)
        hinge = penalty / 2 * excess**2 * share + penalty * excess * (kl_part - kl_part.detach())
    loss = -objective + hinge
    with torch.no_grad():
        metrics = {
            "groups_used": mixed / max(counted, 1),
            "trust_region_kl": kl_value,
            "score_pos": float(scores[pos_rows].mean()) if pos_rows.any() else float("nan"),
            "score_neg": float(scores[neg_rows].mean()) if neg_rows.any() else float("nan"),
        }
    return loss, metrics

"""Clipped policy-gradient loss (PPO/GRPO surrogate) and its aggregations.

Per element (token t of sequence i, or denoising step t of trajectory i):

    ratio = exp(logp_new - logp_old)
    l     = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)

The [B, T] element losses are reduced by one of ``LOSS_AGGREGATIONS``:

- ``"grpo"``:    mean over sequences of each sequence's masked mean (rows with no unmasked
  element are left out of the mean over sequences);
- ``"dapo"``:    sum of masked losses / number of unmasked elements in the whole batch;
- ``"dr_grpo"``: sum of masked losses / (B * max_length), max_length defaulting to T.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "LOSS_AGGREGATIONS",
    "aggregation_denominator",
    "clipped_policy_loss",
    "sequence_ratio_policy_loss",
    "sppo_policy_loss",
]


# ----------------------------------------------------------------------------- aggregations
# Each takes (elem_loss [B, T] with zeros at masked places, mask [B, T] bool, max_length int)
# and returns a scalar that stays connected to the graph even when everything is masked.


def _aggregate_grpo(elem_loss: Tensor, mask: Tensor, max_length: int) -> Tensor:
    count = mask.sum(dim=1)  # [B]
    row_mean = elem_loss.sum(dim=1) / count.clamp(min=1)  # [B]; fully masked rows give 0
    num_rows = (count > 0).sum().clamp(min=1)
    return row_mean.sum() / num_rows


def _aggregate_dapo(elem_loss: Tensor, mask: Tensor, max_length: int) -> Tensor:
    # Token-level mean over the batch: long sequences weigh in proportion to their length.
    return elem_loss.sum() / mask.sum().clamp(min=1)


def _aggregate_dr_grpo(elem_loss: Tensor, mask: Tensor, max_length: int) -> Tensor:
    # Constant normaliser: no length bias from dividing by each sequence's own length.
    return elem_loss.sum() / (elem_loss.shape[0] * max_length)


LOSS_AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    "grpo": _aggregate_grpo,
    "dapo": _aggregate_dapo,
    "dr_grpo": _aggregate_dr_grpo,
}


# ----------------------------------------------------------------------------- loss


def _check_inputs(logp_new: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor | None) -> None:
    if logp_new.dim() != 2:
        raise ValueError(
            f"logp_new must be [B, T], got shape {tuple(logp_new.shape)}; use [B, 1] for one element per sample"
        )
    if logp_old.shape != logp_new.shape:
        raise ValueError(
            f"logp_old has shape {tuple(logp_old.shape)} but logp_new has {tuple(logp_new.shape)}; they must match"
        )
    B = logp_new.shape[0]
    if advantages.shape not in ((B,), logp_new.shape):
        raise ValueError(f"advantages must be [B]={B} or [B, T]={tuple(logp_new.shape)}, got {tuple(advantages.shape)}")
    if mask is not None:
        if mask.shape != logp_new.shape:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} but logp_new has {tuple(logp_new.shape)}; they must match"
            )
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                "mask must hold only 0 and 1 (or be bool); for per-element weights, scale the advantages instead"
            )


def clipped_policy_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    aggregation: str = "grpo",
    max_length: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip surrogate l = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A).

    Args:
        logp_new: [B, T] log-probs under the policy being trained (gradients flow here only).
        logp_old: [B, T] log-probs under the sampling policy (detached).
        advantages: [B] (broadcast over T) or [B, T] (detached).
        mask: [B, T] bool or 0/1 float; None means every element counts. Masked elements
            contribute neither loss nor gradient, even if their log-probs are -inf.
        eps_low: lower clip range, ratio >= 1 - eps_low.
        eps_high: upper clip range, ratio <= 1 + eps_high; defaults to eps_low (DAPO's
            "clip-higher" uses 0.28 with eps_low 0.2).
        aggregation: "grpo", "dapo" or "dr_grpo" (see ``LOSS_AGGREGATIONS``).
        max_length: the normaliser L_max of "dr_grpo" (default T); ignored by the others.

    Returns:
        (loss scalar, metrics) where metrics are python floats over the unmasked elements:
        "clip_frac_low" (A < 0 and ratio < 1 - eps_low), "clip_frac_high" (A > 0 and
        ratio > 1 + eps_high), "clip_frac" (their sum), "ratio_mean", "ratio_max". With no
        unmasked element the fractions are 0.0 and the ratio statistics NaN.
    """
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {sorted(LOSS_AGGREGATIONS)}, got {aggregation!r}")
    eps_high = eps_low if eps_high is None else eps_high
    if not 0 <= eps_low < 1:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
    if not eps_high >= 0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")
    _check_inputs(logp_new, logp_old, advantages, mask)
    B, T = logp_new.shape
    if max_length is None:
        max_length = T
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int (the generation budget L_max), got {max_length!r}")

    keep = torch.ones_like(logp_new, dtype=torch.bool) if mask is None else mask.detach().bool()  # [B, T]
    adv = advantages.detach().to(logp_new.dtype)
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv  # [B, T]
    # Zero the log-ratio at masked places *before* exp: padding often holds -inf log-probs,
    # and inf - inf = NaN would leak NaN gradients through torch.where.
    log_ratio = torch.where(keep, logp_new - logp_old.detach(), torch.zeros_like(logp_new))  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    adv = torch.where(keep, adv, torch.zeros_like(adv))  # [B, T]
    unclipped = ratio * adv  # [B, T]
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv  # [B, T]
    elem_loss = -torch.minimum(unclipped, clipped)  # [B, T]; zero where masked (adv = 0)
    loss = LOSS_AGGREGATIONS[aggregation](elem_loss, keep, max_length)

    return loss, clip_metrics(keep, adv, ratio, eps_low, eps_high)


@torch.no_grad()
def clip_metrics(keep: Tensor, adv: Tensor, ratio: Tensor, eps_low: float, eps_high: float) -> dict[str, float]:
    """The clip statistics over the kept elements (tokens, or sequences for a sequence ratio), as python floats:
    "clip_frac_low" (A < 0 and ratio < 1 - eps_low), "clip_frac_high" (A > 0 and ratio > 1 + eps_high),
    "clip_frac" (their sum), "ratio_mean", "ratio_max"; with nothing kept the fractions are 0.0 and the ratio
    statistics NaN."""
    n = int(keep.sum())
    low = (keep & (adv < 0) & (ratio < 1.0 - eps_low)).sum().item()
    high = (keep & (adv > 0) & (ratio > 1.0 + eps_high)).sum().item()
    kept_ratio = ratio[keep]
    return {
        "clip_frac_low": low / n if n else 0.0,
        "clip_frac_high": high / n if n else 0.0,
        "clip_frac": (low + high) / n if n else 0.0,
        "ratio_mean": float(kept_ratio.mean()) if n else float("nan"),
        "ratio_max": float(kept_ratio.max()) if n else float("nan"),
    }


def aggregation_denominator(aggregation: str, mask: Tensor) -> int:
    """The count an aggregation divides by, for splitting a batch into micro-batches exactly.

    Each aggregation is (sum of per-row terms) / denominator: "grpo" counts rows with at least one
    unmasked element, "dapo" unmasked elements, "dr_grpo" rows. So with micro-batches m of a batch,
    loss(batch) = sum_m loss(m) * denominator(m) / denominator(batch) (for "dr_grpo" with a
    fixed max_length); gradient accumulation with these weights equals one big batch.
    """
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {sorted(LOSS_AGGREGATIONS)}, got {aggregation!r}")
    keep = mask.bool()  # [B, T]
    if aggregation == "grpo":
        return int((keep.sum(dim=1) > 0).sum())
    if aggregation == "dapo":
        return int(keep.sum())
    return keep.shape[0]


def sequence_ratio_policy_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    eps_low: float = 3e-4,
    eps_high: float | None = 4e-4,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO's clipped objective with a sequence-level ratio (Zheng et al. 2025, arXiv:2507.18071, Eq. 5-7):

        s_i = exp(mean_t (logp_new - logp_old))        (the length-normalised sequence likelihood ratio)
        l_i = -min(s_i * A_i, clip(s_i, 1 - eps_low, 1 + eps_high) * A_i)
        loss = mean of l_i over the rows with a kept token

    A_i is the token mean of `advantages` over row i's kept tokens: GSPO is a sequence method, so a [B, T]
    advantage constant along T (what the advantage stage hands over) gives the sequence's own value. The paper's
    clip ranges are 3e-4 and 4e-4 (the defaults here): s_i is near 1, unlike a per-token ratio.

    Returns (loss, metrics) with the keys of `clipped_policy_loss`, counted over sequences instead of tokens.
    """
    eps_high = eps_low if eps_high is None else eps_high
    _check_inputs(logp_new, logp_old, advantages, mask)
    B, T = logp_new.shape
    keep = torch.ones_like(logp_new, dtype=torch.bool) if mask is None else mask.detach().bool()  # [B, T]
    count = keep.sum(dim=1)  # [B]
    adv = advantages.detach().to(logp_new.dtype)
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv  # [B, T]
    log_ratio = torch.where(keep, logp_new - logp_old.detach(), torch.zeros_like(logp_new))  # [B, T]; no -inf
    seq_ratio = torch.exp(log_ratio.sum(dim=1) / count.clamp(min=1))  # [B]
    seq_adv = torch.where(keep, adv, torch.zeros_like(adv)).sum(dim=1) / count.clamp(min=1)  # [B]
    unclipped = seq_ratio * seq_adv  # [B]
    clipped = torch.clamp(seq_ratio, 1.0 - eps_low, 1.0 + eps_high) * seq_adv  # [B]
    rows = count > 0  # [B]
    row_loss = torch.where(rows, -torch.minimum(unclipped, clipped), torch.zeros_like(unclipped))  # [B]
    loss = row_loss.sum() / rows.sum().clamp(min=1)

    return loss, clip_metrics(rows, seq_adv, seq_ratio, eps_low, eps_high)


def sppo_policy_loss(
    logp_new: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor | None = None, beta: float = 1e-3
) -> tuple[Tensor, dict[str, float]]:
    """SPPO's squared loss on a group's samples (Wu et al. 2024, arXiv:2405.00675; the GPO of Zhang et al. 2024,
    arXiv:2410.02197, trains on a general preference model's scores with it):

        l_i = (log pi(y_i) / pi_t(y_i) - (P(y_i > pi_t) - 1/2) / beta)^2,   loss = mean of l_i

    with log pi / pi_t the sum over the completion's kept tokens of (logp_new - logp_old) (pi_t: the policy that
    sampled the group) and P(y_i > pi_t) - 1/2 the sequence's advantage A_i, the token mean of `advantages` over
    its kept tokens as in `sequence_ratio_policy_loss`. The offset 1/2 and eta = 1/beta are the official trainer's
    (uclaml/SPPO `sppo/trainer.py`, loss_w = (logits_w - (P_w - 0.5) / beta)^2; its pipeline's beta is 1e-3, the
    default here). How A_i becomes P - 1/2: a groupwise win-rate reward averages 1/2 over its group (P_ij + P_ji =
    1), so the group-centred advantage with no std (algorithm.scale=none) is exactly P_i - 1/2.

    Departures from the official code: one term per sampled completion instead of a chosen/rejected pair's two,
    and pi_t is the group's sampling policy (refreshed every iteration), not the start of a data round.
    Returns (loss, metrics: log_ratio_mean, target_mean_abs), the loss a mean over rows with a kept token."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    _check_inputs(logp_new, logp_old, advantages, mask)
    B, T = logp_new.shape
    keep = torch.ones_like(logp_new, dtype=torch.bool) if mask is None else mask.detach().bool()  # [B, T]
    count = keep.sum(dim=1)  # [B]
    adv = advantages.detach().to(logp_new.dtype)
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv  # [B, T]
    log_ratio = torch.where(keep, logp_new - logp_old.detach(), torch.zeros_like(logp_new)).sum(dim=1)  # [B]
    target = torch.where(keep, adv, torch.zeros_like(adv)).sum(dim=1) / count.clamp(min=1) / beta  # [B]
    rows = count > 0  # [B]
    row_loss = torch.where(rows, (log_ratio - target) ** 2, torch.zeros_like(log_ratio))  # [B]
    loss = row_loss.sum() / rows.sum().clamp(min=1)
    kept = max(int(rows.sum()), 1)
    return loss, {
        "log_ratio_mean": float(log_ratio.detach()[rows].sum()) / kept,
        "target_mean_abs": float(target[rows].abs().sum()) / kept,
    }

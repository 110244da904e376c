"""The update objectives of `llmalign grpo`, one object per algorithm.loss, found through `OBJECTIVES`:

- grpo, dr_grpo, dapo: the PPO-clip surrogate on per-token advantages [B, T] (shared.losses.clipped_policy_loss),
  aggregated as a sequence mean (grpo, Shao et al. 2024, arXiv:2402.03300, Eq. 3), over B * L_max (dr_grpo, Liu
  et al. 2025, arXiv:2503.20783, Eq. 4) or as a token mean (dapo, Yu et al. 2025, arXiv:2503.14476, Eq. 8);
- gspo: the clip on the sequence-level ratio (Zheng et al. 2025, arXiv:2507.18071), a mean over sequences;
- sppo: SPPO's squared regression of the sequence log-ratio on (P - 1/2) / beta (Wu et al. 2024, arXiv:2405.00675;
  with a GPM win-rate reward this is GPO, Zhang et al. 2024, arXiv:2410.02197), a mean over sequences;
- disco: the discriminative objective with its squared-hinge trust region (Li et al. 2025, arXiv:2505.12366;
  shared.disco.disco_loss), which takes correct/incorrect labels instead of advantages.

An objective says what the update needs (labels, the step's trust-region KL), the global normalisers of an
optimizer step (sums over ranks), a micro-batch's share of the step's loss, how the k3 KL to the reference is
aggregated alongside, and what the progress bar shows. `llmalign.grpo.update` calls these and nothing else
depends on the loss's name.

The engine/trainer mismatch (`engine_mismatch`: mismatch/* metrics) and algorithm.rollout_correction
(`rollout_corrected_advantages`: TIS/MIS weights of shared.rollout_correction on the per-token advantages) come
from the rollout's sampling log-probs and the update's old log-probs; the update applies them before its steps.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from shared.disco import disco_kl_sum, disco_loss
from shared.config import ConfigError
from shared.losses import (
    LOSS_AGGREGATIONS,
    aggregation_denominator,
    clipped_policy_loss,
    sequence_ratio_policy_loss,
    sppo_policy_loss,
)
from shared.rollout_correction import correction_weights, mismatch_metrics, mismatch_statistics
from shared.run import Run


class Objective(Protocol):
    name: str
    needs_labels: bool  # takes each completion's correct/incorrect label (algorithm.correct_reward)

    def needs_step_kl(self, algorithm) -> bool: ...
    def step_kl_sum(self, logp: Tensor, old: Tensor, mask: Tensor) -> float: ...
    def normalisers(
        self, run: Run, mask: Tensor, part: list[int], group_size: int, row_group: Tensor | None
    ) -> dict: ...
    def loss(
        self,
        config,
        logp: Tensor,
        old: Tensor,
        advantages: Tensor,
        mask: Tensor,
        correct: Tensor,
        group_ids: Tensor,
        step: dict,
    ) -> tuple[Tensor, dict, float]: ...  # (share of the step's loss, metrics, weight of the KL term)
    def kl_term(self, kl: Tensor, mask: Tensor, step: dict, weight: float, max_length: int) -> Tensor: ...
    def postfix(self, metrics: dict) -> dict: ...


class ClippedObjective:
    """PPO-clip on per-token advantages [B, T], reduced by one of shared.losses.LOSS_AGGREGATIONS."""

    needs_labels = False

    def __init__(self, aggregation: str):
        self.name = aggregation

    def needs_step_kl(self, algorithm) -> bool:
        return False

    def normalisers(self, run: Run, mask: Tensor, part: list[int], group_size: int, row_group: Tensor | None) -> dict:
        """The step's denominator (shared.losses.aggregation_denominator: rows for grpo and dr_grpo, tokens for
        dapo), summed over ranks."""
        return {"denominator": max(float(run.sum(aggregation_denominator(self.name, mask[part]))), 1.0)}

    def loss(self, config, logp, old, advantages, mask, correct, group_ids, step) -> tuple[Tensor, dict, float]:
        """(share, metrics, weight): the micro-batch normalised as its own batch, times its denominator over the
        step's (`weight`), so the shares of a step sum to its loss. `advantages` [m, T]."""
        a = config.algorithm
        loss, metrics = clipped_policy_loss(
            logp,
            old,
            advantages,  # [m, T]
            mask,
            eps_low=a.clip_range,
            eps_high=a.effective_clip_range_high,
            aggregation=self.name,
            max_length=config.sampling.max_new_tokens,
        )
        weight = aggregation_denominator(self.name, mask) / step["denominator"]
        return loss * weight, metrics, weight

    def kl_term(self, kl: Tensor, mask: Tensor, step: dict, weight: float, max_length: int) -> Tensor:
        """k3 per token aggregated like the policy loss (the aggregations are linear), with the same weight."""
        return weight * LOSS_AGGREGATIONS[self.name](kl, mask.bool(), max_length)

    def postfix(self, metrics: dict) -> dict:
        return {"clip": f"{metrics['clip_frac']:.2f}"} if "clip_frac" in metrics else {}


class DiscoObjective:
    """DisCO: per question, the mean score of the correct completions minus a soft maximum over the wrong ones,
    under a squared-hinge KL trust region over the step's tokens (shared.disco)."""

    name = "disco"
    needs_labels = True

    def needs_step_kl(self, algorithm) -> bool:
        """The squared hinge needs the value of the step's KL before the first backward."""
        return algorithm.disco_penalty > 0

    def normalisers(self, run: Run, mask: Tensor, part: list[int], group_size: int, row_group: Tensor | None) -> dict:
        """The questions (groups with a kept completion) and the kept tokens of the step, summed over ranks, and
        "kl", the step's trust-region KL, 0 until the update sets it."""
        step_mask = mask[part]  # [p, C]
        if row_group is None:  # parts hold whole groups
            questions = int(step_mask.reshape(-1, group_size * step_mask.shape[1]).any(dim=1).sum())
        else:  # groups of unequal sizes: the distinct groups with a kept token
            questions = len(set(row_group[part][step_mask.any(dim=1).cpu()].tolist()))
        return {"questions": float(run.sum(questions)), "tokens": float(run.sum(float(step_mask.sum()))), "kl": 0.0}

    def loss(self, config, logp, old, advantages, mask, correct, group_ids, step) -> tuple[Tensor, dict, float]:
        """DisCO's questions, tokens and step KL go to `disco_loss`, which returns its share itself."""
        a = config.algorithm
        loss, metrics = disco_loss(
            logp,
            old,
            mask,
            correct,
            group_ids,
            score=a.disco_score,
            tau=a.disco_tau,
            delta=a.disco_delta,
            penalty=a.disco_penalty,
            questions=step["questions"],
            kl_tokens=step["tokens"],
            batch_kl=step["kl"],
        )
        return loss, metrics, 1.0

    def step_kl_sum(self, logp: Tensor, old: Tensor, mask: Tensor) -> float:
        """These rows' k1 sum of KL(old || new) over their kept tokens: their part of the step's trust-region KL."""
        return float(disco_kl_sum(logp, old, mask))

    def kl_term(self, kl: Tensor, mask: Tensor, step: dict, weight: float, max_length: int) -> Tensor:
        """A token mean over the step, like the trust region."""
        return kl.sum() / max(step["tokens"], 1.0)

    def postfix(self, metrics: dict) -> dict:
        return {"kl": f"{metrics.get('trust_region_kl', 0):.1e}"}  # DisCO: no clip


class GSPOObjective:
    """GSPO: the clip on the sequence-level ratio (shared.losses.sequence_ratio_policy_loss), a mean over
    sequences; micro-batches and the k3 KL term are weighted as grpo's (rows with a kept token)."""

    name = "gspo"
    needs_labels = False

    def needs_step_kl(self, algorithm) -> bool:
        return False

    def normalisers(self, run: Run, mask: Tensor, part: list[int], group_size: int, row_group: Tensor | None) -> dict:
        return {"denominator": max(float(run.sum(aggregation_denominator("grpo", mask[part]))), 1.0)}

    def loss(self, config, logp, old, advantages, mask, correct, group_ids, step) -> tuple[Tensor, dict, float]:
        a = config.algorithm
        loss, metrics = sequence_ratio_policy_loss(
            logp, old, advantages, mask, eps_low=a.clip_range, eps_high=a.effective_clip_range_high
        )  # advantages [m, T]
        weight = aggregation_denominator("grpo", mask) / step["denominator"]
        return loss * weight, metrics, weight

    def kl_term(self, kl: Tensor, mask: Tensor, step: dict, weight: float, max_length: int) -> Tensor:
        return weight * LOSS_AGGREGATIONS["grpo"](kl, mask.bool(), max_length)

    def postfix(self, metrics: dict) -> dict:
        return {"clip": f"{metrics['clip_frac']:.2f}"} if "clip_frac" in metrics else {}


class SPPOObjective:
    """SPPO's squared loss on the sequence log-ratio to the sampling policy (shared.losses.sppo_policy_loss), a
    mean over sequences; micro-batches and the k3 KL term are weighted as grpo's (rows with a kept token)."""

    name = "sppo"
    needs_labels = False

    def needs_step_kl(self, algorithm) -> bool:
        return False

    def normalisers(self, run: Run, mask: Tensor, part: list[int], group_size: int, row_group: Tensor | None) -> dict:
        return {"denominator": max(float(run.sum(aggregation_denominator("grpo", mask[part]))), 1.0)}

    def loss(self, config, logp, old, advantages, mask, correct, group_ids, step) -> tuple[Tensor, dict, float]:
        loss, metrics = sppo_policy_loss(logp, old, advantages, mask, beta=config.algorithm.sppo_beta)
        weight = aggregation_denominator("grpo", mask) / step["denominator"]
        return loss * weight, metrics, weight

    def kl_term(self, kl: Tensor, mask: Tensor, step: dict, weight: float, max_length: int) -> Tensor:
        return weight * LOSS_AGGREGATIONS["grpo"](kl, mask.bool(), max_length)

    def postfix(self, metrics: dict) -> dict:
        return {"logr": f"{metrics['log_ratio_mean']:.2f}"} if "log_ratio_mean" in metrics else {}


OBJECTIVES: dict[str, Objective] = {
    "grpo": ClippedObjective("grpo"),
    "dr_grpo": ClippedObjective("dr_grpo"),
    "dapo": ClippedObjective("dapo"),
    "disco": DiscoObjective(),
    "gspo": GSPOObjective(),
    "sppo": SPPOObjective(),
}


def correct_labels(objective: Objective, scores: dict[str, Tensor], reward: str, threshold: float) -> Tensor:
    """[N] bool: DisCO's o+ / o- (the named reward above the threshold; the config refuses a correct_reward that is
    not a configured reward); all False for an objective that takes no labels."""
    if objective.needs_labels:
        return scores[reward].nan_to_num(0.0) > threshold  # [N]
    return torch.zeros(len(next(iter(scores.values()))), dtype=torch.bool)  # [N]


# ----------------------------------------------------------------------------- engine/trainer mismatch


def engine_mismatch(run: Run, engine: Tensor | None, old: Tensor, completion_mask: Tensor) -> dict[str, float]:
    """mismatch/k1, mismatch/k3, mismatch/max_abs_dlogp, mismatch/mean_abs_dlogp (shared.rollout_correction: KL of
    the engine to the trainer, estimated from the engine's samples) over every rank's completion tokens whose
    sampling log-prob the engine reported: `engine` [n, C] (NaN: unknown; None: the rollout carries none, and {}
    is returned) against `old` [n, C], the trainer's log-probs of the same tokens with the rollout's weights."""
    if engine is None:
        return {}
    known = completion_mask.bool() & engine.isfinite()  # [n, C] a forced trigger or a replayed row: not sampled here
    local = mismatch_statistics(old, engine, known)  # [5]: tokens, sums, max
    statistics = torch.cat([run.sum(local[:4]), run.max(local[4]).reshape(1)])  # [5] over all ranks
    return {f"mismatch/{name}": value for name, value in mismatch_metrics(statistics).items()}


def rollout_corrected_advantages(
    run: Run, algorithm, engine: Tensor | None, old: Tensor, advantages: Tensor, mask: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """algorithm.rollout_correction applied: (`advantages` [n, C] times the correction's weights w [n, C], metrics).

    The clipped per-token loss -min(r A, clip(r) A) times w >= 0 is the loss with advantage w A, so the weights ride
    on the advantages and every aggregation keeps its normaliser (a token MIS zeroes still counts in dapo's token
    count). rho_t = exp(old - engine) with `old` the trainer's log-probs at the rollout's weights, the proximal
    policy of the PPO ratio (verl's decoupled mode). A token whose sampling log-prob is unknown (NaN: a forced
    trigger, a replayed sample) gets weight 1. Metrics over every rank's kept tokens: mismatch/correction_weight_mean,
    and mismatch/correction_capped (tis: rho > C) or mismatch/correction_rejected (mis: weight 0), as fractions."""
    a = algorithm
    if engine is None:
        raise ConfigError(
            f"config field 'algorithm.rollout_correction': {a.rollout_correction} needs the engine's log-prob of "
            "every sampled token, which this rollout does not carry (the model's generation_config turns on a "
            "sampling warper llmalign.evaluate.SampledTokenLogprobs does not mirror); set it to none"
        )
    kept = mask.bool()  # [n, C]
    known_engine = torch.where(engine.isfinite(), engine, old)  # [n, C] unknown: rho = 1
    weights = correction_weights(
        a.rollout_correction, a.rollout_correction_level, old, known_engine, kept, a.rollout_correction_cap
    )  # [n, C], 0 off `kept`
    if a.rollout_correction == "tis":
        flagged = kept & (old - known_engine > math.log(a.rollout_correction_cap))  # [n, C] rho > C: capped
    else:
        flagged = kept & (weights == 0)  # [n, C] rejected
    local = torch.stack([kept.sum(), weights[kept].double().sum(), flagged.sum()]).double().cpu()
    tokens, weight_sum, flagged_count = run.sum(local).tolist()
    name = "capped" if a.rollout_correction == "tis" else "rejected"
    metrics = {
        "mismatch/correction_weight_mean": weight_sum / tokens if tokens else math.nan,
        f"mismatch/correction_{name}": flagged_count / tokens if tokens else math.nan,
    }
    return advantages * weights.to(advantages.dtype), metrics

"""Pairwise preference losses on summed sequence log-probs.

Notation (all tensors [B], one entry per preference pair):
    pc, pr: policy log-prob of the chosen / rejected completion (summed over tokens);
    rc, rr: the same under the frozen reference;
    D = (pc - rc) - (pr - rr): margin of the implied rewards, s = sigmoid.

Every loss returns (losses [B], chosen_rewards [B], rejected_rewards [B]); the rewards are the
implied rewards for logging, detached: beta * (pc - rc) and beta * (pr - rr) for the losses
with a reference, beta / |y| * logp(y) for SimPO. Take ``losses.mean()`` for the batch loss.
MODPO also takes each pair's margin of the other objectives' rewards and the objective weights.

Flow-model preference losses (Diffusion-DPO and SmPO-Diffusion for rectified flow) take per-sample
flow-matching errors instead, all [B]: err_w, err_l of the policy on the winner / loser image and
ref_w, ref_l of the reference, each ||v_target - v(x_t, t)||^2 averaged over dimensions
(`flow_matching_errors`), at the same t and noise for both images of a pair (`flow_pair_inputs`). They
return (losses [B], metrics: a dict of detached [B] tensors, mean them for the batch);
`FLOW_PREFERENCE_LOSSES` names them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FLOW_PREFERENCE_LOSSES",
    "PREFERENCE_LOSSES",
    "chosen_nll_loss",
    "diffusion_dpo_loss",
    "dpo_sigmoid_loss",
    "dpop_loss",
    "flow_matching_errors",
    "flow_matching_inputs",
    "flow_pair_inputs",
    "hinge_loss",
    "ipo_loss",
    "modpo_loss",
    "robust_dpo_loss",
    "simpo_loss",
    "smpo_diffusion_loss",
    "smpo_label",
    "srpo_loss",
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


def modpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    margins: Tensor,
    weights: Sequence[float],
    beta: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """MODPO (Zhou et al., 2023, "Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference
    Optimization", arXiv 2310.03708, the MODPO loss of Sec. 3; its equation number was not checked here, the
    form was checked against the authors' code, src/trainer/modpo_trainer.py `modpo_loss`):

        -log s( (beta / w_0) D - (1 / w_0) w_rest^T (r_rest(y_w) - r_rest(y_l)) )

    weights = [w_0, w_1, ..., w_K] on the simplex: w_0 weighs the objective whose preferences the pairs hold,
    w_1..w_K the K other objectives; margins [B, K] (or [B] when K = 1) holds each pair's
    r_rest(y_w) - r_rest(y_l), the other objectives' reward margins (the paper's margin reward models, here
    given per pair). With w_0 = 1 and zero margins it is sigmoid DPO exactly (the logit is computed as
    (beta D - w_rest^T m) / w_0 for that reason).

    Implied rewards: the authors' code logs (beta (p - r) - w_rest^T r_rest(y)) / w_0 per completion; only the
    margin r_rest(y_w) - r_rest(y_l) is known here, so it is split half to each side: chosen - rejected is the
    logit, as in their code, and the rewards match theirs up to a constant per pair.
    """
    _check_pairs(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected
    )
    _check_beta(beta)
    weights = [float(w) for w in weights]
    if len(weights) < 2 or not weights[0] > 0:
        raise ValueError(
            f"weights must be [w_0, w_1, ...] with w_0 > 0 and one weight per margin objective, got {weights}"
        )
    margins = margins.to(policy_chosen.dtype)
    margins = margins[:, None] if margins.dim() == 1 else margins  # [B, K]
    if margins.shape != (policy_chosen.shape[0], len(weights) - 1):
        raise ValueError(
            f"margins must be [B, K] = [{policy_chosen.shape[0]}, {len(weights) - 1}] (one per weight after w_0), "
            f"got {list(margins.shape)}"
        )
    margin, chosen, rejected = _logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    w_rest = torch.tensor(weights[1:], dtype=margins.dtype, device=margins.device)  # [K]
    weighted = margins @ w_rest  # [B] w_rest^T (r_rest(y_w) - r_rest(y_l))
    logits = (beta * margin - weighted) / weights[0]  # [B]
    losses = -F.logsigmoid(logits)  # [B]
    chosen_rewards = (beta * chosen - weighted / 2) / weights[0]  # [B]
    rejected_rewards = (beta * rejected + weighted / 2) / weights[0]  # [B]
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def chosen_nll_loss(policy_chosen: Tensor, chosen_lengths: Tensor) -> Tensor:
    """The length-normalised negative log-likelihood of the chosen completion, -logp(y_w) / |y_w|, [B].

    Added to a preference loss with a weight alpha it gives iterative RPO (Pang et al., 2024):
    -log s(beta D) - alpha logp(y_w) / |y_w|. When chosen and rejected answers share most of their
    tokens (a wrong digit), DPO alone can lower both; the NLL term keeps the chosen one likely.
    """
    _check_pairs(policy_chosen=policy_chosen, chosen_lengths=chosen_lengths)
    _check_lengths(chosen_lengths=chosen_lengths)
    return -policy_chosen / chosen_lengths  # [B]


def srpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    policy_chosen_given_rejected: Tensor,
    policy_rejected_given_rejected: Tensor,
    policy_chosen_given_chosen: Tensor,
    policy_rejected_given_chosen: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    ref_chosen_given_rejected: Tensor,
    ref_rejected_given_rejected: Tensor,
    ref_chosen_given_chosen: Tensor,
    ref_rejected_given_chosen: Tensor,
    beta: float = 0.1,
    alpha: float = 0.8,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SRPO: Choi et al., 2024, "Self-Improving Robust Preference Optimization", arXiv 2406.01660.

    With r(y'|x, y) = log pi(y'|x, y) - log pi_ref(y'|x, y) (y = None: generation from x alone; y given:
    revision of y into y') and a = alpha, b = beta, per pair

        L = (1 - a) (b [r(y_w|x,y_l) + r(y_w|x) - r(y_l|x,y_w) - r(y_l|x)] - 1)^2
            + a [(1/2 - b [r(y_w|x,y_l) - r(y_l|x,y_l)])^2 + (1/2 - b [r(y_w|x,y_w) - r(y_l|x,y_w)])^2].

    The first term is IPO-like on generation plus revision (target 1); the second teaches the
    revision to move towards y_w from either starting point (target 1/2 each). At pi = pi_ref,
    L = (1 - a) + a / 2. Inputs: twelve summed log-probs [B], policy then reference, in the order
    generation of y_w, y_l given x; revision into y_w, y_l given (x, y_l); revision into y_w, y_l
    given (x, y_w). Returns (losses [B], metrics: detached [B] "generation_margin" (the b [...] of
    the first term), "revision_margin_given_rejected", "revision_margin_given_chosen"). alpha = 0.8 is
    the value given with the loss.

    What was checked: there is no official code. The formula is the one given in our issue 26, with
    beta outside r (r is the plain log-ratio; beta multiplies each bracket of log-ratio differences,
    as in IPO). The TRL proposal (huggingface/trl PR #1772, closed unmerged) was read in its author's
    fork, frasermince/trl `trl/trainer/srpo_trainer_2.py` (stored commit 295b8e8, not run): its
    `srpo_loss` computes the same three squares term for term, with beta outside the plain
    log-ratios and (1 - alpha) / alpha weights, so the two agree. Not checked: the paper's text, and
    the PR's default beta and alpha (its config file was not available). beta = 0.1 is this module's
    common default, not taken from the paper.
    """
    _check_pairs(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        policy_chosen_given_rejected=policy_chosen_given_rejected,
        policy_rejected_given_rejected=policy_rejected_given_rejected,
        policy_chosen_given_chosen=policy_chosen_given_chosen,
        policy_rejected_given_chosen=policy_rejected_given_chosen,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        ref_chosen_given_rejected=ref_chosen_given_rejected,
        ref_rejected_given_rejected=ref_rejected_given_rejected,
        ref_chosen_given_chosen=ref_chosen_given_chosen,
        ref_rejected_given_chosen=ref_rejected_given_chosen,
    )
    _check_beta(beta)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    r_w = policy_chosen - ref_chosen  # [B] r(y_w|x)
    r_l = policy_rejected - ref_rejected  # [B] r(y_l|x)
    r_w_given_l = policy_chosen_given_rejected - ref_chosen_given_rejected  # [B] r(y_w|x,y_l)
    r_l_given_l = policy_rejected_given_rejected - ref_rejected_given_rejected  # [B] r(y_l|x,y_l)
    r_w_given_w = policy_chosen_given_chosen - ref_chosen_given_chosen  # [B] r(y_w|x,y_w)
    r_l_given_w = policy_rejected_given_chosen - ref_rejected_given_chosen  # [B] r(y_l|x,y_w)
    generation = beta * (r_w_given_l + r_w - r_l_given_w - r_l)  # [B]
    revision_from_l = beta * (r_w_given_l - r_l_given_l)  # [B]
    revision_from_w = beta * (r_w_given_w - r_l_given_w)  # [B]
    losses = (1 - alpha) * (generation - 1) ** 2 + alpha * (
        (0.5 - revision_from_l) ** 2 + (0.5 - revision_from_w) ** 2
    )  # [B]
    metrics = {
        "generation_margin": generation.detach(),
        "revision_margin_given_rejected": revision_from_l.detach(),
        "revision_margin_given_chosen": revision_from_w.detach(),
    }
    return losses, metrics


# Names follow TRL's loss_type values; dpop and modpo, which TRL 1.16 lacks, are the papers' names.
# Signatures differ: ipo and simpo need lengths, simpo takes no reference log-probs, modpo margins and weights.
PREFERENCE_LOSSES: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {
    "sigmoid": dpo_sigmoid_loss,
    "dpop": dpop_loss,
    "ipo": ipo_loss,
    "robust": robust_dpo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
    "modpo": modpo_loss,
}


# ----------------------------------------------------------------------------- flow-model preference losses


def _check_errors(**errors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in errors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(
            f"flow preference inputs must all be 1-D of the same shape [B], got {shapes}; average the squared "
            f"velocity error over every dimension but the batch first (flow_matching_errors)"
        )


def flow_matching_inputs(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, target velocity) of rectified flow: x_t = (1 - t) x0 + t eps, target = eps - x0.

    x0, noise: [N, ...] clean samples and Gaussian noise of the same shape; t: [N] in [0, 1] (t = 1 is noise).
    """
    if x0.shape != noise.shape or x0.dim() < 2 or t.shape != x0.shape[:1]:
        raise ValueError(
            f"x0 and noise must share a shape [N, ...] and t be [N], got x0 {list(x0.shape)}, "
            f"noise {list(noise.shape)}, t {list(t.shape)}"
        )
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError(f"t must lie in [0, 1] (0 = data, 1 = noise), got {t.tolist()}")
    t = t.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)  # [N, 1, ...] broadcast over the sample's dimensions
    x_t = (1 - t) * x0 + t * noise  # [N, ...]
    return x_t, noise - x0  # [N, ...], [N, ...]


def flow_pair_inputs(winner: Tensor, loser: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """`flow_matching_inputs` of B preference pairs at one shared noise and time per pair, as Diffusion-DPO does
    (its code draws one timestep and one noise per pair): rows 0..B-1 the winners, B..2B-1 the losers.

    winner, loser, noise: [B, ...]; t: [B]. Returns x_t [2B, ...] and target [2B, ...].
    """
    if winner.shape != loser.shape:
        raise ValueError(f"winner and loser must have the same shape, got {list(winner.shape)} and {list(loser.shape)}")
    return flow_matching_inputs(torch.cat([winner, loser]), torch.cat([noise, noise]), torch.cat([t, t]))


def flow_matching_errors(prediction: Tensor, target: Tensor) -> Tensor:
    """||target - prediction||^2 averaged over every dimension but the first: [N, ...] -> [N]."""
    if prediction.shape != target.shape or prediction.dim() < 2:
        raise ValueError(
            f"prediction and target must share a shape [N, ...], got {list(prediction.shape)} and {list(target.shape)}"
        )
    dtype = torch.promote_types(prediction.dtype, torch.float32)  # bf16 predictions: the mean in float32
    return (target.to(dtype) - prediction.to(dtype)).square().flatten(1).mean(1)  # [N]


def _flow_preference(
    policy_winner: Tensor, policy_loser: Tensor, ref_winner: Tensor, ref_loser: Tensor, scale: Tensor | float
) -> tuple[Tensor, dict[str, Tensor]]:
    """-log s(scale * (-1/2) * ((err_w - ref_w) - (err_l - ref_l))) and its metrics; scale = beta (Diffusion-DPO)
    or (2 alpha - gamma) beta (SmPO)."""
    chosen = -0.5 * scale * (policy_winner - ref_winner)  # [B] implied reward of the winner
    rejected = -0.5 * scale * (policy_loser - ref_loser)  # [B]
    logits = -0.5 * scale * ((policy_winner - ref_winner) - (policy_loser - ref_loser))  # [B]
    losses = -F.logsigmoid(logits)  # [B]
    metrics = {
        "implicit_accuracy": (logits > 0).to(logits.dtype),
        "reward_margin": logits,
        "chosen_rewards": chosen,
        "rejected_rewards": rejected,
        "policy_error": (policy_winner + policy_loser) / 2,
        "reference_error": (ref_winner + ref_loser) / 2,
    }
    return losses, {name: value.detach() for name, value in metrics.items()}


def diffusion_dpo_loss(
    policy_winner: Tensor, policy_loser: Tensor, ref_winner: Tensor, ref_loser: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO (Wallace et al., 2023, "Diffusion Model Alignment Using Direct Preference Optimization",
    arXiv 2311.12908, the final loss of Sec. 4, eq. 14 by our reading; the numbered text was not reachable
    here, the formula was checked against its official code), for rectified flow:

        -log s( -beta / 2 * ((err_w - ref_w) - (err_l - ref_l)) )

    with err = ||v_target - v(x_t, t)||^2 averaged over dimensions, x_t = (1 - t) x0 + t eps and
    v_target = eps - x0 at the same t and eps for the winner and the loser (`flow_pair_inputs`).
    Inputs [B]; returns (losses [B], metrics of detached [B] tensors: implicit_accuracy (logit > 0),
    reward_margin (the logit), chosen_rewards / rejected_rewards (-beta/2 (err - ref) of each image),
    policy_error, reference_error (the mean of winner and loser)).

    Departures from the paper, and why:
    - The paper's logit is -beta_paper T omega(lambda_t) (...) on squared norms summed over the N dimensions of
      the noise-prediction error. With omega constant (as the official code has it) and the errors averaged over
      dimensions, our beta = 2 T omega N beta_paper: the 1/2 stays written out, as in the official code
      (SalesforceAIResearch/DiffusionDPO train.py: scale_term = -0.5 * beta_dpo on per-sample mean squared
      errors), so our beta is that code's beta_dpo.
    - Flow matching: the error is on the velocity, not on the noise. With x_t = (1 - t) x0 + t eps the noise
      prediction is x_t + (1 - t) v, so ||eps - eps_theta||^2 = (1 - t)^2 ||v - v_theta||^2: using the velocity
      error is a t-dependent weighting omega(lambda_t) different from the paper's, the one of the flow-matching
      training loss these models are trained with (Diffusion-DPO's code likewise keeps its training loss's
      constant weighting rather than the ELBO's).
    """
    _check_errors(policy_winner=policy_winner, policy_loser=policy_loser, ref_winner=ref_winner, ref_loser=ref_loser)
    _check_beta(beta)
    return _flow_preference(policy_winner, policy_loser, ref_winner, ref_loser, beta)


def smpo_label(reward_winner: Tensor, reward_loser: Tensor, temperature: float) -> Tensor:
    """SmPO-Diffusion's smoothed preference label alpha = s((r_w - r_l) / temperature), [B].

    The probability that the winner is preferred under a Bradley-Terry model on reward-model scores. The
    official code (JaydenLyh/SmPO train.py) computes exp(r_w') / (exp(r_w') + exp(r_l')) on PickScores
    min-max normalised over the dataset, r' = (r - min) / (max - min): this is s((r_w - r_l) / (max - min)),
    our formula with temperature = max - min (0.1666 for their PickScore range).
    """
    _check_errors(reward_winner=reward_winner, reward_loser=reward_loser)
    if not temperature > 0:
        raise ValueError(f"the label temperature must be > 0, got {temperature}")
    return torch.sigmoid((reward_winner - reward_loser) / temperature)  # [B]


def smpo_diffusion_loss(
    policy_winner: Tensor,
    policy_loser: Tensor,
    ref_winner: Tensor,
    ref_loser: Tensor,
    label: Tensor,
    beta: float,
    gamma: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SmPO-Diffusion's smoothed-label loss (Lu et al., 2025, "Smoothed Preference Optimization via ReNoise
    Inversion for Aligning Diffusion Models with Varied Human Preferences", arXiv 2506.02698, eq. 8-9 as a
    third-party summary quotes them; the method section itself was not reachable here), on flow-matching errors:

        -log s( (2 alpha - gamma) * (-beta / 2) * ((err_w - ref_w) - (err_l - ref_l)) )

    The paper replaces the binary preference by smoothed densities p~(x_w) ~ p(x_w)^alpha p(x_l)^(gamma - alpha)
    and p~(x_l) ~ p(x_w)^(gamma - alpha) p(x_l)^alpha (eq. 8): each side is a weighted geometric average of
    the two preference directions, and in DPO's log-ratio (eq. 9) they average to a logit scaled by
    (2 alpha - gamma). So alpha = 1 is Diffusion-DPO (`diffusion_dpo_loss`), alpha = gamma / 2 (equal rewards)
    gives logit 0 and no gradient, and alpha < gamma / 2 pushes the other way. Note the averaging is inside the
    sigmoid, not cDPO's average of the two losses -alpha log s(z) - (1 - alpha) log s(-z).

    label: alpha [B] in [0, 1], e.g. `smpo_label` of reward-model scores. gamma: the paper's sensitivity
    factor, 1 in the official code. Errors and metrics as in `diffusion_dpo_loss`, plus "label".

    Departures, and why: the official code (JaydenLyh/SmPO train.py) writes the scale as
    -0.5 * beta_dpo * (2 p - 1) * 10; its constant 10 is folded into beta here (their beta_dpo 5000 is our
    50000). It also takes the label of the first pair in a batch for every pair (its batches hold one pair per
    device); each pair uses its own label here. The ReNoise trajectory estimate is the trainer's business: this
    loss takes the errors at whatever x_t the caller built.
    """
    _check_errors(
        policy_winner=policy_winner, policy_loser=policy_loser, ref_winner=ref_winner, ref_loser=ref_loser, label=label
    )
    _check_beta(beta)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0 (the paper's sensitivity factor, 1 in its code), got {gamma}")
    if bool(((label < 0) | (label > 1)).any()):
        raise ValueError(f"label must lie in [0, 1] (a preference probability), got {label.tolist()}")
    scale = (2 * label - gamma) * beta  # [B]
    losses, metrics = _flow_preference(policy_winner, policy_loser, ref_winner, ref_loser, scale)
    return losses, {**metrics, "label": label.detach()}


# Both take (policy_winner, policy_loser, ref_winner, ref_loser) errors [B]; smpo also a label [B].
FLOW_PREFERENCE_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {
    "diffusion_dpo": diffusion_dpo_loss,
    "smpo": smpo_diffusion_loss,
}

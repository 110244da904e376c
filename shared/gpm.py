"""General Preference Model (GPM) scores: Zhang et al., 2024, arXiv 2410.02197, eq. for s(y_i > y_j | x).

Each response y has an embedding v in R^{2k} (a value head with 2k outputs). With R the block-diagonal
skew-symmetric operator of k blocks [[0, -1], [1, 0]], the preference score and probability are

    s(y_i, y_j) = <R v_i, v_j> / tau = v_i^T R^T v_j / tau,   P(y_i > y_j) = sigmoid(s(y_i, y_j)),

so s is antisymmetric (s_ij = -s_ji, s_ii = 0) and, unlike a scalar Bradley-Terry reward, can be cyclic
(a > b > c > a). In 2-D, s = (v_i[0] v_j[1] - v_i[1] v_j[0]) / tau.

Checked against the official code, github.com/general-preference/general-preference-model (read at its
stored HEAD, not run):
- sign: `general_preference/models/loss.py` builds R with R[i, i+1] = -1, R[i+1, i] = 1 (blocks
  [[0, -1], [1, 0]]) and computes result = (chosen @ R.T) . rejected = <R chosen, rejected>; its 2-D loss
  writes chosen[0] * rejected[1] - chosen[1] * rejected[0]. Both equal `gpm_score(chosen, rejected)`
  here. (Written as v_i^T R v_j with the same R it would be the opposite sign.)
- tau: the high-dimensional losses default to tau = 0.1 and the run scripts pass tau 0.1 (the 2-D
  `GeneralPreferenceLoss` defaults to tau = 1); tau = 0.1 here.
- normalisation: the model file `general_preference/models/rw_model_general_preference.py` has
  `F.normalize(reward, p=2, dim=-1)` commented out (train and eval), while the reward model used to rank
  responses for SPPO/GPO (`general_preference/scripts/RMs/reward_model.py`) normalises v to unit L2
  norm. Default `normalize=False` follows the training code; pass `normalize=True` for the ranking RM.
- loss: -log sigmoid((result - margin) / tau), the optional margin subtracted before dividing by tau.
  The official regression variant 0.5 (s - target_margin)^2, the learnable-tau and the prompt-dependent
  (MoE) R are not here.
- group win rates (GPO with SPPO's loss): `general_preference/scripts/compute_prob_from_raw.py` fills
  prb[i][j] = sigmoid(table[i][j] - table[j][i]) from the K x K score table (for an antisymmetric GPM
  table that is sigmoid(2 s_ij)) and `chosen_probs_win` = row sum / K, the diagonal 1/2 included.
  `gpm_win_rates` keeps the mean over all K (self included) but uses the paper's P = sigmoid(s_ij);
  `antisymmetrize=True` gives the official sigmoid(s_ij - s_ji).
- SPPO offset: the SPPO paper (arXiv 2405.00675) regresses log(pi / pi_t) on eta (P - 1/2); the
  official trainer, uclaml/SPPO `sppo/trainer.py` (loss_type "sppo", read at its stored HEAD), uses
  loss_w = (logits_w - (1 / beta) (chosen_probs_win - 0.5))^2 and the same for the loser, averaged,
  logits = log pi - log pi_ref: offset 1/2, eta = 1 / beta. `sppo_targets` returns (P - 1/2) / beta.
Not checked: the paper's text beyond the formula above.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bradley_terry_loss",
    "gpm_pair_loss",
    "gpm_probability",
    "gpm_score",
    "gpm_score_table",
    "gpm_win_rates",
    "skew_rotate",
    "sppo_targets",
]


def _check_even(v: Tensor) -> None:
    dim = v.shape[-1] if v.dim() else 0
    if v.dim() == 0 or dim % 2 != 0 or dim == 0:
        raise ValueError(
            f"GPM embeddings need an even last dimension 2k (k rotation blocks), got shape {tuple(v.shape)} "
            f"(last dimension {dim}); give the value head an even number of outputs"
        )


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def skew_rotate(v: Tensor) -> Tensor:
    """R v for R = block-diag of k blocks [[0, -1], [1, 0]] (arXiv 2410.02197): (x, y) -> (-y, x) per block.

    v [..., 2k] -> [..., 2k]; an odd last dimension raises ValueError.
    """
    _check_even(v)
    pairs = v.unflatten(-1, (-1, 2))  # [..., k, 2]
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # [..., 2k]


def _maybe_normalize(v: Tensor, normalize: bool) -> Tensor:
    return F.normalize(v, p=2, dim=-1) if normalize else v


def gpm_score(v_i: Tensor, v_j: Tensor, tau: float = 0.1, normalize: bool = False) -> Tensor:
    """GPM score s(y_i, y_j) = <R v_i, v_j> / tau (arXiv 2410.02197); v [..., 2k] -> [...].

    Positive means y_i is preferred. `normalize` first scales each v to unit L2 norm (the official
    ranking reward model does; its training model does not, see the module docstring).
    """
    _check_even(v_i)
    _check_even(v_j)
    _check_tau(tau)
    v_i, v_j = _maybe_normalize(v_i, normalize), _maybe_normalize(v_j, normalize)
    return (skew_rotate(v_i) * v_j).sum(-1) / tau  # [...]


def gpm_probability(v_i: Tensor, v_j: Tensor, tau: float = 0.1, normalize: bool = False) -> Tensor:
    """P(y_i > y_j) = sigmoid(s(y_i, y_j)) (arXiv 2410.02197); v [..., 2k] -> [...]."""
    return torch.sigmoid(gpm_score(v_i, v_j, tau, normalize))  # [...]


def gpm_score_table(v: Tensor, tau: float = 0.1, normalize: bool = False) -> Tensor:
    """All pairwise GPM scores of K responses, S_ij = s(y_i, y_j) (arXiv 2410.02197); v [K, 2k] -> [K, K].

    One matmul; the result is made exactly antisymmetric with a zero diagonal by (A - A^T) / 2, which
    equals A in exact arithmetic and removes rounding differences between s_ij and -s_ji.
    """
    _check_even(v)
    if v.dim() != 2:
        raise ValueError(f"gpm_score_table takes embeddings [K, 2k], got shape {tuple(v.shape)}")
    _check_tau(tau)
    v = _maybe_normalize(v, normalize)  # [K, 2k]
    table = skew_rotate(v) @ v.T / tau  # [K, K]
    return (table - table.T) / 2  # [K, K]


def gpm_pair_loss(
    chosen: Tensor,
    rejected: Tensor,
    tau: float = 0.1,
    normalize: bool = False,
    margin: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GPM training loss -log sigmoid((<R v_w, v_l> - margin) / tau) (arXiv 2410.02197; official loss.py).

    chosen, rejected [B, 2k]; margin [B] or None (the official code subtracts it before dividing by tau).
    Returns (losses [B], metrics: "probability" = sigmoid of the same logit, "score" = the score without
    the margin, both detached [B]). Take ``losses.mean()`` for the batch loss.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 2:
        raise ValueError(
            f"chosen and rejected must both be [B, 2k] of one shape, got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    raw = gpm_score(chosen, rejected, tau=1.0, normalize=normalize)  # [B]
    _check_tau(tau)
    if margin is not None and margin.shape != raw.shape:
        raise ValueError(f"margin must be [B] = {tuple(raw.shape)}, got {tuple(margin.shape)}")
    logits = (raw - (margin if margin is not None else 0.0)) / tau  # [B]
    losses = -F.logsigmoid(logits)  # [B]
    return losses, {"probability": torch.sigmoid(logits).detach(), "score": (raw / tau).detach()}


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry reward-model loss -log sigmoid(r_w - r_l) (InstructGPT, Ouyang et al., 2022, arXiv 2203.02155,
    eq. 1; TRL's RewardTrainer), the scalar baseline GPM is compared with.

    chosen, rejected [B] scalar rewards. Returns (losses [B], metrics: "probability" = sigmoid(r_w - r_l) and
    "score" = r_w - r_l, both detached [B]). TRL's optional margin and reward-centering terms are not here.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(
            f"chosen and rejected must both be [B] of one shape, got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    logits = chosen - rejected  # [B]
    return -F.logsigmoid(logits), {"probability": torch.sigmoid(logits).detach(), "score": logits.detach()}


def gpm_win_rates(table: Tensor, antisymmetrize: bool = False) -> Tensor:
    """Mean win probability of each response against the group, P_i = (1/K) sum_j sigmoid(S_ij) (GPO).

    table [K, K] of scores (`gpm_score_table`) -> [K]. The mean runs over all K responses, self
    included (sigmoid(0) = 1/2), as the official GPO/SPPO scripts do (row sum / K). With
    `antisymmetrize=True` the pair probability is sigmoid(S_ij - S_ji), as in the official
    `compute_prob_from_raw.py` (for a GPM table, sigmoid(2 S_ij)); the default is the paper's sigmoid(S_ij).
    """
    if table.dim() != 2 or table.shape[0] != table.shape[1]:
        raise ValueError(f"table must be a square score table [K, K], got shape {tuple(table.shape)}")
    logits = table - table.T if antisymmetrize else table  # [K, K]
    return torch.sigmoid(logits).mean(dim=1)  # [K]


def sppo_targets(win_rates: Tensor, beta: float) -> Tensor:
    """SPPO regression target for log(pi / pi_ref): (P - 1/2) / beta (arXiv 2405.00675, eta = 1 / beta).

    win_rates [...] -> [...]. The offset 1/2 is the paper's and the official uclaml/SPPO trainer's
    (see the module docstring); the loss there is (log-ratio - target)^2 per response.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return (win_rates - 0.5) / beta  # [...]

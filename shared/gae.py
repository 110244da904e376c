"""GAE (Schulman et al. 2016, arXiv:1506.02438) and T-PPO's Extended GAE (Fan et al. 2025, arXiv:2506.15050).

Per completion token t (the action a_t taken in state s_t = prompt + completion[:t]), with per-token rewards r_t
and a critic's values V(s_t), GAE (Eq. 16 of arXiv:1506.02438) is

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t),     A_t = sum_{k >= 0} (gamma lambda)^k delta_{t+k},

computed backwards as A_t = delta_t + gamma lambda A_{t+1}, with returns R_t = A_t + V(s_t) as the critic's
targets. A finished completion of length l ends in a terminal state: V(s_l) = 0.

Extended GAE (T-PPO). T-PPO trains on responses cut at a generation window, so an unfinished response of length
l has no V(s_l) (the state after its last token is neither terminal nor scored); EGAE takes V(s_l) = V(s_{l-1}),
so its last delta is r_{l-1} + (gamma - 1) V(s_{l-1}). A finished response keeps V(s_l) = 0, so EGAE equals GAE
when every response finishes.

Not checked: T-PPO has no official code, and its EGAE section was not readable from here; the substitution above
is the one the issue and the paper's abstract describe. The paper's gamma and lambda (for the policy and for the
critic), what reward an unfinished response carries (0 here unless the caller puts one in `rewards`), and how its
tokens are filtered for the policy and value losses were not checked; gamma and lambda have no defaults here.

The critic's loss (`clipped_value_loss`) and the advantages' whitening (`whitened`) are here too: the rest of PPO
(arXiv:1707.06347) for a critic that GAE's returns train.

Masked positions (padding, or tokens the policy did not produce, such as tool output between turns) are skipped:
the next state of a kept token is the next kept token's, as in verl's multi-turn GAE. Masked positions get
advantage and return 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["clipped_value_loss", "egae_advantages", "gae_advantages", "last_token_rewards", "whitened"]


def _check(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> None:
    shapes = {"rewards": tuple(rewards.shape), "values": tuple(values.shape), "mask": tuple(mask.shape)}
    if len(shapes["values"]) != 2 or len(set(shapes.values())) != 1:
        raise ValueError(f"rewards, values and mask must all be 2-D [B, T] of the same shape, got {shapes}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0 <= lam <= 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    kept = mask.bool()
    if not (bool(torch.isfinite(rewards[kept]).all()) and bool(torch.isfinite(values[kept]).all())):
        raise ValueError("rewards or values are not finite on kept tokens")


def _gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, bootstrap: Tensor):
    """Backward recursion; `bootstrap` [B] is V of the state after each row's last kept token."""
    kept = mask.bool()  # [B, T]
    rewards, values = rewards.detach(), values.detach()
    next_value = bootstrap.to(values.dtype)  # [B] V(s_{t+1}) of the next kept token
    running = torch.zeros_like(next_value)  # [B] A_{t+1}
    advantages = torch.zeros_like(values)  # [B, T]
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [B]
        here = delta + gamma * lam * running  # [B]
        advantages[:, t] = torch.where(kept[:, t], here, torch.zeros_like(here))
        running = torch.where(kept[:, t], here, running)
        next_value = torch.where(kept[:, t], values[:, t], next_value)
    returns = torch.where(kept, advantages + values, torch.zeros_like(values))  # [B, T]
    return advantages, returns


def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE (arXiv:1506.02438, Eq. 16): A_t = sum_k (gamma lambda)^k delta_{t+k}, V = 0 after the last kept token.

    rewards [B, T] per-token rewards (`last_token_rewards` for an outcome reward, plus any per-token terms);
    values [B, T] the critic's V(s_t); mask [B, T] the completion mask. Returns (advantages [B, T],
    returns [B, T] = advantages + values), 0 on masked positions.
    """
    _check(rewards, values, mask, gamma, lam)
    return _gae(rewards, values, mask, gamma, lam, values.new_zeros(values.shape[0]))


def egae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, finished: Tensor, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """T-PPO's Extended GAE (arXiv:2506.15050): GAE whose missing V(s_l) is V(s_{l-1}) for unfinished responses.

    rewards, values, mask as in `gae_advantages`; finished [B] bool: whether each response ended (EOS) inside
    the window. A finished row is plain GAE (V(s_l) = 0); an unfinished row bootstraps from the value of its last
    kept token. Returns (advantages [B, T], returns [B, T]); equal to `gae_advantages` when every row finished.
    """
    _check(rewards, values, mask, gamma, lam)
    if finished.dtype != torch.bool or finished.shape != (values.shape[0],):
        raise ValueError(
            f"finished must be a bool tensor [B] = ({values.shape[0]},), got {finished.dtype} {tuple(finished.shape)}"
        )
    kept = mask.bool()  # [B, T]
    T = values.shape[1]
    position = torch.arange(T, device=values.device).expand_as(kept)  # [B, T]
    last = torch.where(kept, position, torch.full_like(position, -1)).amax(dim=1)  # [B] last kept token, -1 if none
    last_value = values.detach().gather(1, last.clamp(min=0)[:, None])[:, 0]  # [B] V(s_{l-1})
    bootstrap = torch.where(~finished & (last >= 0), last_value, torch.zeros_like(last_value))  # [B] V(s_l)
    return _gae(rewards, values, mask, gamma, lam, bootstrap)


def last_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """[B] outcome rewards as per-token rewards [B, T]: each on its completion's last kept token, 0 elsewhere."""
    if rewards.dim() != 1 or mask.dim() != 2 or rewards.shape[0] != mask.shape[0]:
        raise ValueError(f"rewards must be [B] and mask [B, T], got {tuple(rewards.shape)} and {tuple(mask.shape)}")
    kept = mask.bool()  # [B, T]
    T = mask.shape[1]
    position = torch.arange(T, device=mask.device).expand_as(kept)  # [B, T]
    last = torch.where(kept, position, torch.full_like(position, -1)).amax(dim=1)  # [B]
    rewards = rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())
    return torch.where(position == last[:, None], rewards[:, None], torch.zeros((), dtype=rewards.dtype))  # [B, T]


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped value loss per token: max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2) / 2.

    Not in the PPO paper (arXiv:1707.06347, whose Eq. 9 has the plain (V - R)^2): it is OpenAI baselines' ppo2
    code, kept by OpenRLHF (value_clip) and TRL (cliprange_value). It keeps the critic near the values the returns
    were computed from, as the ratio clip keeps the policy near the old one. values [B, T] (with gradient),
    old_values [B, T] the values the returns came from, returns [B, T], mask [B, T]; clip None: (V - R)^2 / 2.
    Returns (per-token losses [B, T], 0 on masked positions, for the caller to aggregate; metrics: clipfrac, the
    share of kept tokens where the clipped term is the larger)."""
    if not values.shape == old_values.shape == returns.shape == mask.shape or values.dim() != 2:
        shapes = [tuple(x.shape) for x in (values, old_values, returns, mask)]
        raise ValueError(f"values, old_values, returns and mask must all be [B, T], got {shapes}")
    kept = mask.bool()  # [B, T]
    old_values, returns = old_values.detach(), returns.detach()
    plain = (values - returns) ** 2  # [B, T]
    if clip is None:
        losses, clipped_larger = plain, torch.zeros_like(kept)
    else:
        moved = old_values + (values - old_values).clamp(-clip, clip)  # [B, T] clip(V, V_old - eps, V_old + eps)
        far = (moved - returns) ** 2  # [B, T]
        losses, clipped_larger = torch.maximum(plain, far), far > plain
    losses = torch.where(kept, 0.5 * losses, torch.zeros_like(losses))  # [B, T]
    count = max(int(kept.sum()), 1)
    return losses, {"value_clipfrac": float((clipped_larger & kept).sum()) / count}


def whitened(advantages: Tensor, mask: Tensor, mean: float, var: float, eps: float = 1e-8) -> Tensor:
    """(A - mean) / sqrt(var + eps) on kept tokens, 0 elsewhere: advantages [B, T] whitened with the statistics
    of the batch (the caller's: over every rank's kept tokens), as OpenRLHF's and TRL's masked_whiten."""
    scaled = (advantages - mean) * (var + eps) ** -0.5  # [B, T]
    return torch.where(mask.bool(), scaled, torch.zeros_like(scaled))

"""Coupled-GRPO for masked-diffusion language models: complementary masks, the coupled log-prob, LOO advantages.

DiffuCoder (Gong et al., 2025, arXiv 2506.20639), coupled-GRPO. A masked-diffusion LM has no left-to-right
log-probability, so each completion is scored by three forward passes over masked copies of the sequence, and
the per-token log-probabilities of the true tokens are combined. Checked line by line against the official
code, github.com/apple/ml-diffucoder `src/open_r1/coupled_grpo.py` (commit f735e01, 2025-07-08:
`forward_process`, `selective_log_softmax`, `_generate_and_score_completions`) and
`recipes/config_coupled_code.yaml`; no code was copied. What that code does:

- t: ONE mask ratio per call for the whole batch, ``random.uniform(0.2, 0.8)`` after ``set_seed(mask_seed)``
  (its comment says 0.1 to 0.9; the code draws from [0.2, 0.8]). Here ``t`` may be a scalar (official) or one
  value per sample [B] (a generalisation).
- masks: a uniform matrix u ~ U[0, 1) [B, L] (the same seed gives the same u); pass A masks the completion
  positions with u < t, pass B those with u > t. Each position is masked independently with probability t
  (a Bernoulli draw, no rounding to a fixed count). A position with u == t exactly (probability ~2^-24 in
  float32) is masked in neither pass, but the estimate below takes it from pass B, so ``mask_b`` here is
  the exact complement of ``mask_a`` within the completion, which is what the estimate uses.
- which positions: every position after the (left-padded, equal-length) prompt, so the official passes also
  mask the padding after a completion's EOS (the loss then multiplies by the completion mask). Here the masks
  are restricted to ``completion_mask``: padding is never masked (the brief's rule; a model's context at
  padding positions therefore differs from the official one). Prompt tokens are never masked in either pass
  (the config's ``p_mask_prompt``, default 0.15, recipe 0.0, is not read by `coupled_grpo.py`).
- a third, fully masked pass exists: all completion positions masked (weight 1).
- the estimate per completion token j (``selective_log_softmax`` with weights ``[1, 1/t, 1/(1-t)]``):

      logp_j = ( logp_full_j + (logp_A_j / t  if j in mask_a  else  logp_B_j / (1 - t)) ) / 2

  i.e. the fully masked pass and the weighted complementary pass are averaged; the weights multiply the
  log-probabilities (not the probabilities). There is no per-sequence sum: the loss uses the per-token
  ratio exp(logp - logp_old) with the token-mean over the batch (TRL's token-level GRPO loss).
- masks across updates: one seed per inner GRPO iteration (``num_iterations``; random seeds in [0, 4096) when
  ``random_masking`` is true, the recipe's setting; 42 for every iteration otherwise), drawn at rollout time;
  the old-policy and reference log-probs of iteration k and the policy's log-probs at update k use the same
  seed, hence the same t and masks (k = the micro-batch step counter mod ``num_iterations``). With gradient accumulation the rollout draws u for one micro-batch and
  tiles it over the micro-batches, so every micro-batch sees the same u as the update step that redraws it.
  Here a ``torch.Generator`` seeded the same way gives the same masks; the tiling is the caller's.
- advantages: ``leave_one_out = True`` is hard-coded: A_i = r_i - (sum_g r - r_i) / (G - 1), divided by
  (sample std of the group, ``torch.std`` unbiased, + 1e-4) only when ``scale_rewards`` is true; the coupled
  recipe sets ``scale_rewards: false``, so A_i is unscaled. Recipe: epsilon 0.5, beta 0.01 (k3 KL to the
  reference's coupled estimate under the same masks), num_generations 10, num_iterations 2.

Not checked here: the paper's equations themselves (only the official code); the model's logit shift (the
official code drops the last logit, Dream predicts token i from position i - 1) is the model adapter's job;
the per-position log-probs passed in are assumed aligned with the tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "MASK_RATIO_RANGE",
    "complementary_masks",
    "coupled_pass_inputs",
    "coupled_token_logps",
    "leave_one_out_advantages",
    "masks_from_uniforms",
    "sample_mask_ratio",
    "single_mask_token_logps",
]

MASK_RATIO_RANGE = (0.2, 0.8)  # official: random.uniform(0.2, 0.8), one value per batch


def sample_mask_ratio(generator: torch.Generator, low: float = 0.2, high: float = 0.8) -> float:
    """One mask ratio t ~ U(low, high) for the whole batch, as the official `forward_process` (arXiv 2506.20639)."""
    if not 0.0 < low <= high < 1.0:
        raise ValueError(
            f"mask ratio range ({low}, {high}) must satisfy 0 < low <= high < 1; the paper uses (0.2, 0.8)"
        )
    u = torch.rand((), generator=generator).item()
    return low + (high - low) * u


def _ratio_per_sample(t: Tensor | float, batch: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.dim() == 0:
        t = t.expand(batch)  # [B], the official per-batch t
    if t.shape != (batch,):
        raise ValueError(f"t has shape {tuple(t.shape)}; pass a scalar or one ratio per sample, shape ({batch},)")
    if not bool(((t > 0) & (t < 1)).all()):
        raise ValueError(f"t must lie in (0, 1) (the weights are 1/t and 1/(1-t)); got {t.tolist()}")
    return t


def masks_from_uniforms(completion_mask: Tensor, t: Tensor | float, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """Complementary masks from given uniforms (DiffuCoder coupled-GRPO, arXiv 2506.20639, `forward_process`).

    mask_a = completion & (u < t), mask_b = completion & ~mask_a. completion_mask [B, L] (bool or 0/1; prompt
    and padding positions False), t scalar or [B], uniforms [B, L] in [0, 1). Every completion position lies in
    exactly one of the two masks; no other position lies in either.
    """
    if completion_mask.dim() != 2:
        raise ValueError(f"completion_mask has shape {tuple(completion_mask.shape)}; expected [B, L]")
    if uniforms.shape != completion_mask.shape:
        raise ValueError(
            f"uniforms has shape {tuple(uniforms.shape)} but completion_mask has {tuple(completion_mask.shape)}"
        )
    completion = completion_mask.bool()  # [B, L]
    ratio = _ratio_per_sample(t, completion.shape[0], completion.device)  # [B]
    mask_a = completion & (uniforms < ratio[:, None])  # [B, L]
    mask_b = completion & ~mask_a  # [B, L]
    return mask_a, mask_b


def complementary_masks(
    completion_mask: Tensor, t: Tensor | float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Two complementary random masks over the completion (DiffuCoder coupled-GRPO, arXiv 2506.20639).

    Each completion position is in mask_a with probability t (independently; no rounding to a count) and in
    mask_b otherwise. Draws u ~ U[0, 1) [B, L] from ``generator`` on the CPU, so a generator seeded the same way
    gives the same masks on any device: reuse one seed for the old-policy, reference and policy passes of one
    update, as the official code reuses ``mask_seeds[k]``.
    """
    uniforms = torch.rand(completion_mask.shape, generator=generator).to(completion_mask.device)  # [B, L]
    return masks_from_uniforms(completion_mask, t, uniforms)


def coupled_pass_inputs(
    input_ids: Tensor, completion_mask: Tensor, mask_a: Tensor, mask_b: Tensor, mask_token_id: int
) -> Tensor:
    """The three masked copies the model scores (arXiv 2506.20639; official `forward_process`), stacked [3, B, L].

    0: every completion token masked; 1: the mask_a tokens masked (pass A); 2: the mask_b tokens masked (pass B).
    Prompt and padding tokens are kept (the official code masks padding after EOS too; see the module docstring).
    """
    if not (input_ids.shape == completion_mask.shape == mask_a.shape == mask_b.shape):
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, completion_mask {tuple(completion_mask.shape)}, mask_a "
            f"{tuple(mask_a.shape)} and mask_b {tuple(mask_b.shape)} must have the same shape [B, L]"
        )
    masked = torch.full_like(input_ids, mask_token_id)  # [B, L]
    passes = [completion_mask.bool(), mask_a.bool(), mask_b.bool()]
    return torch.stack([torch.where(m, masked, input_ids) for m in passes])  # [3, B, L]


def coupled_token_logps(
    logp_full: Tensor,
    logp_a: Tensor,
    logp_b: Tensor,
    mask_a: Tensor,
    t: Tensor | float,
    completion_mask: Tensor | None = None,
) -> Tensor:
    """Coupled per-token log-prob estimate (DiffuCoder, arXiv 2506.20639; official `selective_log_softmax`).

        logp_j = ( logp_full_j + (logp_a_j / t  if mask_a_j  else  logp_b_j / (1 - t)) ) / 2

    logp_full, logp_a, logp_b [B, L]: log-probs of the true tokens under the fully masked pass, pass A (mask_a
    masked) and pass B (mask_b masked); mask_a [B, L]; t scalar or [B]. Returns [B, L]; positions outside
    ``completion_mask`` (if given) are set to 0 (the official code leaves them and masks them in the loss).
    """
    if not (logp_full.shape == logp_a.shape == logp_b.shape == mask_a.shape) or logp_full.dim() != 2:
        raise ValueError(
            f"logp_full {tuple(logp_full.shape)}, logp_a {tuple(logp_a.shape)}, logp_b {tuple(logp_b.shape)} and "
            f"mask_a {tuple(mask_a.shape)} must all have the same shape [B, L]"
        )
    ratio = _ratio_per_sample(t, logp_full.shape[0], logp_full.device).to(logp_full.dtype)[:, None]  # [B, 1]
    weighted = torch.where(mask_a.bool(), logp_a / ratio, logp_b / (1 - ratio))  # [B, L]
    estimate = (logp_full + weighted) / 2  # [B, L]
    if completion_mask is not None:
        estimate = estimate * completion_mask.to(estimate.dtype)  # [B, L]
    return estimate


def single_mask_token_logps(logp_a: Tensor, mask_a: Tensor, t: Tensor | float) -> Tensor:
    """The ablation of the coupling in DiffuCoder (arXiv 2506.20639): one random mask, no complementary pass.

        logp_j = logp_a_j / t   if mask_a_j   else 0

    One masked pass (mask_a masked) scores only the tokens it masks, weighted 1/t as pass A of the coupled
    estimate; a token outside mask_a gets no estimate and must be left out of the loss (the caller's token mask:
    ``mask_a``). logp_a, mask_a [B, L]; t scalar or [B]. Returns [B, L]. The official code has no such mode (its
    recipe always couples); this is the ablation's stated form, without its fully masked pass.
    """
    if logp_a.shape != mask_a.shape or logp_a.dim() != 2:
        raise ValueError(f"logp_a {tuple(logp_a.shape)} and mask_a {tuple(mask_a.shape)} must have one shape [B, L]")
    ratio = _ratio_per_sample(t, logp_a.shape[0], logp_a.device).to(logp_a.dtype)[:, None]  # [B, 1]
    return torch.where(mask_a.bool(), logp_a / ratio, torch.zeros_like(logp_a))  # [B, L]


def leave_one_out_advantages(rewards: Tensor, group_size: int, scale: bool = False, eps: float = 1e-4) -> Tensor:
    """Leave-one-out advantages (DiffuCoder coupled-GRPO, arXiv 2506.20639; official `leave_one_out = True`).

        A_i = r_i - (sum_g r - r_i) / (G - 1)      [= G / (G - 1) * (r_i - mean_g r)]

    rewards [B*G], groups contiguous (member i of group g at g*G + i). With ``scale`` (official
    ``scale_rewards``, false in the coupled recipe) A_i is divided by (sample std of the group + eps), the std
    unbiased as ``torch.std``. ``shared.advantages.group_advantages`` has no leave-one-out form (its "none"
    scale gives r_i - mean_g r, the same up to the factor G / (G - 1)).
    """
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: leave-one-out needs at least 2 members per group")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}; expected [B*G] with G = group_size = {group_size}")
    grouped = rewards.float().view(-1, group_size)  # [B, G]
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # [B, G]
    advantages = grouped - baseline  # [B, G]
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)  # [B, G]
    return advantages.reshape(-1)  # [B*G]

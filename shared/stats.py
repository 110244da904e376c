"""Per-prompt reward statistics usable across steps (Flow-GRPO's per-prompt stat tracker).

For a reward r of prompt p:

    A = (r - mean_p) / (std_p + eps)

mean_p and std_p (population std, unbiased=False) come from p's rewards in this update, or,
with ``history=True``, from all of p's rewards since the last ``clear()`` (so a prompt drawn
with few samples per step still gets a usable std), or from its last ``history_size`` of them
(never fewer than this update's; ddpo-pytorch's per-prompt ``buffer_size``). With
``global_std=True`` the divisor is the population std of all rewards of this update instead.
A prompt whose pooled rewards are all equal gets advantages exactly 0, as in
``group_advantages``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PromptStatTracker", "mean_with_standard_error", "paired_gain"]


class PromptStatTracker:
    """Per-prompt advantages with statistics kept by prompt string; state is JSON-safe.

    Args:
        global_std: divide by the std of the whole update instead of the prompt's std.
        eps: added to the std before dividing.
        history: pool each prompt's rewards since the last ``clear()``; otherwise only the
            current update's rewards are kept and used.
        history_size: with ``history``, keep only each prompt's last ``history_size`` rewards
            (at least the current update's); None keeps all.
    """

    def __init__(
        self, global_std: bool = False, eps: float = 1e-4, history: bool = False, history_size: int | None = None
    ):
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if history_size is not None and history_size < 1:
            raise ValueError(f"history_size must be >= 1 or None, got {history_size}")
        self.global_std, self.eps, self.history = bool(global_std), float(eps), bool(history)
        self.history_size = history_size
        self.rewards: dict[str, list[float]] = {}  # prompt -> rewards seen (python floats)

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Record the rewards and return their advantages [N] (float dtype of ``rewards``)."""
        if rewards.dim() != 1 or len(prompts) != rewards.numel():
            raise ValueError(
                f"got {len(prompts)} prompts and rewards of shape {tuple(rewards.shape)}; give one prompt per reward, rewards as [N]"
            )
        dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
        values = rewards.detach().double().cpu()  # [N]; float64 so stored floats round-trip exactly
        if bool(torch.isnan(values).any()):
            raise ValueError(
                f"rewards contain NaN at positions {torch.nonzero(torch.isnan(values)).flatten().tolist()[:20]}; drop or replace them first"
            )

        current: dict[str, list[int]] = {}  # prompt -> positions in this update
        for i, prompt in enumerate(prompts):
            current.setdefault(prompt, []).append(i)
        for prompt, positions in current.items():
            previous = self.rewards.get(prompt, []) if self.history else []
            pooled = previous + values[positions].tolist()
            keep = len(pooled) if self.history_size is None else max(self.history_size, len(positions))
            self.rewards[prompt] = pooled[-keep:]  # the most recent ones

        batch_std = values.std(unbiased=False) if values.numel() > 1 else values.new_zeros(())
        advantages = torch.zeros_like(values)  # [N]
        for prompt, positions in current.items():
            pool = torch.tensor(self.rewards[prompt], dtype=torch.float64)  # [n_p]
            if bool(pool.max() == pool.min()):
                continue  # no spread: exactly 0, not a rounding residue divided by eps
            std = batch_std if self.global_std else pool.std(unbiased=False)
            advantages[positions] = (values[positions] - pool.mean()) / (std + self.eps)
        return advantages.to(dtype=dtype, device=rewards.device)

    def clear(self) -> None:
        """Forget every prompt (Flow-GRPO clears once per epoch)."""
        self.rewards = {}

    def prompt_stats(self) -> dict[str, float]:
        """{"num_prompts": prompts tracked, "mean_group_size": mean number of rewards kept per prompt}."""
        sizes = [len(v) for v in self.rewards.values()]
        return {"num_prompts": len(sizes), "mean_group_size": sum(sizes) / len(sizes) if sizes else 0.0}

    def state_dict(self) -> dict:
        return {
            "global_std": self.global_std,
            "eps": self.eps,
            "history": self.history,
            "history_size": self.history_size,
            "rewards": {prompt: list(values) for prompt, values in self.rewards.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the tracked rewards; the options must match the ones this tracker was built with."""
        for key in ("global_std", "eps", "history", "history_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"tracker state has {key}={state[key]!r} but this tracker has {key}={getattr(self, key)!r}; "
                    "construct PromptStatTracker with the same options as the run that saved it"
                )
        if "rewards" not in state:
            raise ValueError(f"tracker state has no 'rewards' entry (keys: {sorted(state)})")
        self.rewards = {str(prompt): [float(v) for v in values] for prompt, values in state["rewards"].items()}


def mean_with_standard_error(values: Tensor) -> tuple[float, float, int]:
    """(mean, standard error, n) of the finite entries of a 1-D tensor: SE = s / sqrt(n) with s the sample
    standard deviation (n - 1 in the divisor). n < 2 gives SE NaN; no finite entry gives (NaN, NaN, 0)."""
    finite = values[torch.isfinite(values)].double()  # [n]
    n = finite.numel()
    if n == 0:
        return float("nan"), float("nan"), 0
    se = finite.std(unbiased=True).item() / n**0.5 if n >= 2 else float("nan")
    return finite.mean().item(), se, n


def paired_gain(before: Tensor, after: Tensor) -> tuple[float, float, int]:
    """(mean, standard error, n) of after - before over the pairs where both are finite: the gain of an evaluation
    that scores the same prompts from the same noise twice. Pairing removes the spread between prompts and
    seeds that both share, so its SE is the one to judge a before -> after change by (not the two SEs apart)."""
    if before.shape != after.shape:
        raise ValueError(f"paired_gain: shapes {tuple(before.shape)} and {tuple(after.shape)} differ")
    return mean_with_standard_error(after.double() - before.double())  # NaN where either is NaN: left out

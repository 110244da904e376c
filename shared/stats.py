"""Per-prompt reward statistics across steps (Flow-GRPO style) for image prompts."""

from __future__ import annotations

import torch
from torch import Tensor


class PromptStatTracker:
    """Advantages (r - mean_prompt) / (std + eps) with statistics kept per prompt string.

    history=False: the statistics of a prompt come from its rewards in the current update only.
    history=True: from all its rewards since the last `clear()` (so a prompt seen with few samples per
    step still gets a useful std). global_std: divide by the std of the whole update instead.
    State is plain python (JSON-safe) for checkpoints."""

    def __init__(self, global_std: bool = False, history: bool = False, eps: float = 1e-4):
        self.global_std, self.history, self.eps = global_std, history, eps
        self.rewards: dict[str, list[float]] = {}

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        if len(prompts) != rewards.numel():
            raise ValueError(f"{len(prompts)} prompts but {rewards.numel()} rewards; give one prompt per reward")
        values = rewards.detach().double().flatten().cpu()  # [N]
        current: dict[str, list[float]] = {}
        for prompt, value in zip(prompts, values.tolist()):
            current.setdefault(prompt, []).append(value)
        for prompt, seen in current.items():
            self.rewards[prompt] = (self.rewards.get(prompt, []) if self.history else []) + seen
        advantages = torch.zeros_like(values)
        batch_std = values.std(unbiased=False).item()
        for i, prompt in enumerate(prompts):
            pool = torch.tensor(self.rewards[prompt], dtype=torch.float64)
            std = batch_std if self.global_std else pool.std(unbiased=False).item()
            advantages[i] = (values[i] - pool.mean()) / (std + self.eps)
        return advantages.to(rewards.dtype)

    def clear(self) -> None:
        self.rewards = {}

    def prompt_stats(self) -> dict[str, float]:
        sizes = [len(v) for v in self.rewards.values()]
        return {"prompts": len(sizes), "mean_count": sum(sizes) / len(sizes) if sizes else 0.0}

    def state_dict(self) -> dict:
        return {"global_std": self.global_std, "history": self.history, "eps": self.eps,
                "rewards": {k: list(v) for k, v in self.rewards.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.global_std, self.history, self.eps = state["global_std"], state["history"], state["eps"]
        self.rewards = {k: list(v) for k, v in state["rewards"].items()}

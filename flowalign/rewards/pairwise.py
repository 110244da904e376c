"""Pairwise-preference rewards for images: each image's win rate against the others of its prompt's group, as
Pref-GRPO (Wang et al. 2025, arXiv:2508.20751) ranks a group (the math and its checks: shared.pairwise).

`win_rate_reward` turns any comparator fn(prompt, image_a [3, H, W], image_b [3, H, W]) -> P(a > b) in [0, 1]
(None: no answer) into a groupwise reward (shared.reward_calls.groupwise), named in a config like any reward:

    reward:
      weights: {flowalign.rewards.pairwise:win_rate_reward: 1.0}
      kwargs:
        flowalign.rewards.pairwise:win_rate_reward:
          comparator: my_pkg.judges:prefer_sharper      # fn(prompt, image_a, image_b) -> P(a > b)
          comparator_kwargs: {}                         # its factory's arguments, if it is one
          pairing: unordered                            # K(K-1)/2 calls; both_orders: K(K-1), cancels position bias
          failed_pair: drop                             # a pair with no answer: its members get no score; tie: 1/2

`digit_win_rate` is the embedded toy's: the digit classifier's probability p of the prompted digit compared through
a Bradley-Terry sigmoid, P(a > b) = sigmoid((p_a - p_b) / temperature) (`digit_preference`).
"""

from __future__ import annotations

from typing import Callable

import torch

from flowalign.rewards import digit_classifier_reward
from shared.pairwise import win_rate_scorer
from shared.reward_calls import ImageRewardFn, groupwise


def win_rate_reward(
    comparator: str | Callable,
    comparator_kwargs: dict | None = None,
    pairing: str = "unordered",
    failed_pair: str = "drop",
    max_workers: int = 1,
) -> ImageRewardFn:
    """A groupwise reward fn(images [K, 3, H, W], prompt, metadata) -> [K] win rates from `comparator` (a callable
    fn(prompt, image_a, image_b) -> P(a > b) or None, or its import path 'module:name' built with
    `comparator_kwargs`). pairing "unordered" asks each of the K (K - 1) / 2 pairs once (the official code's
    choice); "both_orders" asks K (K - 1), each pair both ways, for judges that favour one position. max_workers > 1
    runs that many comparisons at once (the comparator must then be thread-safe)."""
    score = win_rate_scorer(comparator, comparator_kwargs, pairing, failed_pair, max_workers)

    @groupwise
    def reward(images: torch.Tensor, prompt: str, metadata: list[dict]) -> list[float | None]:
        return score(prompt, images)

    return reward


def digit_preference(temperature: float = 0.1, path: str | None = None) -> Callable:
    """The digits toy's comparator: P(a > b) = sigmoid((p_a - p_b) / temperature), p the digit classifier's
    probability of the digit the prompt names (`flowalign.rewards.digit_classifier_reward`, `path` as there). A
    Bradley-Terry preference whose strengths are p / temperature: it has no position bias (P(a > b) = 1 - P(b > a))."""
    if not temperature > 0:
        raise ValueError(f"temperature {temperature!r} must be > 0 (a smaller one makes a harder judge)")
    probability = digit_classifier_reward(path)

    def compare(prompt: str, image_a: torch.Tensor, image_b: torch.Tensor) -> float:
        p = probability(torch.stack([image_a, image_b]), [prompt, prompt], [{}, {}])  # [2]
        return torch.sigmoid((p[0] - p[1]) / temperature).item()

    return compare


def digit_win_rate(temperature: float = 0.1, path: str | None = None, pairing: str = "unordered") -> ImageRewardFn:
    """The embedded toy's pairwise reward: win rates in the group under `digit_preference(temperature, path)`."""
    return win_rate_reward(digit_preference(temperature, path), pairing=pairing)

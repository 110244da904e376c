"""Load rewards named by import path and call them with checks.

A reward is a callable `(images [B, 3, H, W] in [0, 1], prompts: list[str], metadata: list[dict])
-> scores [B]`. A config names it as 'module:name'; `name` is either the reward itself or a
factory that returns it: called with the config's `reward.kwargs` when it has an entry, or with no
arguments when all its parameters have defaults. Problems are reported with the reward's name before training starts.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import torch

RewardFn = Callable[[torch.Tensor, list, list], Any]


class RewardError(RuntimeError):
    """A reward misbehaved; the message names the reward and what it did."""


def _is_factory(obj: Callable) -> bool:
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in parameters)


def load_reward(path: str, kwargs: dict | None = None) -> RewardFn:
    """Import 'module:name' and return the reward callable (calling the factory if it is one)."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RewardError(f"reward '{path}': cannot import module '{module_name}' ({error}); check reward.weights") from None
    if not hasattr(module, attribute):
        raise RewardError(f"reward '{path}': module '{module_name}' has no '{attribute}'; check the name in reward.weights")
    obj = getattr(module, attribute)
    if not callable(obj):
        raise RewardError(f"reward '{path}': '{attribute}' is a {type(obj).__name__}, not a function")
    if kwargs or _is_factory(obj):  # given kwargs, or nothing required: a factory that returns the reward
        try:
            obj = obj(**(kwargs or {}))
        except TypeError as error:
            raise RewardError(f"reward '{path}': calling it with reward.kwargs {kwargs or {}} failed ({error}); "
                              "give the factory's arguments, or no kwargs for a reward function") from None
    try:
        inspect.signature(obj).bind(None, None, None)
    except TypeError:
        raise RewardError(f"reward '{path}': must accept (images, prompts, metadata); "
                          f"its signature is {inspect.signature(obj)}") from None
    except ValueError:
        pass  # builtins without a signature: checked when first called
    return obj


def call_reward(name: str, fn: RewardFn, images: torch.Tensor, prompts: list[str], metadata: list[dict],
                allow_nonfinite: bool = False) -> torch.Tensor:
    """Call one reward and check its output: one float per image, finite unless `allow_nonfinite`
    (then NaN/inf come back as NaN, for the caller to drop)."""
    try:
        scores = fn(images, prompts, metadata)
    except Exception as error:
        raise RewardError(f"reward '{name}' raised {type(error).__name__}: {error} (batch of {len(prompts)}, "
                          f"first prompt {prompts[0]!r})") from error
    scores = torch.as_tensor(scores, dtype=torch.float32).detach().flatten().cpu()  # [B]
    if scores.numel() != len(prompts):
        raise RewardError(f"reward '{name}' returned {scores.numel()} scores for {len(prompts)} images; "
                          "return one score per image")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad and allow_nonfinite:
        return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, float("nan")))
    if bad:
        raise RewardError(f"reward '{name}' returned non-finite scores at positions {bad[:10]} "
                          f"(prompts {[prompts[i] for i in bad[:3]]}); values {[scores[i].item() for i in bad[:3]]}")
    return scores


def check_rewards_on_dummy_batch(rewards: dict[str, RewardFn], images: torch.Tensor, prompts: list[str],
                                 allow_nonfinite: bool = False) -> None:
    """Run each reward once on a small batch so a broken reward fails before training, not after a rollout."""
    for name, fn in rewards.items():
        call_reward(name, fn, images, prompts, [{} for _ in prompts], allow_nonfinite)

"""Load rewards named by import path and call them with checks.

A reward is a callable `(images [B, 3, H, W] in [0, 1], prompts: list[str], metadata: list[dict])
-> scores [B]`. A config names it as 'module:name'; `name` is either the reward itself or a
factory that returns it: called with the config's `reward.kwargs` when it has an entry, or with no
arguments when all its parameters have defaults. Problems are reported with the reward's name before training starts.

The deadline and the float conversion live in shared.reward_calls (llmalign's GRPO `score` uses them too); they
are imported here so that `flowalign.rewards.plugins` keeps naming them.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from typing import Any, Callable

import torch

from shared.reward_calls import (RewardError, RewardTimeout, call_with_deadline, import_path_problem,  # noqa: F401
                                 scores_as_floats, with_deadline)

RewardFn = Callable[[torch.Tensor, list, list], Any]


def _is_factory(obj: Callable) -> bool:
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in parameters)


def load_reward(path: str, kwargs: dict | None = None, timeout_s: float | None = None) -> RewardFn:
    """Import 'module:name' and return the reward callable (calling the factory if it is one).
    With `timeout_s`, each call of the reward runs under that deadline (see `with_deadline`)."""
    problem = import_path_problem(path)
    if problem is not None:
        raise RewardError(f"reward {problem}")
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RewardError(f"reward '{path}': cannot import module '{module_name}' ({error}); check reward.weights") from None
    except Exception as error:  # the module itself raised while importing
        raise RewardError(f"reward '{path}': importing module '{module_name}' raised {type(error).__name__}: "
                          f"{error}") from None
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
        except Exception as error:  # the factory itself failed (a missing file, a bad value)
            raise RewardError(f"reward '{path}': its factory raised {type(error).__name__}: {error} "
                              f"(reward.kwargs {kwargs or {}})") from None
    try:
        inspect.signature(obj).bind(None, None, None)
    except TypeError:
        raise RewardError(f"reward '{path}': must accept (images, prompts, metadata); "
                          f"its signature is {inspect.signature(obj)}") from None
    except ValueError:
        pass  # builtins without a signature: checked when first called
    return with_deadline(obj, timeout_s)


def call_reward(name: str, fn: RewardFn, images: torch.Tensor, prompts: list[str], metadata: list[dict],
                allow_nonfinite: bool = False, drop_timeouts: bool | None = None) -> torch.Tensor:
    """Call one reward and check its output: one float per image, finite unless `allow_nonfinite`
    (then None/NaN/inf come back as NaN, for the caller to drop). A call past the reward's deadline
    (`load_reward(..., timeout_s)`) is a RewardError, or with `drop_timeouts` (default: `allow_nonfinite`)
    a batch of NaN, with a warning on stderr."""
    drop_timeouts = allow_nonfinite if drop_timeouts is None else drop_timeouts
    try:
        scores = fn(images, prompts, metadata)
    except RewardTimeout as error:
        message = f"reward '{name}' {error} (batch of {len(prompts)}, first prompt {prompts[0]!r})"
        if not drop_timeouts:
            raise RewardTimeout(f"{message}; raise reward.timeout_s or fix the reward") from None
        print(f"warning: {message}; its {len(prompts)} samples are dropped", file=sys.stderr, flush=True)
        return torch.full((len(prompts),), math.nan)  # [B] every sample dropped
    except Exception as error:
        raise RewardError(f"reward '{name}' raised {type(error).__name__}: {error} (batch of {len(prompts)}, "
                          f"first prompt {prompts[0]!r})") from error
    try:
        scores, missing = scores_as_floats(scores)  # [B]
    except ValueError as error:
        raise RewardError(f"reward '{name}' {error} (batch of {len(prompts)}, first prompt {prompts[0]!r}); "
                          "return one float (or None, dropped under reward.on_bad_score=drop) per image") from None
    if scores.numel() != len(prompts):
        raise RewardError(f"reward '{name}' returned {scores.numel()} scores for {len(prompts)} images; "
                          "return one score per image")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad and allow_nonfinite:
        return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, float("nan")))
    if bad:
        values = [None if i in missing else scores[i].item() for i in bad[:3]]
        raise RewardError(f"reward '{name}' returned non-finite scores at positions {bad[:10]} "
                          f"(prompts {[prompts[i] for i in bad[:3]]}); values {values}; fix the reward or set "
                          "reward.on_bad_score=drop to drop and count such samples")
    return scores


def check_rewards_on_dummy_batch(rewards: dict[str, RewardFn], images: torch.Tensor, prompts: list[str],
                                 allow_nonfinite: bool = False) -> None:
    """Run each reward once on a small batch so a broken reward fails before training, not after a rollout.
    A timeout here stops the run even under drop: a reward that never answers has nothing to drop."""
    for name, fn in rewards.items():
        call_reward(name, fn, images, prompts, [{} for _ in prompts], allow_nonfinite, drop_timeouts=False)

"""Loading and calling a user's reward, for both front ends: one loader, one error, a deadline on each call, and
its output as floats.

A config names a reward by import path 'module:name' with keyword arguments under `reward.kwargs` (both front
ends; llmalign also has builtin names). `load_callable` is the one factory rule: `name` is called with the kwargs
when there are any, when it is marked `is_reward_factory = True`, or when all its parameters have defaults; what
comes back (or `name` itself) must accept the front end's positional arguments. A reward that cannot be loaded,
does not return within `reward.timeout_s`, or returns something that is not numbers is a reward failure
(`RewardError`); each front end names the reward and stops the run (exit 3) or, under its drop policy, drops the
batch.

The two front ends call rewards with different arguments, so there is one alias per signature here:
`ImageRewardFn` (flowalign: images [B, 3, H, W] in [0, 1], prompts, metadata -> scores [B]) and `TextRewardFn`
(llmalign: prompts, completions, **columns -> list of floats or None).

A reward marked `groupwise = True` (the `groupwise` decorator, or the attribute set by its factory) sees one group
per call: the completions (or images) sampled for ONE prompt, and returns one score per member, so it can compare
them (a preference model's win rates, a ranking by pairwise wins). Both front ends call it through
`score_groups`, with the same arguments as a batch reward except that the prompt is one string:
llmalign `fn(prompt, completions, **columns)` (each column holds the group's values), flowalign
`fn(images [G, 3, H, W], prompt, metadata)`. The deadline applies to each group's call.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
import threading
from typing import Any, Callable

import numpy as np
import torch

from shared.config import import_path_problem


ImageRewardFn = Callable[[torch.Tensor, list, list], Any]  # flowalign: (images, prompts, metadata) -> [B]
TextRewardFn = Callable[..., list]  # llmalign: (prompts, completions, **columns) -> [B*G] floats or None


class RewardError(RuntimeError):
    """A reward misbehaved; the message names the reward and what it did."""


class RewardTimeout(RewardError):
    """A reward call did not return within its deadline; the call is left running in an abandoned thread."""


def _is_factory(obj: Callable) -> bool:
    """Marked `is_reward_factory = True`, or every parameter has a default (so it can be called with none)."""
    if getattr(obj, "is_reward_factory", False):
        return True
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: not a factory
        return False
    return all(
        p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters
    )


def import_reward(path: str) -> Any:
    """The object an import path 'module:name' names (`name` may be dotted: 'module:Class.method'); RewardError
    naming the path when it is not one or does not import."""
    problem = import_path_problem(path)
    if problem is not None:
        raise RewardError(f"reward {problem}")
    module_name, _, attribute = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as error:
        raise RewardError(
            f"reward '{path}': cannot import module '{module_name}' ({error}); check reward.weights"
        ) from None
    except Exception as error:  # the module itself raised while importing
        raise RewardError(
            f"reward '{path}': importing module '{module_name}' raised {type(error).__name__}: {error}"
        ) from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise RewardError(
                f"reward '{path}': module '{module_name}' has no '{attribute}'; check the name in reward.weights"
            )
        obj = getattr(obj, part)
    return obj


def build_callable(
    name: str, obj: Any, kwargs: dict | None, accepts: tuple[str, ...], keyword_columns: bool = False
) -> Callable:
    """The reward from `obj` by the one factory rule (see the module docstring), checked to accept `accepts`
    positionally: exactly those, or with `keyword_columns` (llmalign passes each data column by keyword, so a
    reward may require `answer`) those and any others by keyword. RewardError naming `name` when `obj` is not
    callable, the factory refuses `kwargs` or raises, or the reward's signature cannot take `accepts`."""
    if not callable(obj):
        raise RewardError(f"reward '{name}' is a {type(obj).__name__}, not a function")
    if kwargs or _is_factory(obj):  # given kwargs, marked, or nothing required: a factory that returns the reward
        try:
            obj = obj(**(kwargs or {}))
        except TypeError as error:
            raise RewardError(
                f"reward '{name}': calling it with reward.kwargs {kwargs or {}} failed ({error}); "
                "give the factory's arguments, or no kwargs for a reward function"
            ) from None
        except Exception as error:  # the factory itself failed (a missing file, a bad value)
            raise RewardError(
                f"reward '{name}': its factory raised {type(error).__name__}: {error} (reward.kwargs {kwargs or {}})"
            ) from None
        if not callable(obj):
            raise RewardError(f"reward '{name}': its factory returned a {type(obj).__name__}, not a function")
    try:
        signature = inspect.signature(obj)
        (signature.bind_partial if keyword_columns else signature.bind)(*(None for _ in accepts))
    except TypeError:
        raise RewardError(
            f"reward '{name}': must accept ({', '.join(accepts)}); its signature is {inspect.signature(obj)}"
        ) from None
    except ValueError:
        pass  # builtins without a signature: checked when first called
    return obj


def load_callable(path: str, kwargs: dict | None, accepts: tuple[str, ...], keyword_columns: bool = False) -> Callable:
    """Import 'module:name' and build the reward from it (`import_reward`, then `build_callable`)."""
    return build_callable(path, import_reward(path), kwargs, accepts, keyword_columns)


def call_with_deadline(
    fn: Callable, args: tuple = (), kwargs: dict | None = None, timeout_s: float | None = None
) -> Any:
    """fn(*args, **kwargs), or RewardTimeout when it has not returned within `timeout_s` seconds (None: no limit).

    The call runs in a daemon thread so that the caller can stop waiting. Python cannot kill a thread: a call
    that hangs is abandoned, still running and holding what it holds (a model, a lock, a socket), until it
    returns or the process exits; a later call starts a new thread beside it. The caller then stops the run
    (exit 3) or, under reward.on_bad_score=drop, drops the batch. torch's grad mode, inference mode and current
    CUDA device are per thread, so the caller's are set in the new thread."""
    kwargs = kwargs or {}
    if timeout_s is None:
        return fn(*args, **kwargs)
    outcome: dict[str, Any] = {}
    finished = threading.Event()
    grad_enabled, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    cuda_device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def run() -> None:
        try:
            if cuda_device is not None:
                torch.cuda.set_device(cuda_device)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad_enabled):
                outcome["value"] = fn(*args, **kwargs)
        except BaseException as error:  # handed to the waiting caller, raised there
            outcome["error"] = error
        finally:
            finished.set()

    threading.Thread(target=run, name=f"reward-call-{getattr(fn, '__name__', 'reward')}", daemon=True).start()
    if not finished.wait(timeout_s):
        raise RewardTimeout(
            f"did not return within reward.timeout_s={timeout_s:g} s; its thread is abandoned, still running"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def with_deadline(fn: Callable, timeout_s: float | None) -> Callable:
    """`fn` whose every call runs under `call_with_deadline(..., timeout_s)`; `fn` itself when timeout_s is None."""
    if timeout_s is None:
        return fn

    @functools.wraps(fn)
    def bounded(*args, **kwargs):
        return call_with_deadline(fn, args, kwargs, timeout_s)

    return bounded


def groupwise(fn: Callable) -> Callable:
    """Mark `fn` as a groupwise reward (see the module docstring): called once per group, one score per member."""
    fn.groupwise = True
    return fn


def is_groupwise(fn: Callable) -> bool:
    """Marked `groupwise = True` (kept through `with_deadline`, whose wrapper copies the function's attributes)."""
    return getattr(fn, "groupwise", False) is True


class GroupOutputError(ValueError):
    """A groupwise reward's output for one group is not one number (or None) per member."""


def score_groups(group_of: list[int], call_group: Callable[[list[int]], Any]) -> list:
    """A groupwise reward's scores of a batch whose item i belongs to group `group_of[i]`: `call_group(members)`
    calls the reward on the items `members` (their indices, in batch order) and returns what it returned; the
    scores come back at their items' places as floats, None where the reward gave None. A group's output that is
    not one number per member raises GroupOutputError saying so (the caller names the reward); what the reward
    itself raises passes through."""
    members: dict[int, list[int]] = {}
    for index, group in enumerate(group_of):
        members.setdefault(group, []).append(index)
    scores: list = [None] * len(group_of)
    for group, indices in members.items():
        output = call_group(indices)
        try:
            values, missing = scores_as_floats(output)  # [g] one group's
        except ValueError as error:
            raise GroupOutputError(f"{error} for group {group}") from None
        if values.numel() != len(indices):
            raise GroupOutputError(
                f"returned {values.numel()} scores for group {group} of {len(indices)}; a groupwise reward returns "
                "one score per member of the group it is given"
            )
        dropped = set(missing)
        for position, (index, value) in enumerate(zip(indices, values.tolist())):
            scores[index] = None if position in dropped else value
    return scores


def _as_float(value: Any, position: int) -> float:
    """One score as a Python float (None -> NaN); ValueError naming the position for anything else."""
    if value is None:
        return math.nan
    if (
        isinstance(value, (torch.Tensor, np.ndarray)) and value.size == 1
        if isinstance(value, np.ndarray)
        else (isinstance(value, torch.Tensor) and value.numel() == 1)
    ):
        value = value.item()
    if not isinstance(value, numbers.Real):
        shown = repr(value)
        raise ValueError(
            f"returned a {type(value).__name__} at position {position} "
            f"({shown[:40] + '...' if len(shown) > 40 else shown}), not a number"
        )
    try:
        return float(value)
    except OverflowError:
        digits = len(str(abs(int(value)))) if isinstance(value, numbers.Integral) else None
        size = f"an integer of {digits} digits" if digits else repr(value)[:40]
        raise ValueError(f"returned {size} at position {position}, too large for a float") from None


def scores_as_floats(values: Any) -> tuple[torch.Tensor, list[int]]:
    """A reward's output as float32 scores [B] and the positions that were None (NaN in the tensor).

    Accepted: a tensor or numpy array of numbers (flattened), a list/tuple of numbers, None or one-element
    tensors, or a single number. Anything else (None as the whole output, str, dict, an integer too large for a
    float, a complex or object array) raises ValueError saying what came back; the caller names the reward."""
    if isinstance(values, torch.Tensor):
        if values.is_complex():
            raise ValueError(f"returned a tensor of dtype {values.dtype}, not real numbers")
        return values.detach().to("cpu", torch.float32).flatten(), []  # [B]
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "biuf":
            raise ValueError(f"returned a numpy array of dtype {values.dtype}, not real numbers")
        return torch.from_numpy(values.astype(np.float32).reshape(-1)), []  # [B]
    if isinstance(values, (list, tuple)):
        floats = [_as_float(value, i) for i, value in enumerate(values)]
        missing = [i for i, value in enumerate(values) if value is None]
        return torch.tensor(floats, dtype=torch.float32), missing  # [B]; float64 beyond 3.4e38 -> inf, caught later
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        return torch.tensor([_as_float(values, 0)], dtype=torch.float32), []  # [1]
    if values is None:
        raise ValueError("returned None, not one score per image")
    shown = repr(values)
    raise ValueError(
        f"returned a {type(values).__name__} ({shown[:40] + '...' if len(shown) > 40 else shown}), "
        "not a list or tensor of numbers"
    )

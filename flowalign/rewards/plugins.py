"""Load rewards named by import path and call them with checks.

A reward is a callable `(images [B, 3, H, W] in [0, 1], prompts: list[str], metadata: list[dict])
-> scores [B]`. A config names it as 'module:name'; `name` is either the reward itself or a
factory that returns it: called with the config's `reward.kwargs` when it has an entry, or with no
arguments when all its parameters have defaults. Problems are reported with the reward's name before training starts.

`with_deadline` and `scores_as_floats` are used by both front ends (llmalign's GRPO `score` too): a reward
that does not return within `reward.timeout_s`, or returns something that is not numbers, is a reward failure.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
import sys
import threading
from typing import Any, Callable

import numpy as np
import torch

RewardFn = Callable[[torch.Tensor, list, list], Any]


class RewardError(RuntimeError):
    """A reward misbehaved; the message names the reward and what it did."""


class RewardTimeout(RewardError):
    """A reward call did not return within its deadline; the call is left running in an abandoned thread."""


def _is_factory(obj: Callable) -> bool:
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in parameters)


def import_path_problem(path: str) -> str | None:
    """Why `path` is not a 'package.module:name' import path (empty or relative module, no name), or None."""
    module_name, colon, attribute = path.partition(":")
    if not colon or not attribute:
        return f"{path!r} is not 'module:name'; e.g. flowalign.rewards:jpeg_compressibility"
    if not all(part.isidentifier() for part in module_name.split(".")):  # refuses '', '.', '.x', 'a..b'
        return (f"{path!r} has module name {module_name!r}, not an absolute dotted module name; "
                "write the full package path, e.g. my_pkg.rewards:brightness")
    return None


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


def call_with_deadline(fn: Callable, args: tuple = (), kwargs: dict | None = None,
                       timeout_s: float | None = None) -> Any:
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
        raise RewardTimeout(f"did not return within reward.timeout_s={timeout_s:g} s; its thread is abandoned, "
                            "still running")
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


def _as_float(value: Any, position: int) -> float:
    """One score as a Python float (None -> NaN); ValueError naming the position for anything else."""
    if value is None:
        return math.nan
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.size == 1 if isinstance(value, np.ndarray) else (
            isinstance(value, torch.Tensor) and value.numel() == 1):
        value = value.item()
    if not isinstance(value, numbers.Real):
        shown = repr(value)
        raise ValueError(f"returned a {type(value).__name__} at position {position} "
                         f"({shown[:40] + '...' if len(shown) > 40 else shown}), not a number")
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
    raise ValueError(f"returned a {type(values).__name__} ({shown[:40] + '...' if len(shown) > 40 else shown}), "
                     "not a list or tensor of numbers")


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

"""Multi-turn text environments and their rollout: what `algorithm.name: gigpo` and `episode_grpo` train on.

An environment is any object with

    reset(task: int) -> str                                  the first observation of the episode `task`
    step(action: str) -> (observation: str, reward: float, done: bool[, info: dict])

`task` is an integer drawn from (train.seed, iteration, group): the G trajectories of a group reset with the same
task, so they start from the same state (GiGPO's episode group). The observation is the whole prompt the policy
sees for its next turn (an environment that wants history writes it into the observation), and it is the anchor
state of that turn's step group: two turns of one group with equal observations share a step group. `info` may
carry "valid": False for an action the environment could not use (it then usually keeps its state), which
environment.invalid_penalty charges.

environment.name is an embedded environment (`ENVIRONMENTS`) or the import path 'module:Factory' of a callable
that returns a fresh environment, called with environment.kwargs, once per trajectory. What reset and step return
is checked on every call: a wrong type, or an exception raised by the factory, reset or step, is one line naming
the environment and the value (ConfigError, exit 2).

One training row per turn (`run_episodes`): the row's prompt is the turn's observation, its completion the
policy's action. The environment's tokens are all in prompts, so no loss ever falls on them, and each row's
completion is a plain completion for `llmalign.grpo.update`. This is GiGPO's batch layout (arXiv:2505.10978;
verl-agent trains one row per step, each with its anchor observation). The alternative, one row per episode with
the observations masked out of the loss, would let the policy read the whole history; here an environment that
wants the policy to see history writes it into the observation (which then also decides which states repeat).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import random
import re
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from llmalign.engines import HFEngine, RolloutEngine
from llmalign.evaluate import Rollout, derived_seed, pad_left
from shared.config import ConfigError, import_path_problem
from shared.run import Run


class Environment(Protocol):
    """A multi-turn text environment (see the module docstring)."""

    def reset(self, task: int) -> str: ...

    def step(self, action: str) -> tuple: ...


# ----------------------------------------------------------------------------- the embedded environment


ANSWER = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")


class ArithChain:
    """Carry a running total through `turns` computations, in the embedded arithmetic model's own prompt format.

    The task draws a start digit and `turns` pairs of operations. Each turn shows "Compute {total}{o1}{b}{o2}{c}.\\n"
    (what `embedded:arith` was supervised on, `llmalign.toy.make_problem`), and the number in the action's
    <answer>...</answer> becomes the total of the next turn, right or wrong. The episode ends after the last pair,
    with reward 1 when the final total is the true one, else 0. An action without an <answer> integer is invalid:
    the state stays and the turn is spent (so environment.max_turns should leave room for retries).

    States repeat, so GiGPO's step groups are not trivial: trajectories that got turn 1 right meet in the same
    observation at turn 2, and so does any two that made the same mistake. The operations are drawn so that the
    true running totals stay within 0..9, the model's operand range (a wrong total may leave it).
    """

    def __init__(self, turns: int = 3):
        if not isinstance(turns, int) or turns < 1:
            raise ConfigError(f"config field 'environment.kwargs': arith_chain turns={turns!r}; use an integer >= 1")
        self.turns = turns

    def reset(self, task: int) -> str:
        rng = random.Random(task)
        total = self.start = rng.randint(0, 9)
        self.pairs, self.truth = [], []
        for _ in range(self.turns):
            while True:  # two operations whose partial and final results stay within 0..9
                o1, b, o2, c = rng.choice("+-"), rng.randint(0, 9), rng.choice("+-"), rng.randint(0, 9)
                partial = total + b if o1 == "+" else total - b
                result = partial + c if o2 == "+" else partial - c
                if 0 <= partial <= 9 and 0 <= result <= 9:
                    break
            self.pairs.append(f"{o1}{b}{o2}{c}")
            self.truth.append(result)
            total = result
        self.turn, self.total = 0, self.start
        return self.observation()

    def observation(self) -> str:
        return f"Compute {self.total}{self.pairs[self.turn]}.\n"

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        found = ANSWER.search(action)
        if found is None:
            return self.observation(), 0.0, False, {"valid": False}
        self.total, self.turn = int(found.group(1)), self.turn + 1
        if self.turn == self.turns:
            return "", float(self.total == self.truth[-1]), True, {"valid": True}
        return self.observation(), 0.0, False, {"valid": True}


# environment.name -> the factory of an embedded environment
ENVIRONMENTS: dict[str, Callable[..., Environment]] = {"arith_chain": ArithChain}


def environment_factory(name: str, kwargs: dict | None = None) -> Callable[[], Environment]:
    """A callable that makes one fresh environment: an embedded one (`ENVIRONMENTS`) or the import path
    'module:Factory', called with `kwargs`. ConfigError naming environment.name when it does not resolve."""
    if name in ENVIRONMENTS:
        factory = ENVIRONMENTS[name]
    else:
        problem = import_path_problem(name)
        if problem is not None:
            raise ConfigError(
                f"config field 'environment.name': {problem}; or use an embedded one of {sorted(ENVIRONMENTS)}"
            )
        module_name, _, attribute = name.partition(":")
        try:
            factory = importlib.import_module(module_name)
            for part in attribute.split("."):
                factory = getattr(factory, part)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"config field 'environment.name': {name!r} does not load ({error})") from None
    if not callable(factory):
        raise ConfigError(f"config field 'environment.name': {name!r} is a {type(factory).__name__}, not callable")
    return lambda: _called(name, "the factory", factory, **(kwargs or {}))


def _called(name: str, what: str, fn: Callable, *args, **kwargs) -> Any:
    """fn(*args, **kwargs), an exception it raises (user code) as the one-line ConfigError naming the environment."""
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except Exception as error:
        shown = f" with environment.kwargs {kwargs}" if what == "the factory" else ""
        raise ConfigError(
            f"environment {name!r}: {what}{shown} raised {type(error).__name__}: {error}".splitlines()[0]
        ) from None


# ----------------------------------------------------------------------------- checked calls


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def checked_reset(name: str, env: Environment, task: int) -> str:
    observation = _called(name, "reset", env.reset, task)
    if not isinstance(observation, str):
        raise ConfigError(
            f"environment {name!r}: reset returned {type(observation).__name__} {_shown(observation)}; "
            "return the first observation as a str"
        )
    return observation


def checked_step(name: str, env: Environment, action: str) -> tuple[str, float, bool, bool]:
    """(observation, reward, done, valid) from env.step(action), or the one-line ConfigError naming the
    environment and what it returned."""
    out = _called(name, "step", env.step, action)
    usage = "return (observation: str, reward: float, done: bool) or with a 4th item, an info dict"
    if not isinstance(out, tuple) or len(out) not in (3, 4):
        raise ConfigError(f"environment {name!r}: step returned {type(out).__name__} {_shown(out)}; {usage}")
    observation, reward, done, info = (*out, {}) if len(out) == 3 else out
    problem = None
    if not isinstance(observation, str):
        problem = f"an observation of type {type(observation).__name__} {_shown(observation)}"
    elif isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        problem = f"reward {_shown(reward)}, not a finite number"
    elif not isinstance(done, bool):
        problem = f"done {_shown(done)}, not a bool"
    elif not isinstance(info, dict) or not isinstance(info.get("valid", True), bool):
        problem = f"info {_shown(info)}, not a dict whose 'valid' (if any) is a bool"
    if problem is not None:
        raise ConfigError(f"environment {name!r}: step returned {problem}; {usage}")
    return observation, float(reward), done, info.get("valid", True)


# ----------------------------------------------------------------------------- the multi-turn rollout


@dataclasses.dataclass
class StepRow:
    """One turn of one trajectory: the training row's bookkeeping (its tokens are in `Episodes.rollout`)."""

    group: int  # global episode group (task) index of the iteration
    traj: int  # global trajectory index: group * G + k
    turn: int
    anchor: str  # the observation the action answered
    reward: float
    valid: bool
    done: bool


@dataclasses.dataclass
class Episodes:
    """This rank's trajectories as step rows, in (group, trajectory, turn) order (each trajectory's rows in time
    order); rollout row i is steps[i]."""

    steps: list[StepRow]
    rollout: Rollout | None  # [n] one row per turn: prompt = observation, completion = action (None: no rows)
    generated: int  # completion tokens generated, EOS included


def task_id(seed: int, stream: int, group: int) -> int:
    """The task of global group `group` of iteration (or evaluation) `stream`: the same on every rank."""
    return derived_seed(seed, stream, group, 8) % 2**31


def stack_rows(parts: list[tuple[Rollout, int]], pad_id: int) -> Rollout:
    """One Rollout of the given rows of several rollouts: prompts re-padded on the left, completions on the right."""
    prompts = [r.prompt_ids[j][r.prompt_mask[j].bool()].tolist() for r, j in parts]
    prompt_ids, prompt_mask = pad_left(prompts, pad_id)  # [n, P]
    width = max(int(r.completion_mask[j].sum()) for r, j in parts)
    width = max(width, 1)
    ids = torch.full((len(parts), width), pad_id, dtype=torch.long)  # [n, C]
    mask = torch.zeros((len(parts), width), dtype=torch.long)  # [n, C]
    logprobs = None if any(r.sampling_logprobs is None for r, _ in parts) else torch.zeros((len(parts), width))
    for i, (r, j) in enumerate(parts):
        length = int(r.completion_mask[j].sum())
        ids[i, :length] = r.completion_ids[j, :length].cpu()
        mask[i, :length] = 1
        if logprobs is not None:
            logprobs[i, :length] = r.sampling_logprobs[j, :length].float().cpu()
    truncated = torch.tensor([bool(r.truncated[j]) for r, j in parts])  # [n]
    texts = [r.texts[j] for r, j in parts]
    return Rollout(prompt_ids, prompt_mask, ids, mask, truncated, texts, logprobs)


def _turn_calls(active: list[tuple[int, int]], batched: bool) -> list[list[tuple[int, int]]]:
    """The generate calls of a turn: every active (group, trajectory) in one call when `batched` (an engine with a
    seed per completion), else one call per group (HF: a call's sampling depends on the batch it is in, and a
    group's batch is the same whatever the world size)."""
    if batched:
        return [active]
    groups = sorted({g for g, _ in active})
    return [[(g, k) for g, k in active if g == group] for group in groups]


def run_episodes(
    run: Run,
    make: Callable[[], Environment],
    name: str,
    policy,
    tokenizer,
    groups: range,
    size: int,
    task_of: Callable[[int], int],
    seed_of: Callable[[int, int, int], int],
    sampling: dict,
    engine: RolloutEngine | None = None,
) -> Episodes:
    """This rank's trajectories of the global groups `groups`: `size` per task `task_of(group)`, played turn by
    turn, at most sampling["max_turns"] turns; each turn the active trajectories' observations are generated from
    (`_turn_calls`) and their actions stepped. Sampling is seeded per group and turn (HF: torch's seed
    `seed_of(group, -1, turn)` before each group's call; an engine: `seed_of(group, trajectory, turn)` per
    completion), never from the rank, so a trajectory is the same whatever the world size. `policy`: the plain
    model (`Run.unwrapped_for_generation`); `engine` generates instead when given. An environment that raises or
    returns a wrong type raises ConfigError on every rank together."""
    sampler = engine or HFEngine(policy, tokenizer)
    rows, parts, failure = [], [], None
    try:
        envs = {(g, k): make() for g in groups for k in range(size)}
        observations = {key: checked_reset(name, env, task_of(key[0])) for key, env in envs.items()}
        active = list(envs)
        for turn in range(sampling["max_turns"]):
            for call in _turn_calls(active, engine is not None) if active else []:
                rollout = _generate(sampler, tokenizer, [observations[key] for key in call], name, sampling, turn)(
                    seed_of(call[0][0], -1, turn), None if engine is None else [seed_of(g, k, turn) for g, k in call]
                )
                for j, (g, k) in enumerate(call):
                    observation, reward, done, valid = checked_step(name, envs[g, k], rollout.texts[j])
                    rows.append(StepRow(g, g * size + k, turn, observations[g, k], reward, valid, done))
                    parts.append((rollout, j))
                    observations[g, k] = None if done else observation
            active = [key for key in active if observations[key] is not None]
    except ConfigError as error:
        failure = str(error)
    failure = run.first_failure(failure)
    if failure is not None:
        raise ConfigError(failure)
    order = sorted(range(len(rows)), key=lambda i: (rows[i].group, rows[i].traj, rows[i].turn))
    rows, parts = [rows[i] for i in order], [parts[i] for i in order]  # each trajectory's rows in time order
    if not parts:  # no group on this rank (an evaluation of fewer tasks than processes)
        return Episodes(rows, None, 0)
    rollout = stack_rows(parts, tokenizer.pad_token_id)
    return Episodes(rows, rollout, int(rollout.lengths.sum()))


def _generate(sampler, tokenizer, observations: list[str], name: str, sampling: dict, turn: int):
    """A function of (torch seed, per-completion seeds) that generates one action per observation."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in observations]
    longest = max(len(x) for x in ids)
    if longest > sampling["max_prompt_length"]:
        raise ConfigError(
            f"config field 'data.max_prompt_length': environment {name!r} gave an observation of {longest} tokens "
            f"at turn {turn + 1}, over {sampling['max_prompt_length']}; raise it"
        )

    def generate(torch_seed: int, seeds: list[int] | None) -> Rollout:
        torch.manual_seed(torch_seed)  # HF samples from torch's global RNG
        return sampler.generate(
            ids,
            1,
            sampling["max_new_tokens"],
            temperature=sampling["temperature"],
            top_p=sampling["top_p"],
            greedy=sampling["greedy"],
            sampling_logprobs=not sampling["greedy"],
            seeds=seeds,
        )

    return generate


def episode_returns(steps: list[StepRow]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per step row [N]: group ids, trajectory ids, step rewards, the trajectory's total reward R, and valid flags."""
    group_ids = torch.tensor([s.group for s in steps], dtype=torch.long)  # [N]
    traj_ids = torch.tensor([s.traj for s in steps], dtype=torch.long)  # [N]
    rewards = torch.tensor([s.reward for s in steps], dtype=torch.float64)  # [N]
    totals = torch.zeros(int(traj_ids.max()) + 1 if steps else 0, dtype=torch.float64).index_add(0, traj_ids, rewards)
    valid = torch.tensor([s.valid for s in steps], dtype=torch.bool)  # [N]
    return group_ids, traj_ids, rewards, totals[traj_ids], valid

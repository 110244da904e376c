"""Samplers for flow-matching models: ODE and SDE steps with log-probs, MixGRPO's sliding window and
Flash solver, TempFlow-GRPO's trajectory branching and noise-aware weights.

Conventions (../shared/DESIGN.md): x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts
v = noise - x0, sampling runs sigma from ~1 down to 0 and dt = sigma_next - sigma < 0.
Samplers never see a model: they take `velocity_fn(latents [B, ...], sigma: float | Tensor[B]) -> v`
and the schedule `sigmas` [T + 1] (decreasing, last = 0) as a diffusers flow-matching scheduler makes it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, "float | Tensor"], Tensor]


def _per_sample(value: float | Tensor, like: Tensor) -> Tensor:
    """A float, 0-d or [B] value as a float32 tensor [B, 1, ..., 1] that broadcasts over `like`."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    return value.reshape(-1, *([1] * (like.ndim - 1)))  # [B, 1, 1, 1]


def euler_ode_step(latents: Tensor, velocity: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """Deterministic Euler step of the flow ODE: x' = x + v * (sigma_next - sigma)."""
    dt = _per_sample(sigma_next, latents) - _per_sample(sigma, latents)  # [B, 1, 1, 1]
    return (latents.float() + velocity.float() * dt).to(latents.dtype)


# ------------------------------------------------------------------------------- SDE steps
def _flow_grpo_mean_std(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float):
    """Flow-GRPO: sigma_t = a*sqrt(sigma/(1-sigma)); mean = x + v dt + sigma_t^2/(2 sigma) (x + (1-sigma) v) dt;
    std = sigma_t sqrt(-dt). At sigma = 1 the ratio uses sigma_next (sigma/(1-sigma) is infinite there)."""
    dt = sigma_next - sigma  # [B, 1, 1, 1]
    ratio_sigma = torch.where(sigma >= 1, sigma_next, sigma)
    sigma_t = noise_level * torch.sqrt(ratio_sigma / (1 - ratio_sigma))
    mean = x + v * dt + sigma_t**2 / (2 * sigma) * (x + (1 - sigma) * v) * dt
    return mean, sigma_t * torch.sqrt(-dt)


def _cps_mean_std(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float):
    """Coefficients-preserving sampling: std = sigma_next sin(a pi/2); x0_hat = x - sigma v;
    x1_hat = x + (1 - sigma) v; mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat."""
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x0_hat, x1_hat = x - sigma * v, x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0_hat + torch.sqrt((sigma_next**2 - std**2).clamp_min(0)) * x1_hat
    return mean, std


SDE_STEPS = {"flow_grpo": _flow_grpo_mean_std, "cps": _cps_mean_std}


def sde_step_with_logprob(latents: Tensor, velocity: Tensor, sigma: float | Tensor, sigma_next: float | Tensor,
                          noise_level: float = 0.7, kind: str = "flow_grpo", prev_sample: Tensor | None = None,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One stochastic step x' ~ N(mean, std^2): returns (next_latents, log_prob [B], mean, std).

    log_prob is the Gaussian log-density of x' averaged over the non-batch elements (as Flow-GRPO).
    prev_sample: score this given x' instead of drawing one (recomputing a recorded step under new
    weights); the gradient reaches log_prob through `mean`. Where std == 0 (noise_level 0, or CPS at
    sigma_next = 0) the step is deterministic: x' = mean and log_prob = 0, so a = 0 is the Euler step.
    Math runs in float32; next_latents come back in the latents' dtype.
    """
    if kind not in SDE_STEPS:
        raise ValueError(f"kind must be one of {sorted(SDE_STEPS)}, got {kind!r}")
    x, v = latents.float(), velocity.float()
    s, s_next = _per_sample(sigma, x), _per_sample(sigma_next, x)  # [B, 1, 1, 1]
    mean, std = SDE_STEPS[kind](x, v, s, s_next, noise_level)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).expand_as(s)  # [B, 1, 1, 1]
    stochastic = std > 0
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        sample = torch.where(stochastic, mean + std * noise, mean)
    else:
        sample = prev_sample.float()
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    log_density = -((sample.detach() - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - 0.5 * math.log(2 * math.pi)
    log_prob = torch.where(stochastic, log_density, torch.zeros_like(log_density)).mean(dim=tuple(range(1, x.ndim)))  # [B]
    return sample.to(latents.dtype), log_prob, mean, std


# ------------------------------------------------------------------- second-order ODE (Flash)
def _log_snr(sigma: float) -> float:
    return math.log((1 - sigma) / sigma)  # lambda = log(alpha / sigma) with alpha = 1 - sigma


def dpm_solver_2m_step(latents: Tensor, velocity: Tensor, sigma: float, sigma_next: float,
                       previous: tuple[Tensor, float] | None) -> Tensor:
    """DPM-Solver++(2M) on the data prediction x0 = x - sigma v (one NFE per step).

    h = lambda_next - lambda; D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev with r = h_prev / h;
    x' = (sigma_next / sigma) x - alpha_next (exp(-h) - 1) D. `previous` = (x0_prev, lambda_prev) or None
    for a first-order step; the step into sigma_next = 0 is first order (lambda is infinite there),
    and the first-order step equals the Euler step exactly.
    """
    x, x0 = latents.float(), latents.float() - sigma * velocity.float()
    if sigma >= 1:  # lambda = -inf at pure noise: take the (equivalent) first-order Euler step
        return euler_ode_step(latents, velocity, sigma, sigma_next)
    if sigma_next <= 0:
        return x0.to(latents.dtype)
    h = _log_snr(sigma_next) - _log_snr(sigma)
    data = x0
    if previous is not None:
        x0_prev, lambda_prev = previous
        r = (_log_snr(sigma) - lambda_prev) / h
        data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    out = (sigma_next / sigma) * x - (1 - sigma_next) * math.expm1(-h) * data
    return out.to(latents.dtype)


def compressed_sigmas(sigmas: Tensor, start_index: int, ratio: float) -> Tensor:
    """Keep sigmas[:start_index + 1]; replace the tail by max(1, round((T - start) * ratio)) steps placed at
    evenly spaced fractional indices of the original tail, so the schedule keeps its (shifted) shape."""
    num_steps = sigmas.numel() - 1
    tail_steps = num_steps - start_index
    if tail_steps <= 0:
        return sigmas.clone()
    count = max(1, round(tail_steps * ratio))
    positions = torch.linspace(start_index, num_steps, count + 1, dtype=torch.float64)
    low = positions.floor().long().clamp(max=num_steps - 1)
    frac = (positions - low).to(sigmas.dtype)
    tail = sigmas[low] + frac * (sigmas[low + 1] - sigmas[low])  # linear interpolation between neighbours
    return torch.cat([sigmas[:start_index], tail])


# ------------------------------------------------------------------------- trajectories
@dataclasses.dataclass
class Trajectory:
    latents: Tensor       # [T, B, ...] state before each step
    next_latents: Tensor  # [T, B, ...] state after each step
    log_probs: Tensor     # [T, B] log-prob of the SDE steps, 0 on ODE steps
    sde_steps: list[int]  # steps that used the SDE (the ones to train)
    sigmas: Tensor        # [T + 1] the schedule actually used (compressed after the window with Flash)
    final: Tensor         # [B, ...]
    nfe: int              # velocity evaluations (one per step; CFG's doubled batch counts as one)


def sample_trajectory(velocity_fn: VelocityFn, initial_latents: Tensor, sigmas: Tensor, sde_steps: list[int],
                      noise_level: float = 0.7, kind: str = "flow_grpo", generator: torch.Generator | None = None,
                      flash_ratio: float | None = None) -> Trajectory:
    """Integrate from sigmas[0] to 0: SDE with log-probs on `sde_steps`, Euler ODE elsewhere (MixGRPO's
    mixed sampling; all steps SDE = Flow-GRPO, none = ODE). flash_ratio (MixGRPO-Flash): the steps after
    the last SDE step run DPM-Solver++(2M) on a schedule compressed by this ratio."""
    num_steps = sigmas.numel() - 1
    sde = sorted(set(sde_steps))
    if sde and not (0 <= sde[0] and sde[-1] < num_steps):
        raise ValueError(f"sde_steps {sde} must lie in 0..{num_steps - 1} for a {num_steps}-step schedule")
    solver_start = num_steps
    if flash_ratio is not None:
        solver_start = sde[-1] + 1 if sde else 0
        sigmas = compressed_sigmas(sigmas, solver_start, flash_ratio)
        num_steps = sigmas.numel() - 1
    x = initial_latents
    states, nexts, log_probs = [], [], []
    previous = None  # (x0, lambda) of the last step, for the multistep solver
    for step in range(num_steps):
        sigma, sigma_next = float(sigmas[step]), float(sigmas[step + 1])
        v = velocity_fn(x, sigma)
        if step in sde:
            x_next, log_prob, _, _ = sde_step_with_logprob(x, v, sigma, sigma_next, noise_level, kind, generator=generator)
        elif step >= solver_start:
            x_next = dpm_solver_2m_step(x, v, sigma, sigma_next, previous)
            log_prob = torch.zeros(x.shape[0], device=x.device)
        else:
            x_next, log_prob = euler_ode_step(x, v, sigma, sigma_next), torch.zeros(x.shape[0], device=x.device)
        # the multistep solver extrapolates along a deterministic path: an SDE step breaks that path
        previous = (x.float() - sigma * v.float(), _log_snr(sigma)) if 0 < sigma < 1 and step not in sde else None
        states.append(x), nexts.append(x_next), log_probs.append(log_prob)
        x = x_next
    return Trajectory(torch.stack(states), torch.stack(nexts), torch.stack(log_probs), sde, sigmas, x, num_steps)


@dataclasses.dataclass
class SlidingWindow:
    """MixGRPO's window W(l) = {l, ..., l + w - 1} over `num_steps` trainable steps: SDE inside, ODE outside.
    progressive: l = min(floor(iteration / tau) * s, T - w); frozen: l = 0; random: l ~ U{0..T - w}."""

    num_steps: int
    window_size: int
    stride: int = 1
    shift_interval: int = 25
    mode: str = "progressive"

    def __post_init__(self):
        if not 1 <= self.window_size <= self.num_steps:
            raise ValueError(f"window_size {self.window_size} must be in 1..{self.num_steps} (the trainable steps)")
        if self.stride < 1 or self.shift_interval < 1:
            raise ValueError(f"stride ({self.stride}) and shift_interval ({self.shift_interval}) must be >= 1")
        if self.mode not in ("progressive", "frozen", "random"):
            raise ValueError(f"mode must be progressive, frozen or random, got {self.mode!r}")

    def start(self, iteration: int, generator: torch.Generator | None = None) -> int:
        last = self.num_steps - self.window_size
        if self.mode == "frozen":
            return 0
        if self.mode == "random":
            return int(torch.randint(0, last + 1, (1,), generator=generator))
        return min((iteration // self.shift_interval) * self.stride, last)

    def steps(self, iteration: int, generator: torch.Generator | None = None) -> list[int]:
        start = self.start(iteration, generator)
        return list(range(start, start + self.window_size))


# ------------------------------------------------------------------------------ TempFlow
@dataclasses.dataclass
class BranchRollout:
    """One row per branch sample; rows of branch step k are K tiles of the initial batch."""

    latents: Tensor        # [R, ...] state at the branch step (shared by the K branches)
    next_latents: Tensor   # [R, ...] the SDE sample drawn there
    log_probs: Tensor      # [R]
    final: Tensor          # [R, ...] after the ODE to sigma = 0
    prompt_index: Tensor   # [R] row of the initial batch each sample came from
    branch_step: Tensor    # [R] step k whose process reward this sample's final reward is
    nfe: int


def select_branch_steps(num_steps: int, mode: str = "all", subset: list[int] | None = None,
                        window: list[int] | None = None) -> list[int]:
    """Branch steps among 0..num_steps-2 (the last step lands on sigma = 0: nothing to branch).
    all: every one; subset: the given indices; window: the MixGRPO window's steps (the two compose)."""
    allowed = range(num_steps - 1)
    chosen = {"all": list(allowed), "subset": subset, "window": window}.get(mode, "unknown")
    if chosen == "unknown":
        raise ValueError(f"branch mode must be all, subset or window, got {mode!r}")
    if not chosen:
        raise ValueError(f"branch mode {mode!r} needs a non-empty {'subset' if mode == 'subset' else 'window'}")
    bad = [k for k in chosen if k not in allowed]
    if bad:
        raise ValueError(f"branch steps {bad} outside 0..{num_steps - 2}; the last step cannot branch")
    return sorted(set(chosen))


def branch_rollout(velocity_fn: VelocityFn, initial_latents: Tensor, sigmas: Tensor, branch_steps: list[int],
                   num_branches: int, noise_level: float = 0.7, kind: str = "flow_grpo",
                   generator: torch.Generator | None = None) -> BranchRollout:
    """TempFlow-GRPO branching: one ODE prefix; at each branch step k draw K SDE samples from the prefix
    state, then finish each with the ODE. velocity_fn receives batches of K whole tiles of the initial
    batch (row r is initial row r % B)."""
    batch, num_steps = initial_latents.shape[0], sigmas.numel() - 1
    prefix_states, prefix_velocities = [initial_latents], []
    x = initial_latents
    for step in range(max(branch_steps) + 1):  # the ODE prefix, computed once
        v = velocity_fn(x, float(sigmas[step]))
        prefix_velocities.append(v)
        x = euler_ode_step(x, v, sigmas[step], sigmas[step + 1])
        prefix_states.append(x)
    nfe = max(branch_steps) + 1
    rows = {name: [] for name in ("latents", "next_latents", "log_probs", "final", "prompt_index", "branch_step")}
    tile = lambda t: t.repeat(num_branches, *([1] * (t.ndim - 1)))  # noqa: E731  [K*B, ...]
    for k in branch_steps:
        state = tile(prefix_states[k])
        x, log_prob, _, _ = sde_step_with_logprob(state, tile(prefix_velocities[k]), float(sigmas[k]),
                                                  float(sigmas[k + 1]), noise_level, kind, generator=generator)
        rows["latents"].append(state), rows["next_latents"].append(x), rows["log_probs"].append(log_prob)
        for step in range(k + 1, num_steps):
            x = euler_ode_step(x, velocity_fn(x, float(sigmas[step])), sigmas[step], sigmas[step + 1])
        nfe += num_steps - k - 1
        rows["final"].append(x)
        rows["prompt_index"].append(torch.arange(batch).repeat(num_branches))
        rows["branch_step"].append(torch.full((batch * num_branches,), k, dtype=torch.long))
    return BranchRollout(**{name: torch.cat(values) for name, values in rows.items()}, nfe=nfe)


def branch_group_ids(prompt_index: Tensor, branch_step: Tensor, num_steps: int) -> Tensor:
    """One advantage group per (prompt, branch step): TempFlow normalises per prompt and per step."""
    return prompt_index * num_steps + branch_step  # [R]


def noise_aware_weights(sigmas: Tensor, steps: list[int], noise_level: float = 0.7, kind: str = "flow_grpo") -> Tensor:
    """TempFlow-GRPO: weight of step k proportional to its noise scale std_k (sigma_t sqrt(-dt) for Flow-GRPO),
    normalised to mean 1 over `steps`."""
    x = torch.zeros(len(steps), 1)
    sigma, sigma_next = sigmas[steps].float(), sigmas[[k + 1 for k in steps]].float()
    _, std = SDE_STEPS[kind](x, x, sigma[:, None], sigma_next[:, None], noise_level)
    std = torch.as_tensor(std, dtype=torch.float32).expand(len(steps), 1).flatten()  # [K]
    if not (std > 0).all():
        raise ValueError(f"steps {steps} include a step without noise (std 0); it cannot be weighted or trained")
    return std / std.mean()

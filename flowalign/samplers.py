"""Samplers for flow-matching models: ODE and SDE steps with log-probs, MixGRPO's sliding window and
Flash solver, TempFlow-GRPO's trajectory branching and noise-aware weights.

Conventions (those of diffusers' flow-matching schedulers): x_sigma = (1 - sigma) * x0 + sigma * noise,
the model predicts v = noise - x0, sampling runs sigma from ~1 down to 0 and dt = sigma_next - sigma < 0.
Samplers never see a model: they take `velocity_fn(latents [B, ...], sigma: float | Tensor[B]) -> v`
and the schedule `sigmas` [T + 1] (decreasing, last = 0) as a diffusers flow-matching scheduler makes it.
Latents are images [B, C, H, W] or videos [B, C, F, H, W] alike: every step is elementwise with a per-sample
sigma broadcast over the non-batch dims, and log-probs average over all of them (C*F*H*W for a video;
tests/test_video_frames.py). Shape comments below write the image case.

Randomness: every sampler takes `generator`, either a torch.Generator (one stream for the whole batch) or a
`SampleNoise` (one stream per sample, so a sample's noise does not depend on the batch or the process it is in).

Conventions where the official Flow-GRPO code (github.com/yifan123/flow_grpo,
flow_grpo/diffusers_patch/sd3_sde_with_logprob.py and scripts/train_sd3.py) and this project once differed
(`SDEConventions`, `KL_FORMS`, `NOISE_AWARE_NORMALIZATIONS`): the official form is the default and the other is
kept as an option. `convention_factors` computes, per step of a schedule, how far apart the two forms are; the
"Flow conventions" table in docs/conventions.md comes from it.

Public names: euler_ode_step, sde_step_with_logprob, SDE_STEPS, SDEConventions, OFFICIAL, LOG_PROBS, KL_FORMS,
kl_std, convention_factors, stream_seed, SampleNoise, standard_normal, dpm_solver_2m_step, compressed_sigmas,
Trajectory, sample_trajectory, SlidingWindow, select_branch_steps, BranchRollout, branch_rollout,
branch_group_ids, branch_advantages, NOISE_AWARE_NORMALIZATIONS, noise_aware_weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Callable

import torch
from torch import Tensor

from shared.advantages import group_advantages

VelocityFn = Callable[[Tensor, "float | Tensor"], Tensor]


# ------------------------------------------------------------------------------- helpers
def _math_dtype(latents: Tensor) -> torch.dtype:
    """float64 stays float64 (exact tests); half precision and float32 compute in float32."""
    return torch.float64 if latents.dtype == torch.float64 else torch.float32


def _per_sample(value: float | Tensor, like: Tensor) -> Tensor:
    """A float, 0-d or [B] value as a tensor [B, 1, ..., 1] that broadcasts over `like` [B, ...]."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    if value.shape != (like.shape[0],):
        raise ValueError(
            f"sigma must be a float, a 0-d tensor or a [B] = [{like.shape[0]}] tensor, got shape {tuple(value.shape)}"
        )
    return value.reshape(-1, *([1] * (like.ndim - 1)))  # [B, 1, 1, 1]


def _check_sigmas(sigmas: Tensor) -> int:
    """Return T for a schedule [T + 1]; it must be 1-D, in [0, 1] and strictly decreasing (dt < 0)."""
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        shape = tuple(sigmas.shape) if isinstance(sigmas, Tensor) else type(sigmas).__name__
        raise ValueError(
            f"sigmas must be a 1-D tensor [T + 1] with T >= 1, got {shape}; pass scheduler.sigmas (it ends with 0)"
        )
    # 1 + 1e-6: a float32 shifted schedule may start a rounding error above 1 (treated as 1 by the steps)
    if not bool((sigmas[1:] < sigmas[:-1]).all()) or float(sigmas[0]) > 1 + 1e-6 or float(sigmas[-1]) < 0:
        raise ValueError(f"sigmas must decrease strictly from <= 1 to >= 0 (dt < 0), got {sigmas.tolist()}")
    return sigmas.numel() - 1


# ------------------------------------------------------------------------------- noise
def stream_seed(*keys: int | str) -> int:
    """A 63-bit seed from a tuple of keys, e.g. (seed, iteration, global sample index): distinct tuples give
    unrelated torch streams (a hash, not an arithmetic combination that could make two tuples collide)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SampleNoise:
    """One Gaussian stream per sample. A draw of shape [R, ...] gives row r the next draw of stream r % n (n
    streams), row after row: a batch of n samples takes one draw from each, and TempFlow's K tiles of the batch
    take K draws from each, tile by tile. A sample's noise thus depends only on its own stream, not on which
    samples share its batch, its chunk or its process, which makes a rollout independent of the world size."""

    def __init__(self, generators: list[torch.Generator]):
        if not generators:
            raise ValueError("SampleNoise needs at least one generator (one per sample)")
        self.generators = list(generators)

    @classmethod
    def seeded(cls, seeds: list[int], device: str | torch.device = "cpu") -> SampleNoise:
        return cls([torch.Generator(device=device).manual_seed(seed) for seed in seeds])

    def __len__(self) -> int:
        return len(self.generators)

    def __getitem__(self, index: slice) -> SampleNoise:
        """The streams of a slice of the samples (the same generator objects: drawing advances them here too)."""
        return SampleNoise(self.generators[index])

    def randn(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        rows = shape[0]
        if rows % len(self):
            raise ValueError(
                f"a draw of {rows} rows does not tile {len(self)} sample streams; "
                "draw a multiple of the number of samples"
            )
        draws = [
            torch.randn(
                (1, *shape[1:]),
                generator=self.generators[r % len(self)],
                device=self.generators[r % len(self)].device,
                dtype=dtype,
            )
            for r in range(rows)
        ]
        return torch.cat(draws).to(device)  # [R, ...]


def standard_normal(
    shape: tuple[int, ...], generator: torch.Generator | SampleNoise | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """N(0, 1) noise of `shape` from a torch.Generator (or the global stream) or from per-sample streams."""
    if isinstance(generator, SampleNoise):
        return generator.randn(shape, device, dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def euler_ode_step(latents: Tensor, velocity: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """Deterministic Euler step of the flow ODE: x' = x + v * (sigma_next - sigma)."""
    x, v = latents.to(_math_dtype(latents)), velocity.to(_math_dtype(latents))
    dt = _per_sample(sigma_next, x) - _per_sample(sigma, x)  # [B, 1, 1, 1]
    return (x + v * dt).to(latents.dtype)


# ------------------------------------------------------------------------------- SDE steps
@dataclasses.dataclass(frozen=True)
class SDEConventions:
    """The two choices of an SDE step where this project's first form and the official Flow-GRPO code differ.
    The defaults are the official code's (`OFFICIAL`); docs/conventions.md "Flow conventions" gives the factors between them.

    sigma_one: sigma_t of the Flow-GRPO step from sigma = 1, where sigma / (1 - sigma) is infinite.
        "flow_grpo" (official): a * sqrt(1 / (1 - sigma_next)), the numerator kept at sigma = 1;
        "next_sigma" (ours before): a * sqrt(sigma_next / (1 - sigma_next)), the whole ratio at sigma_next
        (2% less noise on the SD3 10-step shift-3 schedule's first step: 0.686 vs 0.700).
    cps_log_prob: the log-prob of a CPS step.
        "flow_grpo" (official): -(x' - mean)^2 averaged over elements, constants dropped and not divided by
        2 std^2 (not a normalised density: the ratio exp(logp - logp_old) is that of a unit-variance Gaussian);
        "gaussian" (ours before): the full Gaussian log-density, whose log-ratio is the official one times
        1 / (2 std^2): 7900x on the last noisy step of the SD3 10-step shift-3 schedule (std 0.008 there), so
        a clip range of 1e-4 is reached there after a 7900x smaller change of the policy than under the official
        form, and that step's clipping or gradient dominates."""

    sigma_one: str = "flow_grpo"
    cps_log_prob: str = "flow_grpo"

    def __post_init__(self):
        if self.sigma_one not in ("flow_grpo", "next_sigma"):
            raise ValueError(f"sigma_one must be flow_grpo or next_sigma, got {self.sigma_one!r}")
        if self.cps_log_prob not in ("flow_grpo", "gaussian"):
            raise ValueError(f"cps_log_prob must be flow_grpo or gaussian, got {self.cps_log_prob!r}")


OFFICIAL = SDEConventions()


def _flow_grpo_mean_std(
    x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float, conventions: SDEConventions = OFFICIAL
):
    """Flow-GRPO SDE step (Liu et al. 2025, arXiv 2505.05470; the formula as the official sde_step_with_logprob):
    sigma_t = a*sqrt(sigma/(1-sigma));
    mean = x + v dt + sigma_t^2/(2 sigma) (x + (1-sigma) v) dt; std = sigma_t sqrt(-dt).
    At sigma = 1 the ratio is infinite: the official code divides by 1 - sigma_next there (sigma_one="flow_grpo"),
    our first form took sigma_next in numerator and denominator ("next_sigma").
    Note std > 0 on the last step too (sigma_next = 0, std = sigma_t sqrt(sigma)): only a = 0 makes it 0."""
    dt = sigma_next - sigma  # [B, 1, 1, 1]
    at_one = sigma >= 1
    denominator_sigma = torch.where(at_one, sigma_next, sigma)  # [B, 1, 1, 1]
    numerator_sigma = torch.where(at_one, sigma_next, sigma) if conventions.sigma_one == "next_sigma" else sigma
    sigma_t = noise_level * torch.sqrt(numerator_sigma / (1 - denominator_sigma))  # [B, 1, 1, 1]
    mean = x + v * dt + sigma_t**2 / (2 * sigma) * (x + (1 - sigma) * v) * dt  # [B, C, H, W]
    return mean, sigma_t * torch.sqrt(-dt)


def _cps_mean_std(
    x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float, conventions: SDEConventions = OFFICIAL
):
    """Coefficients-preserving sampling (Wang & Yu 2025, arXiv 2509.05952, as in the official Flow-GRPO code):
    std = sigma_next sin(a pi/2); x0_hat = x - sigma v; x1_hat = x + (1 - sigma) v;
    mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat.
    std = 0 on the last step (sigma_next = 0), where the step is x0_hat. Needs a <= 1: the mean's
    sqrt(sigma_next^2 - std^2) = sigma_next |cos(a pi/2)| is the coefficient-preserving one only for a in [0, 1]."""
    if noise_level > 1:
        raise ValueError(f"CPS needs noise_level in [0, 1] (a = 1 is the most noise it defines), got {noise_level}")
    std = sigma_next * math.sin(noise_level * math.pi / 2)  # [B, 1, 1, 1]
    x0_hat, x1_hat = x - sigma * v, x + (1 - sigma) * v  # [B, C, H, W]
    mean = (1 - sigma_next) * x0_hat + torch.sqrt((sigma_next**2 - std**2).clamp_min(0)) * x1_hat
    return mean, std


SDE_STEPS = {"flow_grpo": _flow_grpo_mean_std, "cps": _cps_mean_std}


def _gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Gaussian log-density per element: -(x' - mean)^2 / (2 std^2) - log std - log(2 pi) / 2. [B, ...]"""
    return -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)


def _squared_distance_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """The official code's CPS "log-prob": -(x' - mean)^2 per element, constants dropped and std ignored. [B, ...]"""
    return -((sample - mean) ** 2)


LOG_PROBS = {"gaussian": _gaussian_log_prob, "squared_distance": _squared_distance_log_prob}


def _log_prob_name(kind: str, conventions: SDEConventions) -> str:
    """The Flow-GRPO step always scores with the density (as the official code); CPS as `conventions` says."""
    return "squared_distance" if kind == "cps" and conventions.cps_log_prob == "flow_grpo" else "gaussian"


def sde_step_with_logprob(
    latents: Tensor,
    velocity: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float = 0.7,
    kind: str = "flow_grpo",
    prev_sample: Tensor | None = None,
    generator: torch.Generator | SampleNoise | None = None,
    conventions: SDEConventions = OFFICIAL,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One stochastic step x' ~ N(mean, std^2): returns (next_latents, log_prob [B], mean, std [B, 1, ...]).

    mean and std come from SDE_STEPS[kind] (formulas in its functions). log_prob is LOG_PROBS[...] averaged over
    the non-batch elements, as the official Flow-GRPO code averages over C*H*W:
    - kind flow_grpo: the Gaussian log-density mean_i [ -(x'_i - mean_i)^2 / (2 std^2) - log std - log(2 pi)/2 ]
      (as the official code);
    - kind cps: with conventions.cps_log_prob = "flow_grpo" (default, as the official code) mean_i -(x'_i - mean_i)^2,
      which is not a normalised density; with "gaussian" the density above (see SDEConventions for the factor).
    prev_sample: score this given x' instead of drawing one (recomputing a recorded step under new
    weights); the gradient reaches log_prob through `mean` only (x' is treated as data).
    Otherwise x' = mean + std * eps, eps drawn from `generator` (a torch.Generator, or a SampleNoise with one
    stream per sample: see standard_normal) and moved to latents' device.
    Where std == 0 (noise_level 0, or CPS at sigma_next = 0) the step is deterministic: x' = mean and
    log_prob = 0 (a point mass has no density; 0 makes the ratio exp(0 - 0) = 1, so such a step
    contributes no policy gradient). Thus a = 0 gives the Euler step.
    Math runs in float32 (float64 for float64 latents); x' is rounded to latents' dtype *before* it is
    scored, so the recorded old log-prob equals the one recomputed later from the stored x'.
    """
    if kind not in SDE_STEPS:
        raise ValueError(f"kind must be one of {sorted(SDE_STEPS)}, got {kind!r}")
    if not noise_level >= 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}; 0 gives the ODE step")
    dtype = _math_dtype(latents)
    x, v = latents.to(dtype), velocity.to(dtype)  # [B, C, H, W]
    s, s_next = _per_sample(sigma, x), _per_sample(sigma_next, x)  # [B, 1, 1, 1]
    mean, std = SDE_STEPS[kind](x, v, s, s_next, noise_level, conventions)
    std = torch.as_tensor(std, dtype=dtype, device=x.device).expand_as(s)  # [B, 1, 1, 1]
    stochastic = std > 0  # [B, 1, 1, 1]
    if prev_sample is None:
        noise = standard_normal(x.shape, generator, x.device, dtype)  # [B, C, H, W]
        sample = torch.where(stochastic, mean + std * noise, mean).to(latents.dtype)
    else:
        if prev_sample.shape != latents.shape:
            raise ValueError(
                f"prev_sample has shape {tuple(prev_sample.shape)}, latents {tuple(latents.shape)}; "
                "pass the recorded next_latents of this step"
            )
        sample = prev_sample
    safe_std = torch.where(stochastic, std, torch.ones_like(std))  # avoids 0/0 in the unused branch
    log_density = LOG_PROBS[_log_prob_name(kind, conventions)](
        sample.detach().to(dtype), mean, safe_std
    )  # [B, C, H, W]
    log_prob = torch.where(stochastic, log_density, torch.zeros_like(log_density)).mean(dim=tuple(range(1, x.ndim)))
    return sample, log_prob, mean, std  # log_prob [B]


def _exact_step_kl_std(std: Tensor, sigma: Tensor, sigma_next: Tensor, kind: str) -> Tensor:
    """The step's own std: ||mean - mean_ref||^2 / (2 std^2) is the exact KL between the two Gaussian steps."""
    return std


def _flow_grpo_kl_std(std: Tensor, sigma: Tensor, sigma_next: Tensor, kind: str) -> Tensor:
    """The std the official code's KL divides by (scripts/train_sd3.py: mean((mean - mean_ref)^2) / (2 std_dev_t^2)
    with std_dev_t as sde_step_with_logprob returns it): sigma_t = std / sqrt(-dt) for the Flow-GRPO step, so the
    KL is the exact one times -dt (1/25 to 1/3.7 on the SD3 10-step shift-3 schedule's noisy steps); CPS's
    std_dev_t is the step's std, so there the two forms agree."""
    if kind == "cps":
        return std
    dt = (sigma_next - sigma).reshape(-1, *([1] * (std.ndim - 1)))  # [B, 1, 1, 1]
    return std / torch.sqrt(-dt)


KL_FORMS = {"flow_grpo": _flow_grpo_kl_std, "exact_step": _exact_step_kl_std}


def kl_std(std: Tensor, sigma: Tensor, sigma_next: Tensor, kind: str = "flow_grpo", form: str = "flow_grpo") -> Tensor:
    """The std to pass to shared.kl.gaussian_mean_kl for the KL of one step to the reference under KL form `form`
    (KL_FORMS: flow_grpo = the official code's, default; exact_step = the exact one-step KL, ours before).
    std [B, 1, ...] as sde_step_with_logprob returns it; sigma, sigma_next [B]. Returns [B, 1, ...]."""
    if form not in KL_FORMS:
        raise ValueError(f"KL form must be one of {sorted(KL_FORMS)}, got {form!r}")
    return KL_FORMS[form](std, sigma.to(std.dtype), sigma_next.to(std.dtype), kind)


def convention_factors(sigmas: Tensor, noise_level: float = 0.7) -> dict[str, Tensor]:
    """Per step j of the schedule [T + 1], in float64, how far this project's earlier forms are from the official
    ones (the table in docs/conventions.md; tests/test_samplers.py checks the SD3 values):
    - cps_log_ratio: |log-ratio| of a CPS step under the Gaussian density over the official squared distance,
      1 / (2 std_j^2) (inf on the last step, where std = 0 and both are 0) [T];
    - kl_exact_over_flow_grpo: the exact one-step KL over the official KL for the Flow-GRPO step, 1 / (-dt_j) [T];
    - first_step_std: the Flow-GRPO step's std from sigma = 1 under (flow_grpo, next_sigma) [2]."""
    _check_sigmas(sigmas)
    sigma, sigma_next = sigmas[:-1].double()[:, None], sigmas[1:].double()[:, None]  # [T, 1]
    zeros = torch.zeros_like(sigma)
    _, cps_std = _cps_mean_std(zeros, zeros, sigma, sigma_next, noise_level)  # [T, 1]
    first = [
        float(
            _flow_grpo_mean_std(
                zeros[:1], zeros[:1], sigma[:1], sigma_next[:1], noise_level, SDEConventions(sigma_one=rule)
            )[1]
        )
        for rule in ("flow_grpo", "next_sigma")
    ]
    return {
        "cps_log_ratio": (1 / (2 * cps_std**2)).flatten(),
        "kl_exact_over_flow_grpo": (1 / (sigma - sigma_next)).flatten(),
        "first_step_std": torch.tensor(first, dtype=torch.float64),
    }


# ------------------------------------------------------------------- second-order ODE (Flash)
def _log_snr(sigma: float) -> float:
    return math.log((1 - sigma) / sigma)  # lambda = log(alpha / sigma) with alpha = 1 - sigma


def dpm_solver_2m_step(
    latents: Tensor, velocity: Tensor, sigma: float, sigma_next: float, previous: tuple[Tensor, float] | None
) -> Tensor:
    """DPM-Solver++(2M), midpoint form, on the data prediction x0 = x - sigma v: ONE velocity
    evaluation (NFE) per step, the second order coming from the previous step's x0.

    With lambda = log((1 - sigma) / sigma), h = lambda_next - lambda, r = (lambda - lambda_prev) / h:
        D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev
        x' = (sigma_next / sigma) x - (1 - sigma_next) (exp(-h) - 1) D.
    `previous` = (x0_prev, lambda_prev) of the previous deterministic step, or None for a first-order
    step (D = x0), which equals the Euler step exactly. Steps from sigma = 1 (lambda = -inf) are Euler
    steps; the step into sigma_next = 0 (lambda = +inf) returns x0, which is again the Euler step.
    sigma and sigma_next are scalars (floats or 0-d tensors): the whole batch shares the schedule.
    """
    sigma, sigma_next = float(sigma), float(sigma_next)
    dtype = _math_dtype(latents)
    x = latents.to(dtype)  # [B, C, H, W]
    x0 = x - sigma * velocity.to(dtype)  # [B, C, H, W]
    if sigma >= 1:  # lambda = -inf at pure noise: take the (equivalent) first-order Euler step
        return euler_ode_step(latents, velocity, sigma, sigma_next)
    if sigma_next <= 0:
        return x0.to(latents.dtype)
    h = _log_snr(sigma_next) - _log_snr(sigma)
    data = x0
    if previous is not None:
        x0_prev, lambda_prev = previous
        r = (_log_snr(sigma) - lambda_prev) / h
        data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev.to(dtype)  # linear extrapolation in lambda
    out = (sigma_next / sigma) * x - (1 - sigma_next) * math.expm1(-h) * data
    return out.to(latents.dtype)


def compressed_sigmas(sigmas: Tensor, start_index: int, ratio: float) -> Tensor:
    """MixGRPO-Flash schedule: keep sigmas[:start_index + 1]; replace the tail sigmas[start_index:] (T - start
    steps) by count = max(1, round((T - start) * ratio)) steps. The new points sit at evenly spaced fractional
    indices of the original tail (linear interpolation between neighbours), so the tail keeps the shape of
    the original (e.g. shifted) schedule rather than being uniform in sigma; it still ends at sigmas[-1].
    ratio = 1 returns the schedule unchanged. Returns [start_index + count + 1]."""
    num_steps = _check_sigmas(sigmas)
    if not 0 <= start_index <= num_steps:
        raise ValueError(f"start_index must be in 0..{num_steps} for a {num_steps}-step schedule, got {start_index}")
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0 (the fraction of tail steps kept, e.g. 0.4), got {ratio}")
    tail_steps = num_steps - start_index
    if tail_steps == 0:
        return sigmas.clone()
    count = max(1, round(tail_steps * ratio))
    positions = torch.linspace(start_index, num_steps, count + 1, dtype=torch.float64)  # [count + 1]
    low = positions.floor().long().clamp(max=num_steps - 1)
    frac = (positions - low).to(sigmas.dtype)
    tail = sigmas[low] + frac * (sigmas[low + 1] - sigmas[low])  # [count + 1]
    return torch.cat([sigmas[:start_index], tail])


# ------------------------------------------------------------------------- trajectories
@dataclasses.dataclass
class Trajectory:
    """One rollout. Everything the trainer needs to recompute the log-prob of SDE step j under new weights:
    latents[j], next_latents[j], sigmas[j], sigmas[j + 1] and the old log_probs[j] (see training_rows)."""

    latents: Tensor  # [T, B, ...] state before each step
    next_latents: Tensor  # [T, B, ...] state after each step
    log_probs: Tensor  # [T, B] log-prob of the SDE steps, 0 on ODE steps
    sde_steps: list[int]  # sorted steps that used the SDE (the ones to train)
    sigmas: Tensor  # [T + 1] the schedule actually used (compressed after the window with Flash)
    final: Tensor  # [B, ...]
    nfe: int  # velocity_fn calls (one per step; CFG's doubled batch counts as one)
    means: Tensor | None = None  # [T, B, ...] each step's mean (x' itself on ODE steps); kept when asked (GRPO-Guard)

    def training_rows(self, steps: list[int] | None = None) -> dict[str, Tensor]:
        """Flatten `steps` (default: sde_steps) step-major into rows: latents/next_latents [R, ...], sigma,
        sigma_next, log_prob, step, sample [R] with R = len(steps) * B."""
        steps = self.sde_steps if steps is None else steps
        not_sde = [j for j in steps if j not in self.sde_steps]
        if not_sde:
            raise ValueError(f"steps {not_sde} were ODE steps (sde_steps {self.sde_steps}); they have no log-prob")
        batch = self.final.shape[0]
        step = torch.tensor(steps, dtype=torch.long).repeat_interleave(batch)  # [R]
        sample = torch.arange(batch).repeat(len(steps))  # [R]
        return {
            "latents": self.latents[step, sample],
            "next_latents": self.next_latents[step, sample],
            "sigma": self.sigmas[step],
            "sigma_next": self.sigmas[step + 1],
            "log_prob": self.log_probs[step, sample],
            "step": step,
            "sample": sample,
            **({"mean": self.means[step, sample]} if self.means is not None else {}),
        }


def sample_trajectory(
    velocity_fn: VelocityFn,
    initial_latents: Tensor,
    sigmas: Tensor,
    sde_steps: list[int],
    noise_level: float = 0.7,
    kind: str = "flow_grpo",
    generator: torch.Generator | SampleNoise | None = None,
    flash_ratio: float | None = None,
    conventions: SDEConventions = OFFICIAL,
    keep_means: bool = False,
) -> Trajectory:
    """Integrate from sigmas[0] to sigmas[-1]: SDE with log-probs on `sde_steps`, Euler ODE elsewhere
    (MixGRPO's mixed sampling; all steps SDE = Flow-GRPO, none = plain ODE sampling).

    flash_ratio (MixGRPO-Flash): the steps after the last SDE step run DPM-Solver++(2M) (1 NFE per step)
    on a tail compressed to max(1, round(n_tail * flash_ratio)) steps (compressed_sigmas); the steps
    before and inside the window are unchanged (accelerating them hurts, per the paper). With no SDE
    steps the whole schedule is compressed. velocity_fn is called with a python float sigma. conventions: see
    SDEConventions. keep_means: also record each step's mean (the old policy's, for GRPO-Guard's RatioNorm).
    """
    num_steps = _check_sigmas(sigmas)
    sde = sorted(set(int(j) for j in sde_steps))
    if sde and not (0 <= sde[0] and sde[-1] < num_steps):
        raise ValueError(f"sde_steps {sde} must lie in 0..{num_steps - 1} for a {num_steps}-step schedule")
    solver_start = num_steps  # first step run by the second-order solver (none without Flash)
    if flash_ratio is not None:
        if not flash_ratio > 0:
            raise ValueError(f"flash_ratio must be > 0 (paper: 0.4 Flash, 0.2 Flash*), got {flash_ratio}")
        solver_start = sde[-1] + 1 if sde else 0
        sigmas = compressed_sigmas(sigmas, solver_start, flash_ratio)
        num_steps = sigmas.numel() - 1
    x = initial_latents
    zeros = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    states, nexts, log_probs, means = [], [], [], []
    previous = None  # (x0, lambda) of the last deterministic step, for the multistep solver
    for step in range(num_steps):
        sigma, sigma_next = float(sigmas[step]), float(sigmas[step + 1])
        v = velocity_fn(x, sigma)  # [B, C, H, W]
        log_prob = zeros
        if step in sde:
            x_next, log_prob, mean, _ = sde_step_with_logprob(
                x, v, sigma, sigma_next, noise_level, kind, generator=generator, conventions=conventions
            )
        elif step >= solver_start:
            x_next = dpm_solver_2m_step(x, v, sigma, sigma_next, previous)
        else:
            x_next = euler_ode_step(x, v, sigma, sigma_next)
        # the multistep solver extrapolates along a deterministic path: an SDE step breaks that path
        deterministic = 0 < sigma < 1 and step not in sde
        previous = (x.to(_math_dtype(x)) - sigma * v.to(_math_dtype(x)), _log_snr(sigma)) if deterministic else None
        states.append(x), nexts.append(x_next), log_probs.append(log_prob)
        if keep_means:
            means.append(mean if step in sde else x_next)
        x = x_next
    kept = torch.stack(means) if keep_means else None  # [T, B, ...]
    return Trajectory(torch.stack(states), torch.stack(nexts), torch.stack(log_probs), sde, sigmas, x, num_steps, kept)


@dataclasses.dataclass
class SlidingWindow:
    """MixGRPO's window W(l) = {l, ..., l + w - 1} over `num_steps` steps: SDE (and training) inside,
    ODE outside. progressive: l = min(floor(iteration / tau) * s, T - w); frozen: l = 0;
    random: l ~ U{0, ..., T - w} drawn from `generator`."""

    num_steps: int  # T: steps the window may cover (the recipe passes sampling steps - 1)
    window_size: int  # w (paper: 4)
    stride: int = 1  # s: how far the window moves at each shift
    shift_interval: int = 25  # tau: iterations between shifts
    mode: str = "progressive"

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 1 <= self.window_size <= self.num_steps:
            raise ValueError(f"window_size {self.window_size} must be in 1..{self.num_steps} (num_steps)")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.shift_interval < 1:
            raise ValueError(f"shift_interval must be >= 1 (iterations per shift), got {self.shift_interval}")
        if self.mode not in ("progressive", "frozen", "random"):
            raise ValueError(f"mode must be progressive, frozen or random, got {self.mode!r}")

    def start(self, iteration: int, generator: torch.Generator | None = None) -> int:
        last = self.num_steps - self.window_size
        if self.mode == "frozen":
            return 0
        if self.mode == "random":
            device = generator.device if generator is not None else "cpu"  # a CUDA generator draws on CUDA
            return int(torch.randint(0, last + 1, (1,), generator=generator, device=device))
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        return min((iteration // self.shift_interval) * self.stride, last)

    def steps(self, iteration: int, generator: torch.Generator | None = None) -> list[int]:
        start = self.start(iteration, generator)
        return list(range(start, start + self.window_size))


# ------------------------------------------------------------------------------ TempFlow
@dataclasses.dataclass
class BranchRollout:
    """One row per branch sample. Rows are ordered (branch step, branch, prompt): for each branch step k the
    K branches are K whole tiles of the initial batch, so row r of step k's block comes from prompt r % B."""

    latents: Tensor  # [R, ...] state at the branch step (the ODE prefix, shared by the K branches)
    next_latents: Tensor  # [R, ...] the SDE sample drawn there
    log_probs: Tensor  # [R] old log-prob of that SDE sample
    final: Tensor  # [R, ...] after the ODE from the SDE sample down to sigma = 0
    prompt_index: Tensor  # [R] row b of the initial batch the sample came from
    branch_step: Tensor  # [R] step k whose process reward this sample's final reward is
    branch_index: Tensor  # [R] which of the K branches (0..K-1)
    nfe: int  # velocity_fn calls (a call on K*B rows counts as one)


def select_branch_steps(
    num_steps: int, mode: str = "all", subset: list[int] | None = None, window: list[int] | None = None
) -> list[int]:
    """Sorted branch steps among 0..num_steps-2. The last step (into sigma = 0) is excluded: there is no ODE
    left to finish a branch with, with CPS it has no noise at all, and Flow-GRPO leaves it untrained.
    all: every allowed step; subset: the given indices; window: a SlidingWindow's steps at an iteration
    (this is how MixGRPO's window and TempFlow's branching compose)."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 to have a step to branch at, got {num_steps}")
    allowed = range(num_steps - 1)
    if mode not in ("all", "subset", "window"):
        raise ValueError(f"branch mode must be all, subset or window, got {mode!r}")
    chosen = {"all": list(allowed), "subset": subset, "window": window}[mode]
    if not chosen:
        raise ValueError(f"branch mode {mode!r} needs a non-empty {'subset' if mode == 'subset' else 'window'}")
    bad = [k for k in chosen if k not in allowed]
    if bad:
        raise ValueError(f"branch steps {bad} outside 0..{num_steps - 2}; the last step cannot branch")
    return sorted(set(chosen))


def branch_rollout(
    velocity_fn: VelocityFn,
    initial_latents: Tensor,
    sigmas: Tensor,
    branch_steps: list[int],
    num_branches: int,
    noise_level: float = 0.7,
    kind: str = "flow_grpo",
    generator: torch.Generator | SampleNoise | None = None,
    conventions: SDEConventions = OFFICIAL,
) -> BranchRollout:
    """TempFlow-GRPO branching: one Euler ODE prefix from sigmas[0] (computed once, up to the last branch
    step); at each branch step k draw K SDE samples from the prefix state x_k, then finish each with the
    Euler ODE. velocity_fn receives [B] batches on the prefix and [K*B] batches (K tiles of the initial
    batch: row r is initial row r % B) on the branches. With a SampleNoise of B streams, initial row b's stream
    draws every branch of that row, in the order (branch step, branch).
    NFE = (max k + 1) + sum_k (T - k - 1)."""
    num_steps = _check_sigmas(sigmas)
    if num_branches < 1:
        raise ValueError(f"num_branches must be >= 1 (TempFlow uses K >= 2 to form groups), got {num_branches}")
    branch_steps = select_branch_steps(num_steps, "subset", subset=list(branch_steps))
    batch = initial_latents.shape[0]
    prefix_states, prefix_velocities = [initial_latents], []
    x = initial_latents
    for step in range(branch_steps[-1] + 1):  # the ODE prefix, computed once
        v = velocity_fn(x, float(sigmas[step]))  # [B, C, H, W]
        prefix_velocities.append(v)
        x = euler_ode_step(x, v, float(sigmas[step]), float(sigmas[step + 1]))
        prefix_states.append(x)
    nfe = branch_steps[-1] + 1
    rows = {
        name: []
        for name in ("latents", "next_latents", "log_probs", "final", "prompt_index", "branch_step", "branch_index")
    }
    tile = lambda t: t.repeat(num_branches, *([1] * (t.ndim - 1)))  # [K*B, ...]
    for k in branch_steps:
        state = tile(prefix_states[k])  # [K*B, C, H, W]
        x, log_prob, _, _ = sde_step_with_logprob(
            state,
            tile(prefix_velocities[k]),
            float(sigmas[k]),
            float(sigmas[k + 1]),
            noise_level,
            kind,
            generator=generator,
            conventions=conventions,
        )
        rows["latents"].append(state), rows["next_latents"].append(x), rows["log_probs"].append(log_prob)
        for step in range(k + 1, num_steps):
            x = euler_ode_step(x, velocity_fn(x, float(sigmas[step])), float(sigmas[step]), float(sigmas[step + 1]))
        nfe += num_steps - k - 1
        rows["final"].append(x)
        rows["prompt_index"].append(torch.arange(batch).repeat(num_branches))
        rows["branch_step"].append(torch.full((batch * num_branches,), k, dtype=torch.long))
        rows["branch_index"].append(torch.arange(num_branches).repeat_interleave(batch))
    return BranchRollout(**{name: torch.cat(values) for name, values in rows.items()}, nfe=nfe)


def branch_group_ids(prompt_index: Tensor, branch_step: Tensor, num_steps: int) -> Tensor:
    """One advantage group per (prompt, branch step): id = prompt_index * num_steps + branch_step."""
    if bool((branch_step >= num_steps).any()) or bool((branch_step < 0).any()):
        raise ValueError(f"branch_step values must be in 0..{num_steps - 1} (num_steps), got {branch_step.tolist()}")
    return prompt_index * num_steps + branch_step  # [R]


def branch_advantages(rewards: Tensor, prompt_index: Tensor, branch_step: Tensor, eps: float = 1e-4) -> Tensor:
    """TempFlow-GRPO process advantages: the final reward of a branch is the reward of its branch step, and
    advantages are normalised within each (prompt, branch step) group of K branches:
    A = (r - mean_group r) / (std_group r + eps) (population std), via shared.advantages.group_advantages."""
    num_steps = int(branch_step.max()) + 1 if branch_step.numel() else 1
    return group_advantages(rewards, branch_group_ids(prompt_index, branch_step, num_steps), scale="group", eps=eps)


def _schedule_normalizer(std_of_step, num_steps: int, steps: list[int]) -> Tensor:
    """Mean std over the schedule's noisy steps 0..T-2 (every step a recipe may train; the last one, into sigma = 0,
    is never trained), the same whichever steps are trained this iteration."""
    return std_of_step(list(range(max(num_steps - 1, 1)))).mean()


def _trained_steps_normalizer(std_of_step, num_steps: int, steps: list[int]) -> Tensor:
    """Mean std over the steps trained this iteration (our first form)."""
    return std_of_step(steps).mean()


NOISE_AWARE_NORMALIZATIONS = {"schedule": _schedule_normalizer, "trained_steps": _trained_steps_normalizer}


def noise_aware_weights(
    sigmas: Tensor,
    steps: list[int],
    noise_level: float = 0.7,
    kind: str = "flow_grpo",
    normalization: str = "schedule",
    conventions: SDEConventions = OFFICIAL,
) -> Tensor:
    """TempFlow-GRPO noise-aware weights (He et al. 2025, arXiv 2508.04324): step k's policy loss is scaled by
    w_k = std_k / Z, std_k the step's noise scale (Flow-GRPO: sigma_t sqrt(-dt); CPS: sigma_next sin(a pi / 2)).
    Returns [len(steps)].

    Z (NOISE_AWARE_NORMALIZATIONS):
    - "schedule" (default): the mean std over the schedule's noisy steps 0..T-2, fixed for the run. The authors'
      released code (github.com/Shredded-Pork/TempFlow-GRPO, scripts/train_sd3_pr.py) multiplies each step's
      clipped loss by the constant 2.25 * std_k; on SD3's 10-step shift-3 schedule at a = 0.7, 1 / (mean std of
      steps 0..8) = 2.2522, so this normalisation reproduces their weights there and carries them to other
      schedules. (The paper's own text was not reachable from here; its released code is what this follows.)
    - "trained_steps" (our first form): the mean over `steps`, renormalised every iteration, so a step's weight
      changed with the other steps trained beside it (MixGRPO's window, train_fraction < 1, branch subsets).
    Both agree when every noisy step is trained (the shipped tempflow recipe). The trainer applies w_k after
    advantage clipping (w_k * clip(A)), as that code does: for w_k > 0 the clipped loss is linear in A."""
    num_steps = _check_sigmas(sigmas)
    if kind not in SDE_STEPS:
        raise ValueError(f"kind must be one of {sorted(SDE_STEPS)}, got {kind!r}")
    if normalization not in NOISE_AWARE_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {sorted(NOISE_AWARE_NORMALIZATIONS)}, got {normalization!r}")
    if not steps or any(not 0 <= k < num_steps for k in steps):
        raise ValueError(f"steps must be a non-empty list in 0..{num_steps - 1}, got {steps}")

    def std_of_step(chosen: list[int]) -> Tensor:  # [K]; the std does not depend on x or v
        sigma = sigmas[list(chosen)].double()[:, None]  # [K, 1]
        sigma_next = sigmas[[k + 1 for k in chosen]].double()[:, None]  # [K, 1]
        x = torch.zeros_like(sigma)
        _, std = SDE_STEPS[kind](x, x, sigma, sigma_next, noise_level, conventions)
        return torch.as_tensor(std, dtype=torch.float64).expand_as(sigma).flatten()

    std = std_of_step(steps)  # [K]
    if not bool((std > 0).all()):
        raise ValueError(
            f"steps {steps} include a step without noise (std 0, e.g. noise_level 0 or CPS's last "
            "step); it cannot be weighted or trained"
        )
    normalizer = NOISE_AWARE_NORMALIZATIONS[normalization](std_of_step, num_steps, steps)
    return (std / normalizer).to(sigmas.dtype if sigmas.is_floating_point() else torch.float32)


# ------------------------------------------------------------------------------ inversion
def renoise_inversion(velocity_fn: VelocityFn, clean: Tensor, t: Tensor, steps: int = 2, iterations: int = 3) -> Tensor:
    """ReNoise-style inversion of the Euler ODE: the latent x_t at noise level t [B] whose deterministic sampling
    path leads to `clean` [B, ...] (noise level 0), in `steps` equal steps 0 = s_0 < s_1 < ... < s_steps = t.

    The forward Euler step from s_k down to s_{k-1} is x_{k-1} = x_k + (s_{k-1} - s_k) v(x_k, s_k). Inverting it
    means solving x_k = x_{k-1} + (s_k - s_{k-1}) v(x_k, s_k) for x_k, an implicit equation: start from the
    explicit guess x_k = x_{k-1} + (s_k - s_{k-1}) v(x_{k-1}, s_{k-1}) (plain DDIM-style inversion) and apply
    the fixed-point map x_k <- x_{k-1} + (s_k - s_{k-1}) v(x_k, s_k) `iterations` times (ReNoise: Garibi et al.,
    2024, "ReNoise: Real Image Inversion Through Iterative Noising", arXiv 2403.14602). Where the map contracts
    (|dv/dx| (s_k - s_{k-1}) < 1), the forward Euler step from the result returns x_{k-1} up to the fixed point's
    remaining error. velocity_fn(x, sigma [B]) -> [B, ...]; t: [B] in (0, 1]. Calls: steps * (1 + iterations).

    Departures from the paper: neither the ReNoise paper's text nor SmPO-Diffusion's (arXiv 2506.02698) method
    section was reachable here, so this follows only the one-line description "a few fixed-point iterations of
    the inverted ODE step". From memory, and not checked here, ReNoise also averages the predictions of its later
    iterations and regularises the predicted noise; neither is done here. The steps are equal in sigma, per
    sample (each pair has its own t), on the flow ODE instead of the paper's DDIM schedule."""
    if t.shape != clean.shape[:1]:
        raise ValueError(f"t must be [B] = [{clean.shape[0]}], got {list(t.shape)}")
    if steps < 1 or iterations < 0:
        raise ValueError(f"steps must be >= 1 and iterations >= 0, got {steps} and {iterations}")
    x = clean.to(_math_dtype(clean))  # [B, ...]
    t = t.to(x.dtype)
    for k in range(1, steps + 1):
        sigma_prev, sigma = t * (k - 1) / steps, t * k / steps  # [B] each
        dt = _per_sample(sigma - sigma_prev, x)  # [B, 1, ..., 1] > 0: up the noise levels
        guess = x + dt * velocity_fn(x, sigma_prev).to(x.dtype)  # explicit step: [B, ...]
        for _ in range(iterations):
            guess = x + dt * velocity_fn(guess, sigma).to(x.dtype)  # the fixed-point map of the implicit step
        x = guess
    return x.to(clean.dtype)

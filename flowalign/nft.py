"""DiffusionNFT (Zheng et al., ICLR 2026, arXiv:2509.16117) in the flow recipe: `algorithm.name: diffusion_nft`.

Rollout: plain ODE sampling (no SDE, no log-probs) with the sampling ("old") policy swapped in; each final clean
latent x0 is noised by the forward process at int(algorithm.train_fraction x sampling.num_steps) of the schedule's
noise levels t (its own random subset; official 0.99: 9 of 10), x_t = (1 - t) x0 + t eps, and the old policy's
velocity at (x_t, t) is kept with the row. Reward and advantages are the recipe's (shared/). Update: the trained
velocity at (x_t, t) against v_old through shared.nft.diffusion_nft_loss, r = optimality_probability(A), plus
algorithm.kl_beta times the mean squared velocity gap to the LoRA-disabled reference. After each iteration the
recipe moves the old policy towards the trained one (shared.nft.old_policy_decay).

World-size invariance: a sample's noise-level subset and its eps are drawn from the sample's own stream (seeded
from (seed, iteration, global sample index)) after its ODE rollout, so they do not depend on the process count.
Departures from the official code (scripts/train_nft_sd3.py, read 2026-12-06): the rollout is Euler ODE, not its
second-order "dpm2" solver (the project's ODE sampler; the paper's point is that any solver works); the old
velocity is computed once at rollout time rather than per micro-batch (the same weights: the old policy does not
change within an iteration), and a sample whose reward is dropped (NaN) keeps advantage 0, so r = 1/2.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from flowalign import samplers
from flowalign.lora import reference_model
from flowalign.model import plain_transformer, velocity_fn_for
from shared.nft import diffusion_nft_loss, optimality_probability, velocity_gap
from shared.run import Run


@dataclasses.dataclass
class NFTRows:
    """One row per (sample, noise level): the forward-noised clean sample and the old policy's velocity there."""

    noised: torch.Tensor  # [R, C, h, w] x_t = (1 - t) x0 + t eps
    clean: torch.Tensor  # [R, C, h, w] x0, the rollout's final latent
    sigma: torch.Tensor  # [R] t, one of the schedule's noise levels
    old_velocity: torch.Tensor  # [R, C, h, w] the sampling policy's velocity at (x_t, t)
    advantage: torch.Tensor  # [R]
    prompt_index: torch.Tensor  # [R] index into this rank's prompts of the iteration
    step: torch.Tensor  # [R] which schedule noise level (sigmas[step])

    def rows(self, index: torch.Tensor) -> "NFTRows":
        return NFTRows(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def __len__(self) -> int:
        return self.sigma.numel()


def levels_per_sample(config) -> int:
    """How many of the schedule's noise levels each sample is trained at: int(train_fraction x T), as the
    official num_train_timesteps, at least 1."""
    return max(1, int(config.algorithm.train_fraction * config.sampling.num_steps))


@torch.no_grad()
def nft_chunk(config, adapter, embeds, noise, noise_source, sigmas, chunk_prompts):
    """ODE-sample one chunk with the weights in place (the old policy), then build its training rows.
    embeds: the chunk's per-sample prompt embeddings [c]; noise: [c, C, h, w]; noise_source: the c samples'
    streams. Returns (final latents [c, C, h, w], NFTRows [R], row_sample [R], nfe)."""
    s = config.sampling
    velocity_fn = velocity_fn_for(adapter, embeds, s.guidance_scale)
    trajectory = samplers.sample_trajectory(velocity_fn, noise, sigmas, [])  # all ODE steps: no randomness drawn
    clean = trajectory.final  # [c, C, h, w]
    count, levels = len(clean), levels_per_sample(config)
    keys = noise_source.randn((count, s.num_steps), clean.device, torch.float32)  # [c, T] row i from stream i
    chosen = keys.argsort(dim=1)[:, :levels].sort(dim=1).values.cpu()  # [c, K] each sample's random subset
    sample = torch.arange(count).repeat(levels)  # [R] level-major: row r belongs to sample r % c ...
    step = chosen.T.flatten()  # [R]
    eps = noise_source.randn((len(step), *clean.shape[1:]), clean.device, clean.dtype)  # ... and draws from its stream
    t = sigmas[step].to(clean.device, clean.dtype).view(-1, *([1] * (clean.ndim - 1)))  # [R, 1, 1, 1]
    noised = (1 - t) * clean[sample] + t * eps  # [R, C, h, w]
    old_velocity = torch.cat(
        [
            adapter.velocity(noised[rows], sigmas[step[rows]], embeds[sample[rows]], s.guidance_scale)
            for rows in torch.arange(len(step)).split(config.memory.micro_batch_size)
        ]
    )  # [R, C, h, w]
    rows = NFTRows(
        noised, clean[sample], sigmas[step], old_velocity, torch.zeros(len(step)), chunk_prompts[sample], step
    )
    nfe = trajectory.nfe + -(-len(step) // config.memory.micro_batch_size)
    return clean, rows, sample, nfe


def micro_batch_loss(config, run: Run, adapter, rows: NFTRows, embeds) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean DiffusionNFT loss of `rows` (plus algorithm.kl_beta times the velocity gap to the reference)."""
    s, a = config.sampling, config.algorithm
    step_embeds = embeds[rows.prompt_index]
    velocity = adapter.velocity(rows.noised, rows.sigma, step_embeds, s.guidance_scale)  # [m, C, h, w]
    optimality = optimality_probability(rows.advantage, a.advantage_clip)  # [m]
    per_row, metrics = diffusion_nft_loss(
        velocity,
        rows.old_velocity,
        rows.noised,
        rows.clean,
        rows.sigma,
        optimality,
        a.nft_beta,
        adaptive=a.nft_adaptive_weighting,
        scale=a.advantage_clip,  # the official code multiplies the loss by its advantage clip
    )  # [m]
    loss = per_row.mean()
    if a.kl_beta > 0:
        with torch.no_grad(), plain_transformer(run, adapter) as plain, reference_model(plain, config.model.lora):
            reference = adapter.velocity(rows.noised, rows.sigma, step_embeds, s.guidance_scale)  # [m, C, h, w]
        kl = velocity_gap(velocity, reference).mean()
        loss = loss + a.kl_beta * kl
        metrics["kl"] = kl.item()
    metrics["loss"] = loss.item()
    return loss, metrics


def update(config, run: Run, adapter, optimizer, params, embeds, batch: NFTRows, parts, total_rows: int) -> dict:
    """One optimizer step per part (flowalign/train.py's update_parts), micro-batched: each rank's share of a
    part's loss is its rows' summed loss over the part's GLOBAL row count, and every rank runs as many
    micro-batches as the busiest one (zero-weight fillers), as DDP/FSDP's collectives need. Metrics are
    row-weighted means over all ranks and parts."""
    size, model = config.memory.micro_batch_size, adapter.transformer
    counts = run.max(torch.tensor([-(-len(rows) // size) for rows, _ in parts])).long().tolist()  # [U]
    totals: dict[str, float] = {}
    grad_norms = []
    for (rows_of_part, part_rows), count in zip(parts, counts):
        optimizer.zero_grad(set_to_none=True)
        micros = list(rows_of_part.split(size))
        real = len(micros)
        micros += [torch.zeros(1, dtype=torch.long)] * (count - real)  # any row, weighted 0
        nonfinite = False
        for index, micro in enumerate(micros):
            share = len(micro) / part_rows if index < real else 0.0  # of the part's mean
            with run.sync_gradients(model, last=index == count - 1):
                loss, metrics = micro_batch_loss(config, run, adapter, batch.rows(micro), embeds)
                run.backward(loss * share)
            nonfinite |= not math.isfinite(metrics["loss"])
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + (value * len(micro) / total_rows if index < real else 0.0)
        if run.any(nonfinite):  # every rank stops together, before the step spoils the weights
            raise FloatingPointError("loss became non-finite; lower train.learning_rate or check the rewards")
        grad_norms.append(run.clip_grad_norm(model, params, config.train.max_grad_norm))
        optimizer.step()
    summed = run.sum(torch.tensor(list(totals.values()), dtype=torch.float64))  # [K] over ranks
    return {**dict(zip(totals, summed.tolist())), "grad_norm": sum(grad_norms) / len(grad_norms)}

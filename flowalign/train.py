"""Online RL for flow-matching image models: Flow-GRPO, MixGRPO (+Flash), TempFlow-GRPO and DiffusionNFT in one
recipe, each an entry of ALGORITHMS (its rollout chunk, its trained steps, its update).

    python flowalign/train.py --config configs/flow/flow_grpo.yaml [key=value ...] [--resume [--allow-config-change]]
    accelerate launch --multi_gpu --num_processes 2 flowalign/train.py --config configs/flow/flow_grpo.yaml
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml flowalign/train.py --config ...
    python flowalign/train.py --describe            # every config field, documented

Each iteration: rollout (SDE steps with log-probs) -> reward -> advantage (shared/) -> update
(clipped policy loss + KL to the LoRA-disabled reference, shared/) -> log -> checkpoint. DiffusionNFT
(flowalign/nft.py) samples by ODE with its old policy and trains on forward-noised final samples instead.

Several processes (shared/run.py owns the accelerator, the run directory and the collectives). Batch sizes are
global and a run does not depend on the number of processes:
- the iteration's prompt list is drawn alike on every rank; rank r samples its contiguous block of whole groups;
- each sample's initial noise and SDE noise come from its own stream, seeded from (seed, iteration, global sample
  index); iteration-level choices (prompts, trained steps, the MixGRPO window) come from one generator seeded
  from (seed, iteration), shared by all ranks;
- rewards and group ids are gathered before advantages, so group/batch statistics are those of the global batch;
- the update deals each prompt group's (sample, step) rows into the optimizer steps in equal shares, shuffled
  from (seed, iteration, global group index): the same split on any world size, with every rank making the same
  number of forward calls per optimizer step (as DDP's and FSDP's collectives require; a rank short of rows
  would add a zero-weight micro-batch).
Departure from the official code: ddpo-pytorch and the Flow-GRPO code built on it seed every process differently
(`set_seed(seed, device_specific=True)`) and shuffle each process's samples on their own, so their runs change
with the number of GPUs; here the same config gives the same run on 1 or N processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from flowalign import nft, plan, samplers
from flowalign.command import RecipeCommand, script_main
from flowalign.config import FlowGRPOConfig
from flowalign.data import draw_prompts, read_prompts
from flowalign.evaluation import evaluate_at, load_rewards, score
from flowalign.lora import EMA, reference_model
from flowalign.model import (
    check_image_size,
    check_rewards_first,
    load_policy,
    prompt_encoder,
    restore_policy,
    iteration_generator,
    load_adapter,
    plain_transformer,
    sample_noise,
    save_training_checkpoint,
    velocity_fn_for,
)
from flowalign.report import finish_run, format_eval
from flowalign.rewards.plugins import RewardError
from shared.advantages import clip_advantages, compose_rewards
from shared.kl import gaussian_mean_kl
from shared.guard import GUARD_LOSSES
from shared.losses import clipped_policy_loss
from shared.ratio_check import FLOW_COMPARED, METRIC as RATIO_METRIC, FirstUpdateRatioCheck, ratio_deviation
from shared.config import need
from shared.loop import Plan, open_run, run_loop
from shared.nft import old_policy_decay
from shared.reward_calls import is_groupwise
from shared.run import Run
from shared.stats import PromptStatTracker


@dataclasses.dataclass
class StepBatch:
    """One row per (sample, trained step): everything needed to recompute that step's log-prob."""

    latents: torch.Tensor  # [R, C, h, w] state before the step
    next_latents: torch.Tensor  # [R, C, h, w] sampled state after the step
    sigma: torch.Tensor  # [R]
    sigma_next: torch.Tensor  # [R]
    old_log_prob: torch.Tensor  # [R]
    advantage: torch.Tensor  # [R] (already multiplied by the noise-aware weight when that is on)
    prompt_index: torch.Tensor  # [R] index into this rank's prompts of the iteration
    step: torch.Tensor  # [R] index of the denoising step
    old_mean: torch.Tensor  # [R, C, h, w] the sampling policy's step mean (GRPO-Guard); [R, 0] when not kept

    def rows(self, index: torch.Tensor) -> "StepBatch":
        return StepBatch(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def __len__(self) -> int:
        return self.sigma.numel()


@dataclasses.dataclass
class Rollout:
    """This rank's samples of one iteration, with the global ids that make them world-size invariant."""

    final: torch.Tensor  # [N, C, h, w] final latents
    prompt_index: torch.Tensor  # [N] index into this rank's prompts
    sample_id: torch.Tensor  # [N] global sample index (reward metadata "sample"; update row keys)
    group_id: torch.Tensor  # [N] advantage group, global (the prompt's slot, and the branch step for tempflow)
    rows: StepBatch | nft.NFTRows  # [R] the (sample, step) rows to train, without advantages yet
    row_sample: torch.Tensor  # [R] which of the N samples each row belongs to
    trained_steps: list[int]  # the denoising steps trained this iteration (the same on every rank)
    nfe: int  # batched velocity evaluations

    @staticmethod
    def cat(chunks: list["Rollout"]) -> "Rollout":
        """One rollout from sequentially sampled chunks (row_sample shifted to index the joined samples)."""
        offsets = torch.tensor([0] + [len(c.final) for c in chunks[:-1]]).cumsum(0).tolist()  # first sample of each
        kind = type(chunks[0].rows)
        rows = kind(*(torch.cat([getattr(c.rows, f.name) for c in chunks]) for f in dataclasses.fields(kind)))
        return Rollout(
            torch.cat([c.final for c in chunks]),
            torch.cat([c.prompt_index for c in chunks]),
            torch.cat([c.sample_id for c in chunks]),
            torch.cat([c.group_id for c in chunks]),
            rows,
            torch.cat([c.row_sample + o for c, o in zip(chunks, offsets)]),
            chunks[0].trained_steps,
            sum(c.nfe for c in chunks),
        )


def sde_conventions(config: FlowGRPOConfig) -> samplers.SDEConventions:
    """The SDE step's conventions from the config (defaults: the official Flow-GRPO code's; docs/conventions.md)."""
    return samplers.SDEConventions(sigma_one=config.sampling.sigma_one, cps_log_prob=config.sampling.cps_log_prob)


def rescore_step(config: FlowGRPOConfig, rows, velocity: torch.Tensor):
    """The recorded step latents -> next_latents of `rows` scored under `velocity` (the policy's or the
    reference's): sde_step_with_logprob's (next_latents, log_prob [m], mean, std) with the config's SDE."""
    s = config.sampling
    return samplers.sde_step_with_logprob(
        rows.latents,
        velocity,
        rows.sigma,
        rows.sigma_next,
        noise_level=s.noise_level,
        kind=s.sde_kind,
        prev_sample=rows.next_latents,
        conventions=sde_conventions(config),
    )


# ----------------------------------------------------------------------------------- rollout
@torch.no_grad()
def rollout(
    config: FlowGRPOConfig,
    adapter,
    encode,
    prompts: list[str],
    first_slot: int,
    iteration: int,
    window,
    generator: torch.Generator,
    on_chunk=None,
) -> Rollout:
    """Sample this rank's `prompts` (global slots first_slot, first_slot + 1, ...) in `train.rollout_chunks`
    sequential batches. `on_chunk(final, prompt_index, sample_id)` runs after each chunk (scoring it while the
    next chunk samples). The steps to train come from the shared `generator`; the noise of every sample from its
    own stream (flow_grpo/mixgrpo: per sample; tempflow: per prompt, whose stream then draws every branch)."""
    s, a = config.sampling, config.algorithm
    sigmas = adapter.sigmas(s.num_steps, s.height, s.width)  # [T+1]
    embeds = encode(prompts)
    tempflow = a.name == "tempflow"
    groups = config.train.group_size if not tempflow else 1  # tempflow's groups are its branches
    prompt_index = torch.arange(len(prompts)).repeat_interleave(groups)  # [n]
    first_sample = first_slot * groups  # global index of this rank's first initial sample
    noise_source = sample_noise(
        adapter.device, config.train.seed, iteration, samples=range(first_sample, first_sample + len(prompt_index))
    )
    noise = adapter.initial_noise(len(prompt_index), noise_source.generators, s.height, s.width)  # [n, C, h, w]
    if s.same_noise_per_group:
        noise = noise[::groups].repeat_interleave(groups, dim=0)
    sde_steps, trained = rollout_steps(config, window, iteration, generator)
    parts = []
    for chunk in torch.arange(len(prompts)).tensor_split(min(config.train.rollout_chunks, len(prompts))):
        first, last = int(chunk[0]) * groups, (int(chunk[-1]) + 1) * groups  # this chunk's samples
        chunk_prompts = prompt_index[first:last]  # [c]
        part = ALGORITHMS[a.name].chunk(
            config,
            adapter,
            embeds,
            noise[first:last],
            noise_source[first:last],
            sigmas,
            (sde_steps, trained),
            chunk_prompts,
            first_slot,
            first_sample + torch.arange(first, last),
        )
        if on_chunk is not None:
            on_chunk(part.final, part.prompt_index, part.sample_id)
        parts.append(part)
    return Rollout.cat(parts)


def rollout_steps(config: FlowGRPOConfig, window, iteration: int, generator: torch.Generator):
    """(the SDE steps of the sampler, the steps trained) of the iteration, alike on every rank: the algorithm's
    `steps` (ALGORITHMS)."""
    return ALGORITHMS[config.algorithm.name].steps(config, window, iteration, generator)


def flow_grpo_steps(config: FlowGRPOConfig, window, iteration: int, generator: torch.Generator):
    """flow_grpo: SDE on every noisy step, a random train.train_fraction of them trained."""
    s, a = config.sampling, config.algorithm
    sde_steps = list(range(s.num_steps - 1))
    count = max(1, math.ceil(a.train_fraction * len(sde_steps)))
    return sde_steps, sorted(torch.randperm(len(sde_steps), generator=generator)[:count].tolist())


def mixgrpo_steps(config: FlowGRPOConfig, window, iteration: int, generator: torch.Generator):
    """mixgrpo: the sliding window's steps, all trained."""
    sde_steps = window.steps(iteration, generator)
    return sde_steps, sde_steps


def tempflow_steps(config: FlowGRPOConfig, window, iteration: int, generator: torch.Generator):
    """tempflow: its branch steps (the SDE steps are the branches': None)."""
    s, a = config.sampling, config.algorithm
    trained = samplers.select_branch_steps(
        s.num_steps,
        a.branch_steps,
        subset=a.branch_subset,
        window=window.steps(iteration, generator) if window else None,
    )
    return None, trained


def ode_steps(config: FlowGRPOConfig, window, iteration: int, generator: torch.Generator):
    """diffusion_nft: no SDE step; the noise levels trained are drawn per sample (flowalign/nft.py)."""
    return [], []


def trajectory_chunk(
    config, adapter, embeds, noise, noise_source, sigmas, steps, chunk_prompts, first_slot, sample_id
) -> Rollout:
    """flow_grpo / mixgrpo: one trajectory per sample (ODE steps outside the SDE steps), its trained steps as rows.
    steps: (SDE steps, trained steps); chunk_prompts [c]: each sample's prompt index; sample_id [c]: global sample
    indices."""
    s, a = config.sampling, config.algorithm
    sde_steps, trained = steps
    trajectory = samplers.sample_trajectory(
        velocity_fn_for(adapter, embeds[chunk_prompts], s.guidance_scale),
        noise,
        sigmas,
        sde_steps,
        noise_level=s.noise_level,
        kind=s.sde_kind,
        generator=noise_source,
        flash_ratio=a.flash_ratio if a.name == "mixgrpo" else None,
        conventions=sde_conventions(config),
        keep_means=a.guard,
    )
    row = trajectory.training_rows(trained)  # step-major rows of the trained SDE steps
    rows = StepBatch(
        row["latents"],
        row["next_latents"],
        row["sigma"],
        row["sigma_next"],
        row["log_prob"],
        torch.zeros(len(row["step"])),
        chunk_prompts[row["sample"]],
        row["step"],
        row.get("mean", torch.zeros(len(row["step"]), 0)),
    )
    group_id = first_slot + chunk_prompts  # [c] the global prompt slot
    return Rollout(trajectory.final, chunk_prompts, sample_id, group_id, rows, row["sample"], trained, trajectory.nfe)


def branch_chunk(config, adapter, embeds, noise, noise_source, sigmas, steps, chunk_prompts, first_slot, _) -> Rollout:
    """tempflow: per prompt, one ODE trunk branching at each trained step (steps: (None, trained)) into
    algorithm.num_branches SDE branches (samplers.branch_rollout); one row (and one final sample) per branch,
    grouped by (slot, branch step); the global sample ids are the branches' own."""
    s, a = config.sampling, config.algorithm
    trained = steps[1]
    step_position = torch.zeros(s.num_steps, dtype=torch.long)  # branch step -> its position in `trained`
    step_position[trained] = torch.arange(len(trained))
    tiled = lambda rows: embeds[chunk_prompts[torch.arange(rows) % len(chunk_prompts)]]
    branches = samplers.branch_rollout(
        lambda x, sigma: adapter.velocity(x, sigma, tiled(x.shape[0]), s.guidance_scale),
        noise,
        sigmas,
        trained,
        a.num_branches,
        noise_level=s.noise_level,
        kind=s.sde_kind,
        generator=noise_source,
        conventions=sde_conventions(config),
    )
    sample_prompt = chunk_prompts[branches.prompt_index]  # [r] one row per final sample
    slot = first_slot + sample_prompt  # [r]
    group_id = samplers.branch_group_ids(slot, branches.branch_step, s.num_steps)  # [r]
    # global index: (prompt slot, branch step, branch), contiguous over the global batch
    sample_id = (slot * len(trained) + step_position[branches.branch_step]) * a.num_branches + branches.branch_index
    rows = StepBatch(
        branches.latents,
        branches.next_latents,
        sigmas[branches.branch_step],
        sigmas[branches.branch_step + 1],
        branches.log_probs,
        torch.zeros(len(group_id)),
        sample_prompt,
        branches.branch_step,
        torch.zeros(len(group_id), 0),  # GRPO-Guard does not apply to tempflow (config refuses it)
    )
    return Rollout(
        branches.final, sample_prompt, sample_id, group_id, rows, torch.arange(len(group_id)), trained, branches.nfe
    )


def nft_rollout_chunk(
    config, adapter, embeds, noise, noise_source, sigmas, steps, chunk_prompts, first_slot, sample_id
):
    """diffusion_nft: ODE samples and their forward-noised rows (flowalign/nft.py), grouped by prompt slot."""
    final, rows, row_sample, nfe = nft.nft_chunk(
        config, adapter, embeds[chunk_prompts], noise, noise_source, sigmas, chunk_prompts
    )
    return Rollout(final, chunk_prompts, sample_id, first_slot + chunk_prompts, rows, row_sample, [], nfe)


# ------------------------------------------------------------------------------------ reward
def per_prompt_trackers(config: FlowGRPOConfig) -> dict[str, PromptStatTracker]:
    """algorithm.advantage_scale=per_prompt: one tracker for the weighted sum (sum_then_normalize) or one per reward
    (normalize_then_sum); {} for the other scales."""
    a = config.algorithm
    if a.advantage_scale != "per_prompt":
        return {}
    names = ["total"] if config.reward.composition == "sum_then_normalize" else list(config.reward.weights)
    return {
        name: PromptStatTracker(history=a.per_prompt_history > 0, history_size=a.per_prompt_history or None)
        for name in names
    }


def per_prompt_advantages(
    trackers: dict[str, PromptStatTracker],
    scores: dict[str, torch.Tensor],
    weights: dict[str, float],
    prompts: list[str],
    keep: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-GRPO's per-prompt advantages (Liu et al., 2025, arXiv:2505.05470; its code's PerPromptStatTracker):
    A = (r - mean_p) / (std_p + 1e-4), mean and population std over the rewards of the sample's prompt text,
    in the gathered batch and, with algorithm.per_prompt_history, its past iterations (shared.stats).

    scores: reward -> [N] over the gathered batch; prompts: the N samples' prompt texts; keep: [N] bool, the
    samples whose rewards enter the statistics (a dropped sample's do not; it gets advantage 0). With the
    tracker "total" the weighted sum is tracked, else each reward's advantages are weighted and summed (MixGRPO).
    Every rank calls this on the same gathered batch, so the trackers stay identical on every rank. Returns the
    advantages [N] and the trackers' num_prompts and mean_group_size (what the official code logs).
    Departures from the official code: it clears its tracker every epoch (= per_prompt_history 0 here), and its
    global_std option is algorithm.advantage_scale=batch here (mean per prompt slot, the batch's std)."""
    kept = keep.nonzero().flatten()  # [K]
    kept_prompts = [prompts[i] for i in kept.tolist()]
    dtype = next(iter(scores.values())).dtype
    advantages = torch.zeros(len(keep), dtype=torch.float64)  # [N]
    if not kept_prompts:
        return advantages.to(dtype), {}
    if "total" in trackers:
        total = sum(weights[name] * values.double()[kept] for name, values in scores.items())  # [K]
        advantages[kept] = trackers["total"].update(kept_prompts, total)
    else:
        advantages[kept] = sum(
            weights[name] * trackers[name].update(kept_prompts, values.double()[kept])
            for name, values in scores.items()
        )  # [K]
    stats = next(iter(trackers.values())).prompt_stats()  # every tracker holds the same prompts and counts
    for tracker in trackers.values():
        if not tracker.history:
            tracker.clear()  # as the official code after each epoch: nothing stale in the checkpoint
    return advantages.to(dtype), stats


# ------------------------------------------------------------------------------------ update
def update_parts(
    row_key: torch.Tensor, row_group: torch.Tensor, parts: int, seed: int, iteration: int
) -> list[torch.Tensor]:
    """Split this rank's rows into `parts` optimizer steps, the same way whatever the world size, with every rank
    holding as many rows of each step as the others (no idle forward passes).

    The unit is the prompt group, which never straddles ranks: each group's rows, ordered by their global key
    (sample * T + step), are shuffled by a generator seeded from (seed, iteration, global group index) and dealt
    into the parts in equal shares (the first len % parts parts take one more row). Every optimizer step thus sees
    a random share of every group's rows. Returns, per part, this rank's rows in it (indices into row_key), in
    global-key order."""
    assignment = torch.empty_like(row_key)  # [R] the part of each row
    for group in row_group.unique().tolist():
        rows = (row_group == group).nonzero().flatten()  # [n]
        rows = rows[row_key[rows].argsort()]  # global-key order: the same on any world size
        generator = torch.Generator().manual_seed(samplers.stream_seed("update", seed, iteration, group))
        shuffled = rows[torch.randperm(len(rows), generator=generator)]
        assignment[shuffled] = torch.arange(len(rows)) * parts // len(rows)
    result = []
    for part in range(parts):
        mine = (assignment == part).nonzero().flatten()  # [k]
        result.append(mine[row_key[mine].argsort()])
    return result


def step_policy_loss(a, rows: StepBatch, log_prob, mean, std):
    """The policy loss of a micro-batch of (sample, step) rows: Flow-GRPO's clipped loss on the per-step ratio, or
    with algorithm.guard GRPO-Guard's (shared.guard, averaging order algorithm.guard_average). Returns (loss,
    metrics, clipped [m]: each row's clipped share, 0/1, or the fraction of its elements for guard after_ratio)."""
    if a.guard:
        step_size = rows.sigma - rows.sigma_next  # [m] dt > 0
        loss, ratio, clipped = GUARD_LOSSES[a.guard_average](
            rows.next_latents, mean, rows.old_mean, std, step_size, rows.advantage, a.clip_range
        )  # ratio, clipped [m]
        low, high = clipped * (rows.advantage < 0), clipped * (rows.advantage > 0)  # [m] each
        metrics = {
            "clip_frac_low": low.mean().item(),
            "clip_frac_high": high.mean().item(),
            "clip_frac": clipped.mean().item(),
            "ratio_mean": ratio.mean().item(),
            "ratio_max": ratio.max().item(),
        }
        return loss, metrics, clipped
    loss, metrics = clipped_policy_loss(
        log_prob[:, None], rows.old_log_prob[:, None], rows.advantage, eps_low=a.clip_range, aggregation="grpo"
    )  # one "token" per step
    with torch.no_grad():
        ratio = (log_prob.detach() - rows.old_log_prob).exp()  # [m]
        # clipped as clipped_policy_loss counts it: the clip is active for the sign of A
        clipped = ((rows.advantage < 0) & (ratio < 1 - a.clip_range)) | (
            (rows.advantage > 0) & (ratio > 1 + a.clip_range)
        )  # [m]
    return loss, metrics, clipped


def update(
    config: FlowGRPOConfig,
    run: Run,
    adapter,
    optimizer,
    params,
    embeds,
    batch: StepBatch,
    parts: list[tuple[torch.Tensor, int]],
    total_rows: int,
) -> dict:
    """One optimizer step per part, micro-batched. Each rank's share of a part's loss is the sum of its rows'
    losses over the part's GLOBAL row count (Run.backward scales for DDP's averaging). Every rank runs the same
    number of micro-batches per part (the maximum over ranks); a rank short of rows runs zero-weight ones.

    Also returned: `clip_frac/step_k`, the fraction of step k's rows whose ratio was clipped (over all parts and
    ranks), and RATIO_METRIC, the largest |ratio - 1| of the first part: its log-probs are recomputed with the
    weights that sampled the rollout, so the ratio must be 1 there (shared.ratio_check)."""
    s, a, micro_batch_size = config.sampling, config.algorithm, config.memory.micro_batch_size
    model = adapter.transformer  # the DDP/FSDP wrapper: its forward and backward sync the gradients
    micro_counts = run.max(torch.tensor([-(-len(rows) // micro_batch_size) for rows, _ in parts]))  # [U]
    totals: dict[str, float] = {}  # this rank's rows' metrics, each weighted by its share of the global rows
    peaks: dict[str, float] = {}  # "*_max" metrics: the maximum over micro-batches, then over ranks
    clipped_of_step = torch.zeros(s.num_steps, dtype=torch.float64)  # [T] clipped rows per denoising step
    rows_of_step = torch.zeros(s.num_steps, dtype=torch.float64)  # [T] rows per denoising step
    first_part_deviation = torch.zeros((), dtype=torch.float64)
    grad_norms = []
    for part_index, ((rows_of_part, part_rows), micro_count) in enumerate(zip(parts, micro_counts.long().tolist())):
        optimizer.zero_grad(set_to_none=True)
        micros = list(rows_of_part.split(micro_batch_size))
        fillers = [torch.zeros(1, dtype=torch.long)] * (micro_count - len(micros))  # any row, weighted 0
        nonfinite = False
        for index, micro in enumerate(micros + fillers):
            real = index < len(micros)
            rows = batch.rows(micro)
            step_embeds = embeds[rows.prompt_index]
            with run.sync_gradients(model, last=index == micro_count - 1):
                velocity = adapter.velocity(rows.latents, rows.sigma, step_embeds, s.guidance_scale)  # [m, C, h, w]
                _, log_prob, mean, std = rescore_step(config, rows, velocity)
                loss, metrics, clipped = step_policy_loss(a, rows, log_prob, mean, std)
                if a.kl_beta > 0:
                    with (
                        torch.no_grad(),
                        plain_transformer(run, adapter) as plain,
                        reference_model(plain, config.model.lora),
                    ):
                        ref_velocity = adapter.velocity(rows.latents, rows.sigma, step_embeds, s.guidance_scale)
                        _, _, ref_mean, _ = rescore_step(config, rows, ref_velocity)
                    divisor = samplers.kl_std(std, rows.sigma, rows.sigma_next, s.sde_kind, a.kl_form)  # [m, 1, 1, 1]
                    kl = gaussian_mean_kl(mean, ref_mean, divisor.clamp_min(1e-8)).mean()
                    loss = loss + a.kl_beta * kl
                    metrics["kl"] = kl.item()
                weight = len(micro) / part_rows if real else 0.0  # this micro-batch's share of the part's mean
                run.backward(loss * weight)
            if real:
                with torch.no_grad():
                    clipped_of_step.index_add_(0, rows.step, clipped.double())
                    rows_of_step.index_add_(0, rows.step, torch.ones(len(micro), dtype=torch.float64))
                    if part_index == 0:  # no optimizer step yet this iteration: on-policy
                        first_part_deviation = torch.maximum(
                            first_part_deviation, ratio_deviation(log_prob, rows.old_log_prob)
                        )
            metrics["loss"] = loss.item()
            nonfinite |= not math.isfinite(metrics["loss"])
            for key, value in metrics.items():
                if key.endswith("_max"):
                    peaks[key] = max(peaks.get(key, -math.inf), value if real else -math.inf)
                else:
                    totals[key] = totals.get(key, 0.0) + (value * len(micro) / total_rows if real else 0.0)
        if run.any(nonfinite):  # every rank stops together, before the step spoils the weights
            raise FloatingPointError("loss became non-finite; lower train.learning_rate or check the rewards")
        grad_norms.append(
            run.clip_grad_norm(model, params, config.train.max_grad_norm)
        )  # of the synced gradient: alike on all ranks
        optimizer.step()
    summed = run.sum(torch.tensor(list(totals.values()), dtype=torch.float64))  # [K] over ranks
    peaked = run.max(torch.tensor([*peaks.values(), float(first_part_deviation)], dtype=torch.float64))  # [K' + 1]
    clipped_of_step, rows_of_step = run.sum(clipped_of_step), run.sum(rows_of_step)  # [T] each, over ranks
    per_step = {
        f"clip_frac/step_{k}": float(clipped_of_step[k] / rows_of_step[k])
        for k in range(s.num_steps)
        if rows_of_step[k] > 0
    }
    return {
        **dict(zip(totals, summed.tolist())),
        **dict(zip(peaks, peaked[:-1].tolist())),
        **per_step,
        RATIO_METRIC: float(peaked[-1]),
        "grad_norm": sum(grad_norms) / len(grad_norms),
    }


# --------------------------------------------------------------------------------- algorithms
@dataclasses.dataclass(frozen=True)
class FlowAlgorithm:
    """One entry of the flow algorithm map: what a config's algorithm.name changes in the recipe."""

    steps: Callable  # (config, window, iteration, generator) -> (SDE steps, trained steps), alike on every rank
    chunk: Callable  # (config, adapter, embeds, noise, noise_source, sigmas, steps, chunk_prompts, first_slot,
    #                   sample_id) -> Rollout of one chunk of this rank's prompts
    update: Callable  # (config, run, adapter, optimizer, params, embeds, rows, parts, total_rows) -> metrics
    old_policy: bool = False  # sample with a separate, slowly following copy of the trained weights (saved)


ALGORITHMS: dict[str, FlowAlgorithm] = {
    "flow_grpo": FlowAlgorithm(flow_grpo_steps, trajectory_chunk, update),
    "mixgrpo": FlowAlgorithm(mixgrpo_steps, trajectory_chunk, update),
    "tempflow": FlowAlgorithm(tempflow_steps, branch_chunk, update),
    "diffusion_nft": FlowAlgorithm(ode_steps, nft_rollout_chunk, nft.update, old_policy=True),
}


# -------------------------------------------------------------------------------------- main
@dataclasses.dataclass
class Iteration:
    """One iteration's batch as it passes through the stages (rollout -> reward -> advantage -> update)."""

    index: int  # 0-based iteration
    prompts: list[str]  # the global prompt list, alike on every rank
    first_slot: int  # global slot of this rank's first prompt
    local_prompts: list[str]  # this rank's block of `prompts`
    sampled: Rollout
    jobs: list[Future]  # the reward scores of each rollout chunk, scored while the next chunk sampled
    reward_seconds: float  # decode + scoring time spent on the main thread during the rollout
    timings: dict[str, float]
    scores: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # reward -> [N], the global batch
    group_ids: torch.Tensor | None = None  # [N]
    bad_sample: torch.Tensor | None = None  # [N] a reward gave NaN/inf: dropped
    reward_stats: dict = dataclasses.field(default_factory=dict)
    total_rows: int = 0  # (sample, step) rows trained, over all ranks


class FlowGRPORecipe:
    """Flow-GRPO / MixGRPO / TempFlow-GRPO / DiffusionNFT as the stages of shared.loop.run_loop."""

    def __init__(self, config: FlowGRPOConfig, train_prompts: list[str], eval_prompts: list[str]):
        self.config, self.train_prompts, self.eval_prompts = config, train_prompts, eval_prompts

    def setup(self, run: Run) -> Plan:
        """Model, trainable parameters, optimizer, rewards, prompt embeddings; the checkpoint restored."""
        config, t, s, a = self.config, self.config.train, self.config.sampling, self.config.algorithm
        self.run = run
        run.require_divisible(t.prompts_per_iteration, "train.prompts_per_iteration", "prompts")  # before the model
        self.adapter, self.params, self.optimizer, _ = load_policy(config, run, load_adapter)
        self.ema = EMA(self.params, t.ema_decay) if t.ema_decay else None
        self.algorithm = ALGORITHMS[a.name]
        self.old = EMA(self.params, 0.0) if self.algorithm.old_policy else None  # the sampling policy, if separate
        self.rewards, eval_rewards = load_rewards(config)
        grouped = [name for name, fn in self.rewards.items() if is_groupwise(fn)]
        need(
            a.name != "tempflow" or not grouped,
            "reward.weights",
            f"{grouped[:1]} is groupwise (it compares the images of one prompt), but tempflow scores the branches of "
            "each step apart; use flow_grpo or mixgrpo, or a reward that scores each image alone",
        )
        self.all_rewards = {**self.rewards, **eval_rewards}
        self.trackers = per_prompt_trackers(config)
        self.window = None
        if a.name == "mixgrpo" or a.branch_steps == "window":
            self.window = samplers.SlidingWindow(
                num_steps=s.num_steps - 1,
                window_size=a.window_size,
                stride=a.window_stride,
                shift_interval=a.window_interval,
                mode=a.window_mode,
            )
        prompts = self.train_prompts + self.eval_prompts
        too_long = self.adapter.prompts_over_context(prompts)
        if too_long:  # the text encoders truncate them: say so once, with a count
            run.print(
                f"warning: {len(too_long)} prompt(s) exceed the text encoder's context and are truncated, "
                f"e.g. {too_long[0][:80]!r}"
            )
        self.encode = prompt_encoder(config, self.adapter, prompts)
        per_prompt = t.group_size if a.name != "tempflow" else a.num_branches
        self.samples_per_iteration = t.prompts_per_iteration * per_prompt
        run.print(
            f"{a.name}: {t.prompts_per_iteration} prompts x {per_prompt} samples = {self.samples_per_iteration} per "
            f"iteration over {run.world} process(es) ({t.prompts_per_iteration // run.world} prompts each); "
            f"{s.num_steps} steps; {sum(p.numel() for p in self.params):,} trainable parameters; mixed precision "
            f"{run.accelerator.mixed_precision}; output {run.out}"
        )
        start = run.restore()
        if run.checkpoint is not None:
            self.restore()
        run.write_config(config)
        check_rewards_first(config, self.adapter, self.all_rewards, self.train_prompts)
        # async: one worker thread scores while the main thread samples; sync: the same calls, run on submit
        self.scorer = ThreadPoolExecutor(max_workers=1) if config.train.async_scoring else _InlineExecutor()
        self.ratio_check = FirstUpdateRatioCheck(
            FLOW_COMPARED
        )  # warns once per run (per resumed run) when the ratio is off 1
        curves = ["reward/total/mean", *[f"eval/{name}" for name in self.all_rewards], "train/kl", "train/clip_frac"]
        title = f"{a.name} on {config.model.path}"
        return Plan(start, t.iterations, a.name, config.budget.max_seconds, curves=tuple(curves), title=title)

    def restore(self) -> None:
        run = self.run
        restore_policy(run, self.adapter, self.optimizer)
        if self.ema is not None:
            self.ema.shadow = [x.to(run.device) for x in run.load("ema")]
        if self.old is not None:
            self.old.shadow = [x.to(run.device) for x in run.load("old_policy")]
        if self.trackers and (run.checkpoint / "stat_tracker.json").is_file():
            for name, state in run.load("stat_tracker").items():
                if name in self.trackers:  # rewards alone: a per_prompt_history changed on resume applies to them
                    self.trackers[name].load_state_dict({"rewards": state["rewards"]})

    def rollout(self, iteration: int) -> Iteration:
        """Every rank draws the same global prompt list and samples its own block of whole groups; each chunk is
        decoded and handed to the scorer as soon as it is sampled."""
        config, run, t = self.config, self.run, self.config.train
        generator = iteration_generator(t.seed, iteration)  # shared by all ranks
        clock = time.perf_counter()
        prompts = draw_prompts(self.train_prompts, t.prompts_per_iteration, generator)
        block = run.block(len(prompts))
        batch = Iteration(iteration, prompts, block.start, prompts[block.start : block.stop], None, [], 0.0, {})
        with plain_transformer(run, self.adapter), self.old.swapped_in() if self.old else contextlib.nullcontext():
            batch.sampled = rollout(
                config,
                self.adapter,
                self.encode,
                batch.local_prompts,
                block.start,
                iteration,
                self.window,
                generator,
                on_chunk=lambda *chunk: self.score_chunk(batch, *chunk),
            )
        batch.timings["time/rollout"] = time.perf_counter() - clock - batch.reward_seconds
        return batch

    def score_chunk(self, batch: Iteration, final: torch.Tensor, prompt_index: torch.Tensor, sample_id: torch.Tensor):
        """Decode a rollout chunk and submit its scoring (async: overlaps the next chunk's sampling)."""
        started = time.perf_counter()
        images = self.adapter.decode(final)  # [c, 3, H, W]
        texts = [batch.local_prompts[i] for i in prompt_index.tolist()]
        metadata = [{"split": "train", "iteration": batch.index + 1, "sample": i} for i in sample_id.tolist()]
        drop_bad = self.config.reward.on_bad_score == "drop"
        groups = prompt_index.tolist()  # a chunk holds whole groups (chunks split the prompts)
        batch.jobs.append(self.scorer.submit(score, self.rewards, images, texts, metadata, drop_bad, groups))
        batch.reward_seconds += time.perf_counter() - started

    def reward(self, batch: Iteration) -> Iteration:
        """The chunks' scores, gathered in rank order, so the advantages see the global batch."""
        run = self.run
        clock = time.perf_counter()
        chunk_scores, failure = [], None
        try:
            chunk_scores = [job.result() for job in batch.jobs]  # re-raises a reward's error here
        except RewardError as error:
            failure = error
        run.raise_together(failure, RewardError)  # every rank stops together, with the failing rank's message
        batch.scores = {
            name: run.gather(torch.cat([chunk[name] for chunk in chunk_scores])) for name in self.rewards
        }  # [N] each
        batch.group_ids = run.gather(batch.sampled.group_id)  # [N]
        batch.bad_sample = torch.stack(list(batch.scores.values())).isnan().any(dim=0)  # [N] a reward gave NaN/inf
        batch.timings["time/reward"] = batch.reward_seconds + time.perf_counter() - clock  # decode + not overlapped
        return batch

    def advantage(self, batch: Iteration) -> Iteration:
        """Group (or per-prompt) advantages of the global batch, this rank's rows' share; dropped samples (NaN
        rewards) are masked out of the statistics and get advantage 0."""
        config, s, a = self.config, self.config.sampling, self.config.algorithm
        by_prompt = a.advantage_scale == "per_prompt"  # advantages from the per-prompt trackers below
        advantages, reward_stats = compose_rewards(
            batch.scores,
            config.reward.weights,
            batch.group_ids,
            mode=config.reward.composition,
            scale="none" if by_prompt else a.advantage_scale,
            nan_policy="mask" if config.reward.on_bad_score == "drop" else "raise",
        )
        if by_prompt:  # group_ids are the global prompt slots (tempflow is refused): the samples' prompt texts
            texts = [batch.prompts[g] for g in batch.group_ids.tolist()]
            advantages, tracked = per_prompt_advantages(
                self.trackers, batch.scores, config.reward.weights, texts, ~batch.bad_sample
            )
            reward_stats.update({f"per_prompt/{k}": v for k, v in tracked.items()})
        advantages = advantages.masked_fill(batch.bad_sample, 0.0)  # dropped from every reward, not just the bad one
        reward_stats["dropped"] = int(batch.bad_sample.sum())
        batch.reward_stats = reward_stats
        advantages = clip_advantages(advantages, a.advantage_clip)  # [N]
        mine = self.run.block(len(advantages))
        rows, sampled = batch.sampled.rows, batch.sampled
        rows.advantage = advantages[mine.start : mine.stop][sampled.row_sample]  # [R] this rank's rows
        if a.noise_aware_weighting:
            weights = samplers.noise_aware_weights(
                self.adapter.sigmas(s.num_steps, s.height, s.width),
                sampled.trained_steps,
                s.noise_level,
                s.sde_kind,
                a.noise_aware_normalization,
                sde_conventions(config),
            )  # [K]
            weight_of_step = torch.zeros(s.num_steps).index_copy_(0, torch.tensor(sampled.trained_steps), weights)
            # after advantage clipping, as TempFlow's released code (w * clip(A)); the clipped loss is linear in A
            # for a positive weight w: w * l(A) = l(w * A)
            rows.advantage = rows.advantage * weight_of_step[rows.step]  # [R]
        return batch

    def update(self, batch: Iteration) -> dict:
        """A world-size invariant split of the rows into optimizer steps, group by group, then the steps."""
        config, run, t, s = self.config, self.run, self.config.train, self.config.sampling
        clock = time.perf_counter()
        rows, sampled = batch.sampled.rows, batch.sampled
        row_key = sampled.sample_id[sampled.row_sample] * s.num_steps + rows.step  # [R]
        rows_of_part = update_parts(
            row_key, batch.first_slot + rows.prompt_index, config.algorithm.updates_per_pass, t.seed, batch.index
        )
        part_rows = run.sum(torch.tensor([len(r) for r in rows_of_part])).long().tolist()  # [U] global counts
        batch.total_rows = sum(part_rows)
        self.adapter.transformer.train()
        metrics = self.algorithm.update(
            config,
            run,
            self.adapter,
            self.optimizer,
            self.params,
            self.encode(batch.local_prompts),
            rows,
            list(zip(rows_of_part, part_rows)),
            batch.total_rows,
        )
        self.adapter.transformer.eval()
        if self.ema is not None:
            self.ema.update()
        if self.old is not None:  # DiffusionNFT's soft update of the sampling policy
            a = config.algorithm
            steps = (batch.index + 1) * a.updates_per_pass  # optimizer steps so far
            self.old.decay = old_policy_decay(steps, a.nft_old_decay_rate, a.nft_old_decay_max, a.nft_old_decay_start)
            self.old.update()
        batch.timings["time/update"] = time.perf_counter() - clock
        if RATIO_METRIC in metrics:  # the algorithms with an importance ratio
            warning = self.ratio_check.warning(metrics[RATIO_METRIC], f"iteration {batch.index + 1}")  # max over ranks
            if warning:
                run.print(warning)
        return metrics

    def record(self, batch: Iteration, metrics: dict) -> dict:
        metrics = dict(metrics)
        deviation = metrics.pop(RATIO_METRIC, None)
        a = self.config.algorithm
        return {
            **{f"reward/{k}": v for k, v in batch.reward_stats.items()},
            **{f"train/{k}": v for k, v in metrics.items()},
            **({RATIO_METRIC: deviation} if deviation is not None else {}),
            "nfe/rollout": batch.sampled.nfe,  # per process: batched velocity evaluations (CFG's batch counts once)
            "nfe/update_forward": batch.total_rows * (2 if a.kl_beta > 0 else 1),  # per (sample, step) row; + ref
            "nfe/update_backward": batch.total_rows,
            "samples": self.samples_per_iteration,
            "world_size": self.run.world,
            **batch.timings,
        }

    def evaluate(self, done: int) -> dict:
        """The held-out evaluation (with the EMA weights after training starts), its grid to the trackers."""
        run = self.run
        with self.ema.swapped_in() if self.ema and done else contextlib.nullcontext():
            return evaluate_at(self.config, run, self.adapter, self.encode, self.all_rewards, self.eval_prompts, done)

    def report_before(self, before: dict) -> None:
        self.run.print(f"held-out reward before: {format_eval(before)}")

    def postfix(self, record: dict) -> dict:
        return {
            "reward": f"{record['reward/total/mean']:.3f}",
            "kl": f"{record.get('train/kl', 0):.2e}",
            **({"clip": f"{record['train/clip_frac']:.2f}"} if "train/clip_frac" in record else {}),  # ratio-based
        }

    def save(self, done: int) -> None:
        """Every rank takes part: the RNG states are gathered."""
        save_training_checkpoint(
            self.config, self.run, self.adapter, self.optimizer, self.ema, done, self.trackers, self.old
        )

    def finish(self, before: dict, after: dict) -> dict:
        self.scorer.shutdown()
        return finish_run(self.run, self.config, self.eval_prompts, before or None, after)


def train(config: FlowGRPOConfig, resume: bool = False, allow_config_change: bool = False) -> dict:
    """Train `config` (see the module docstring); returns the held-out eval/ means before (None on a resumed
    run) and after."""
    check_image_size(config)  # from the model's config.json, before the prompts and the output directory
    train_prompts, eval_prompts = read_prompts(config)
    run = open_run(config, resume, allow_config_change, tag="[flowalign]")
    recipe = FlowGRPORecipe(config, train_prompts, eval_prompts)
    return run_loop(recipe, run, config.log.eval_every, config.log.checkpoint_every)


class _InlineExecutor:
    """The executor interface, running each call at once in the calling thread."""

    def submit(self, fn, *args) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as error:  # delivered by .result(), as a thread pool would
            future.set_exception(error)
        return future

    def shutdown(self) -> None:
        pass


COMMAND = RecipeCommand(
    FlowGRPOConfig,
    train,
    plan.dry_run,
    __doc__ or "",
    "configs/flow/flow_grpo.yaml",
    "model source, prompts and rewards",
)

if __name__ == "__main__":  # the older command: python flowalign/train.py --config ... (accelerate launch too)
    script_main(COMMAND)

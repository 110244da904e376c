"""GRPO for flow-matching image models: Flow-GRPO, MixGRPO (+Flash) and TempFlow-GRPO in one recipe.

    python flowalign/train.py --config configs/flow/flow_grpo.yaml [key=value ...] [--resume [--allow-config-change]]
    accelerate launch --multi_gpu --num_processes 2 flowalign/train.py --config configs/flow/flow_grpo.yaml
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml flowalign/train.py --config ...
    python flowalign/train.py --describe            # every config field, documented

Each iteration: rollout (SDE steps with log-probs) -> reward -> advantage (shared/) -> update
(clipped policy loss + KL to the LoRA-disabled reference, shared/) -> log -> checkpoint.

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

import torch
from tqdm.auto import tqdm

from flowalign import plan, samplers
from flowalign.adapters import CachedPromptEncoder
from flowalign.command import RecipeCommand, script_main
from flowalign.config import EMBEDDED_MODEL, FlowGRPOConfig
from flowalign.data import draw_prompts, read_prompts
from flowalign.evaluation import evaluate, load_rewards, score
from flowalign.lora import EMA, reference_model
from flowalign.model import (
    iteration_generator,
    load_adapter,
    make_policy,
    plain_transformer,
    sample_noise,
    save_training_checkpoint,
    velocity_fn_for,
)
from flowalign.report import finish_run, format_eval
from flowalign.rewards.plugins import RewardError, check_rewards_on_dummy_batch
from flowalign.toy import ensure_digits_pipeline
from shared.advantages import clip_advantages, compose_rewards
from shared.config import ConfigError
from shared.kl import gaussian_mean_kl
from shared.losses import clipped_policy_loss
from shared.ratio_check import METRIC as RATIO_METRIC, FirstUpdateRatioCheck, ratio_deviation
from shared.run import Run
from shared.runlog import plot_curves
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
    rows: StepBatch  # [R] the (sample, step) rows to train, without advantages yet
    row_sample: torch.Tensor  # [R] which of the N samples each row belongs to
    trained_steps: list[int]  # the denoising steps trained this iteration (the same on every rank)
    nfe: int  # batched velocity evaluations

    @staticmethod
    def cat(chunks: list["Rollout"]) -> "Rollout":
        """One rollout from sequentially sampled chunks (row_sample shifted to index the joined samples)."""
        offsets = torch.tensor([0] + [len(c.final) for c in chunks[:-1]]).cumsum(0).tolist()  # first sample of each
        rows = StepBatch(*(torch.cat([getattr(c.rows, f.name) for c in chunks]) for f in dataclasses.fields(StepBatch)))
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
    """The SDE step's conventions from the config (defaults: the official Flow-GRPO code's; README "Flow conventions")."""
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
    if tempflow:
        trained = samplers.select_branch_steps(
            s.num_steps,
            a.branch_steps,
            subset=a.branch_subset,
            window=window.steps(iteration, generator) if window else None,
        )
    elif a.name == "mixgrpo":
        sde_steps = window.steps(iteration, generator)
        trained = sde_steps
    else:  # flow_grpo: SDE on every noisy step, train a random fraction of them
        sde_steps = list(range(s.num_steps - 1))
        count = max(1, math.ceil(a.train_fraction * len(sde_steps)))
        trained = sorted(torch.randperm(len(sde_steps), generator=generator)[:count].tolist())
    step_position = torch.zeros(s.num_steps, dtype=torch.long)  # tempflow: branch step -> its position in `trained`
    step_position[trained] = torch.arange(len(trained))

    parts = []
    for chunk in torch.arange(len(prompts)).tensor_split(min(config.train.rollout_chunks, len(prompts))):
        first, last = int(chunk[0]) * groups, (int(chunk[-1]) + 1) * groups  # this chunk's samples
        chunk_prompts = prompt_index[first:last]  # [c]
        if tempflow:
            tiled = lambda rows, p=chunk_prompts: embeds[p[torch.arange(rows) % len(p)]]
            branches = samplers.branch_rollout(
                lambda x, sigma, tiled=tiled: adapter.velocity(x, sigma, tiled(x.shape[0]), s.guidance_scale),
                noise[first:last],
                sigmas,
                trained,
                a.num_branches,
                noise_level=s.noise_level,
                kind=s.sde_kind,
                generator=noise_source[first:last],
                conventions=sde_conventions(config),
            )
            sample_prompt = chunk_prompts[branches.prompt_index]  # [r] one row per final sample
            slot = first_slot + sample_prompt  # [r]
            group_id = samplers.branch_group_ids(slot, branches.branch_step, s.num_steps)  # [r]
            # global index: (prompt slot, branch step, branch), contiguous over the global batch
            sample_id = (
                slot * len(trained) + step_position[branches.branch_step]
            ) * a.num_branches + branches.branch_index  # [r]
            rows = StepBatch(
                branches.latents,
                branches.next_latents,
                sigmas[branches.branch_step],
                sigmas[branches.branch_step + 1],
                branches.log_probs,
                torch.zeros(len(group_id)),
                sample_prompt,
                branches.branch_step,
            )
            part = Rollout(
                branches.final,
                sample_prompt,
                sample_id,
                group_id,
                rows,
                torch.arange(len(group_id)),
                trained,
                branches.nfe,
            )
        else:
            velocity = velocity_fn_for(adapter, embeds[chunk_prompts], s.guidance_scale)
            trajectory = samplers.sample_trajectory(
                velocity,
                noise[first:last],
                sigmas,
                sde_steps,
                noise_level=s.noise_level,
                kind=s.sde_kind,
                generator=noise_source[first:last],
                flash_ratio=a.flash_ratio if a.name == "mixgrpo" else None,
                conventions=sde_conventions(config),
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
            )
            sample_id = first_sample + torch.arange(first, last)  # [c]
            part = Rollout(
                trajectory.final,
                chunk_prompts,
                sample_id,
                first_slot + chunk_prompts,
                rows,
                row["sample"],
                trained,
                trajectory.nfe,
            )
        if on_chunk is not None:
            on_chunk(part.final, part.prompt_index, part.sample_id)
        parts.append(part)
    return Rollout.cat(parts)


# ------------------------------------------------------------------------------------ reward
def per_prompt_trackers(config: FlowGRPOConfig) -> dict[str, PromptStatTracker]:
    """train.advantage_scale=per_prompt: one tracker for the weighted sum (sum_then_normalize) or one per reward
    (normalize_then_sum); {} for the other scales."""
    t = config.train
    if t.advantage_scale != "per_prompt":
        return {}
    names = ["total"] if config.reward.composition == "sum_then_normalize" else list(config.reward.weights)
    return {
        name: PromptStatTracker(history=t.per_prompt_history > 0, history_size=t.per_prompt_history or None)
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
    in the gathered batch and, with train.per_prompt_history, its past iterations (shared.stats).

    scores: reward -> [N] over the gathered batch; prompts: the N samples' prompt texts; keep: [N] bool, the
    samples whose rewards enter the statistics (a dropped sample's do not; it gets advantage 0). With the
    tracker "total" the weighted sum is tracked, else each reward's advantages are weighted and summed (MixGRPO).
    Every rank calls this on the same gathered batch, so the trackers stay identical on every rank. Returns the
    advantages [N] and the trackers' num_prompts and mean_group_size (what the official code logs).
    Departures from the official code: it clears its tracker every epoch (= per_prompt_history 0 here), and its
    global_std option is train.advantage_scale=batch here (mean per prompt slot, the batch's std)."""
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
    s, t = config.sampling, config.train
    model = adapter.transformer  # the DDP/FSDP wrapper: its forward and backward sync the gradients
    micro_counts = run.max(torch.tensor([-(-len(rows) // t.micro_batch_size) for rows, _ in parts]))  # [U]
    totals: dict[str, float] = {}  # this rank's rows' metrics, each weighted by its share of the global rows
    peaks: dict[str, float] = {}  # "*_max" metrics: the maximum over micro-batches, then over ranks
    clipped_of_step = torch.zeros(s.num_steps, dtype=torch.float64)  # [T] clipped rows per denoising step
    rows_of_step = torch.zeros(s.num_steps, dtype=torch.float64)  # [T] rows per denoising step
    first_part_deviation = torch.zeros((), dtype=torch.float64)
    grad_norms = []
    for part_index, ((rows_of_part, part_rows), micro_count) in enumerate(zip(parts, micro_counts.long().tolist())):
        optimizer.zero_grad(set_to_none=True)
        micros = list(rows_of_part.split(t.micro_batch_size))
        fillers = [torch.zeros(1, dtype=torch.long)] * (micro_count - len(micros))  # any row, weighted 0
        nonfinite = False
        for index, micro in enumerate(micros + fillers):
            real = index < len(micros)
            rows = batch.rows(micro)
            step_embeds = embeds[rows.prompt_index]
            with run.sync_gradients(model, last=index == micro_count - 1):
                velocity = adapter.velocity(rows.latents, rows.sigma, step_embeds, s.guidance_scale)  # [m, C, h, w]
                _, log_prob, mean, std = rescore_step(config, rows, velocity)
                loss, metrics = clipped_policy_loss(
                    log_prob[:, None],
                    rows.old_log_prob[:, None],
                    rows.advantage,
                    eps_low=t.clip_range,
                    aggregation="grpo",
                )  # one "token" per step
                if t.kl_beta > 0:
                    with (
                        torch.no_grad(),
                        plain_transformer(run, adapter) as plain,
                        reference_model(plain, config.model.lora),
                    ):
                        ref_velocity = adapter.velocity(rows.latents, rows.sigma, step_embeds, s.guidance_scale)
                        _, _, ref_mean, _ = rescore_step(config, rows, ref_velocity)
                    divisor = samplers.kl_std(std, rows.sigma, rows.sigma_next, s.sde_kind, t.kl_form)  # [m, 1, 1, 1]
                    kl = gaussian_mean_kl(mean, ref_mean, divisor.clamp_min(1e-8)).mean()
                    loss = loss + t.kl_beta * kl
                    metrics["kl"] = kl.item()
                weight = len(micro) / part_rows if real else 0.0  # this micro-batch's share of the part's mean
                run.backward(loss * weight)
            if real:
                with torch.no_grad():
                    ratio = (log_prob.detach() - rows.old_log_prob).exp()  # [m]
                    # clipped as clipped_policy_loss counts it: the clip is active for the sign of A
                    clipped = ((rows.advantage < 0) & (ratio < 1 - t.clip_range)) | (
                        (rows.advantage > 0) & (ratio > 1 + t.clip_range)
                    )  # [m]
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
            run.clip_grad_norm(model, params, t.max_grad_norm)
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


# -------------------------------------------------------------------------------------- main
def train(config: FlowGRPOConfig, resume: bool = False, allow_config_change: bool = False) -> dict:
    t, s, a = config.train, config.sampling, config.algorithm
    train_prompts, eval_prompts = read_prompts(config)
    run = Run(
        config.log.output_dir,
        resume,
        tag="[flowalign]",
        mixed_precision=t.mixed_precision,
        config=config,
        allow_config_change=allow_config_change,
        trackers=config.log.report_to,
    )
    run.require_divisible(t.prompts_per_iteration, "train.prompts_per_iteration", "prompts")  # before the model loads

    # setup: model, trainable parameters, optimizer, rewards, prompt embeddings
    if config.model.path == EMBEDDED_MODEL:  # built on first use: by the main process alone while the others wait
        run.main_only(ensure_digits_pipeline)
    torch.manual_seed(t.seed)  # the LoRA initialisation, alike on every rank
    adapter = load_adapter(config, run.device)
    try:
        adapter.latent_shape(s.height, s.width)
    except ValueError as error:  # a size the VAE and patching cannot take
        raise ConfigError(f"config fields 'sampling.height', 'sampling.width': {error}") from None
    params = make_policy(config, adapter.transformer)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    adapter.transformer, optimizer = run.prepare(adapter.transformer, optimizer)
    ema = EMA(params, t.ema_decay) if t.ema_decay else None
    rewards, eval_rewards = load_rewards(config)
    trackers = per_prompt_trackers(config)
    window = None
    if a.name == "mixgrpo" or a.branch_steps == "window":
        window = samplers.SlidingWindow(
            num_steps=s.num_steps - 1,
            window_size=a.window_size,
            stride=a.window_stride,
            shift_interval=a.window_interval,
            mode=a.window_mode,
        )
    too_long = adapter.prompts_over_context(train_prompts + eval_prompts)
    if too_long:  # the text encoders truncate them: say so once, with a count
        run.print(
            f"warning: {len(too_long)} prompt(s) exceed the text encoder's context and are truncated, "
            f"e.g. {too_long[0][:80]!r}"
        )
    encode = (
        CachedPromptEncoder(adapter, train_prompts + eval_prompts)
        if config.model.offload_text_encoders
        else adapter.encode_prompts
    )
    per_prompt = t.group_size if a.name != "tempflow" else a.num_branches
    samples_per_iteration = t.prompts_per_iteration * per_prompt
    run.print(
        f"{a.name}: {t.prompts_per_iteration} prompts x {per_prompt} samples = {samples_per_iteration} per "
        f"iteration over {run.world} process(es) ({t.prompts_per_iteration // run.world} prompts each); "
        f"{s.num_steps} steps; {sum(p.numel() for p in params):,} trainable parameters; mixed precision "
        f"{run.accelerator.mixed_precision}; output {run.out}"
    )

    start = run.restore()
    if run.checkpoint is not None:
        run.load_trainable(adapter.transformer, run.load("trainable"))
        run.load_optimizer(adapter.transformer, optimizer, run.load("optimizer"))
        if ema is not None:
            ema.shadow = [x.to(run.device) for x in run.load("ema")]
        if trackers and (run.checkpoint / "stat_tracker.json").is_file():
            for name, state in run.load("stat_tracker").items():
                if name in trackers:  # rewards alone: a per_prompt_history changed on resume applies to them
                    trackers[name].load_state_dict({"rewards": state["rewards"]})
    run.write_config(config)
    first_images = adapter.decode(adapter.initial_noise(2, iteration_generator(t.seed, -1), s.height, s.width))
    check_rewards_on_dummy_batch(
        {**rewards, **eval_rewards},
        first_images,
        [train_prompts[i % len(train_prompts)] for i in range(2)],
        allow_nonfinite=config.reward.on_bad_score == "drop",
    )
    history = {}
    if start == 0:
        history["before"] = evaluate(
            config,
            run,
            adapter,
            encode,
            {**rewards, **eval_rewards},
            eval_prompts,
            run.out / "images" / "iter-000000.png",
            run.out / "eval" / "iter-000000.json",
        )
        run.log_image("eval/images", run.out / "images" / "iter-000000.png", step=0)  # to the trackers that take one
        run.append({"iteration": 0, **history["before"]})
        run.print(f"held-out reward before: {format_eval(history['before'])}")

    drop_bad = config.reward.on_bad_score == "drop"
    # async: one worker thread scores while the main thread samples; sync: the same calls, run on submit
    scorer = ThreadPoolExecutor(max_workers=1) if config.reward.async_scoring else _InlineExecutor()
    progress = tqdm(range(start, t.iterations), desc=a.name, disable=not run.is_main, initial=start, total=t.iterations)
    ratio_check = FirstUpdateRatioCheck()  # warns once per run (per resumed run) when the on-policy ratio is off 1
    record = {}
    for iteration in progress:
        generator = iteration_generator(t.seed, iteration)  # shared by all ranks
        timings = {}

        # rollout: every rank draws the same global prompt list and samples its own block of whole groups;
        # each chunk is decoded and handed to the scorer as soon as it is sampled
        clock = time.perf_counter()
        prompts = draw_prompts(train_prompts, t.prompts_per_iteration, generator)
        block = run.block(len(prompts))
        local_prompts = prompts[block.start : block.stop]
        jobs, reward_seconds = [], [0.0]

        def score_chunk(final_chunk, chunk_prompt_index, chunk_sample_id):
            started_chunk = time.perf_counter()
            images = adapter.decode(final_chunk)  # [c, 3, H, W]
            texts = [local_prompts[i] for i in chunk_prompt_index.tolist()]
            metadata = [{"split": "train", "iteration": iteration + 1, "sample": i} for i in chunk_sample_id.tolist()]
            jobs.append(
                scorer.submit(score, rewards, images, texts, metadata, drop_bad)
            )  # async: overlaps the next chunk
            reward_seconds[0] += time.perf_counter() - started_chunk

        with plain_transformer(run, adapter):
            sampled = rollout(
                config, adapter, encode, local_prompts, block.start, iteration, window, generator, on_chunk=score_chunk
            )
        timings["time/rollout"] = time.perf_counter() - clock - reward_seconds[0]

        # reward: gathered in rank order, so the advantages below see the global batch
        clock = time.perf_counter()
        chunk_scores, failure = [], None
        try:
            chunk_scores = [job.result() for job in jobs]  # re-raises a reward's error here
        except RewardError as error:
            failure = error
        run.raise_together(failure, RewardError)  # every rank stops together, with the failing rank's message
        scores = {name: run.gather(torch.cat([chunk[name] for chunk in chunk_scores])) for name in rewards}  # [N] each
        group_ids = run.gather(sampled.group_id)  # [N]
        bad_sample = torch.stack(list(scores.values())).isnan().any(dim=0)  # [N] a reward gave NaN/inf
        timings["time/reward"] = reward_seconds[0] + time.perf_counter() - clock  # decode + scoring not overlapped

        # advantage (dropped samples: NaN rewards are masked out of the statistics and get advantage 0)
        by_prompt = t.advantage_scale == "per_prompt"  # advantages from the per-prompt trackers below
        advantages, reward_stats = compose_rewards(
            scores,
            config.reward.weights,
            group_ids,
            mode=config.reward.composition,
            scale="none" if by_prompt else t.advantage_scale,
            nan_policy="mask" if drop_bad else "raise",
        )
        if by_prompt:  # group_ids are the global prompt slots (tempflow is refused): the samples' prompt texts
            advantages, tracked = per_prompt_advantages(
                trackers, scores, config.reward.weights, [prompts[g] for g in group_ids.tolist()], ~bad_sample
            )
            reward_stats.update({f"per_prompt/{k}": v for k, v in tracked.items()})
        advantages = advantages.masked_fill(bad_sample, 0.0)  # dropped from every reward, not just the bad one
        reward_stats["dropped"] = int(bad_sample.sum())
        advantages = clip_advantages(advantages, t.advantage_clip)  # [N]
        mine = run.block(len(advantages))
        batch = sampled.rows
        batch.advantage = advantages[mine.start : mine.stop][sampled.row_sample]  # [R] this rank's rows
        if a.noise_aware_weighting:
            steps = sampled.trained_steps
            weights = samplers.noise_aware_weights(
                adapter.sigmas(s.num_steps, s.height, s.width),
                steps,
                s.noise_level,
                s.sde_kind,
                a.noise_aware_normalization,
                sde_conventions(config),
            )  # [K]
            weight_of_step = torch.zeros(s.num_steps).index_copy_(0, torch.tensor(steps), weights)  # [T]
            # after advantage clipping, as TempFlow's released code (w * clip(A)); the clipped loss is linear in A
            # for a positive weight w: w * l(A) = l(w * A)
            batch.advantage = batch.advantage * weight_of_step[batch.step]  # [R]

        # update: a world-size invariant split of the rows into optimizer steps, group by group
        clock = time.perf_counter()
        row_key = sampled.sample_id[sampled.row_sample] * s.num_steps + batch.step  # [R]
        rows_of_part = update_parts(
            row_key, block.start + batch.prompt_index, t.updates_per_iteration, t.seed, iteration
        )
        part_rows = run.sum(torch.tensor([len(rows) for rows in rows_of_part])).long().tolist()  # [U] global counts
        total_rows = sum(part_rows)
        adapter.transformer.train()
        try:
            metrics = update(
                config,
                run,
                adapter,
                optimizer,
                params,
                encode(local_prompts),
                batch,
                list(zip(rows_of_part, part_rows)),
                total_rows,
            )
        except FloatingPointError as error:
            raise run.nan_stop(f"iteration {iteration + 1}", error) from None
        adapter.transformer.eval()
        if ema is not None:
            ema.update()
        timings["time/update"] = time.perf_counter() - clock
        first_update_deviation = metrics.pop(RATIO_METRIC)  # already the maximum over ranks
        warning = ratio_check.warning(first_update_deviation, f"iteration {iteration + 1}")
        if warning:
            run.print(warning)

        # log
        done = iteration + 1
        last = run.is_last(done, t.iterations, t.max_seconds)
        record = {
            "iteration": done,
            **{f"reward/{k}": v for k, v in reward_stats.items()},
            **{f"train/{k}": v for k, v in metrics.items()},
            RATIO_METRIC: first_update_deviation,
            "nfe/rollout": sampled.nfe,  # per process: batched velocity evaluations (CFG's doubled batch counts once)
            "nfe/update_forward": total_rows * (2 if t.kl_beta > 0 else 1),  # per (sample, step) row; + reference
            "nfe/update_backward": total_rows,
            "samples": samples_per_iteration,
            "world_size": run.world,
            **timings,
        }
        if run.due(done, config.log.eval_every, last):
            with ema.swapped_in() if ema else contextlib.nullcontext():
                record.update(
                    evaluate(
                        config,
                        run,
                        adapter,
                        encode,
                        {**rewards, **eval_rewards},
                        eval_prompts,
                        run.out / "images" / f"iter-{done:06d}.png",
                        run.out / "eval" / f"iter-{done:06d}.json",
                    )
                )
            run.log_image("eval/images", run.out / "images" / f"iter-{done:06d}.png", step=done)
        run.append(record)
        progress.set_postfix(
            reward=f"{reward_stats['total/mean']:.3f}",
            kl=f"{metrics.get('kl', 0):.2e}",
            clip=f"{metrics['clip_frac']:.2f}",
        )

        # checkpoint (every rank takes part: the RNG states are gathered)
        if run.due(done, config.log.checkpoint_every, last):
            save_training_checkpoint(config, run, adapter, optimizer, ema, done, trackers)
        if last:
            break

    scorer.shutdown()
    final_eval = {k: v for k, v in record.items() if k.startswith("eval/")}
    run.main_only(
        lambda: plot_curves(
            run.out / "metrics.jsonl",
            run.out / "reward_curve.png",
            [
                "reward/total/mean",
                *[f"eval/{name}" for name in [*rewards, *eval_rewards]],
                "train/kl",
                "train/clip_frac",
            ],
            f"{a.name} on {config.model.path}",
        )
    )
    return finish_run(run, config, eval_prompts, history.get("before"), final_eval)


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

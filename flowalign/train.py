"""GRPO for flow-matching image models: Flow-GRPO, MixGRPO (+Flash) and TempFlow-GRPO in one recipe.

    accelerate launch flowalign/train.py --config configs/flow/flow_grpo.yaml [key=value ...] [--resume]
    python flowalign/train.py --config configs/flow/mixgrpo.yaml train.iterations=5
    python flowalign/train.py --describe            # every config field, documented

Each iteration: rollout (SDE steps with log-probs) -> reward -> advantage (shared/) -> update
(clipped policy loss + KL to the LoRA-disabled reference, shared/) -> log -> checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch flowalign/train.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm.auto import tqdm

from flowalign import samplers
from flowalign.config import EMBEDDED_MODEL, FlowGRPOConfig
from flowalign.lora import (EMA, load_trainable_state, make_trainable, reference_model, save_lora_for_pipeline,
                            trainable_state)
from flowalign.reward_plugins import RewardError, call_reward, check_rewards_on_dummy_batch, load_reward
from flowalign.visuals import save_image_grid
from shared.advantages import clip_advantages, compose_rewards
from shared.checkpoint import (latest_checkpoint, load_state, open_output_dir, rng_state, save_checkpoint,
                               set_rng_state)
from shared.config import ConfigError, describe, exit_on_config_error, load_config, to_dict
from shared.kl import gaussian_mean_kl
from shared.losses import clipped_policy_loss
from shared.runlog import append_metrics, plot_curves, truncate_metrics

EVAL_SEED_OFFSET = 1_000_003  # evaluation noise comes from seeds training never draws


@dataclasses.dataclass
class StepBatch:
    """One row per (sample, trained step): everything needed to recompute that step's log-prob."""

    latents: torch.Tensor       # [R, C, h, w] state before the step
    next_latents: torch.Tensor  # [R, C, h, w] sampled state after the step
    sigma: torch.Tensor         # [R]
    sigma_next: torch.Tensor    # [R]
    old_log_prob: torch.Tensor  # [R]
    advantage: torch.Tensor     # [R] (already multiplied by the noise-aware weight when that is on)
    prompt_index: torch.Tensor  # [R] index into the iteration's prompt embeddings
    step: torch.Tensor          # [R] index of the denoising step

    def rows(self, index: torch.Tensor) -> "StepBatch":
        return StepBatch(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def __len__(self) -> int:
        return self.sigma.numel()


def load_adapter(config: FlowGRPOConfig, device: torch.device):
    """The pipeline adapter named by model.pipeline, loaded with from_pretrained (directory or hub id)."""
    from flowalign import adapters

    path = config.model.path
    if path == EMBEDDED_MODEL:
        from flowalign.toy import ensure_digits_pipeline

        path = ensure_digits_pipeline()
    adapter_class = {"sd3": adapters.SD3Adapter, "flux": getattr(adapters, "FluxAdapter", None)}[config.model.pipeline]
    if adapter_class is None:
        raise ConfigError("config field 'model.pipeline': the flux adapter is not available in this build; use sd3")
    remote = {"trust_remote_code": True} if config.model.allow_remote_code else {}  # off unless the config says so
    return adapter_class.from_pretrained(path, dtype=getattr(torch, config.model.dtype), device=device, **remote)


def read_prompts(config: FlowGRPOConfig) -> tuple[list[str], list[str]]:
    prompts = config.data.prompts
    if config.data.prompts_file:
        file = Path(config.data.prompts_file)
        if not file.is_file():
            raise ConfigError(f"config field 'data.prompts_file': {file} does not exist; give a text file, one prompt a line")
        prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("config field 'data.prompts': no prompts; list some or set data.prompts_file")
    return prompts, (config.data.eval_prompts or prompts)


def iteration_generator(seed: int, iteration: int, device: torch.device) -> torch.Generator:
    """All randomness of iteration i comes from (seed, i): a resumed run draws exactly what it would have."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_000 + iteration)
    return generator


def velocity_fn_for(adapter, embeds, guidance_scale: float):
    return lambda latents, sigma: adapter.velocity(latents, sigma, embeds, guidance_scale)


# ----------------------------------------------------------------------------------- rollout
@torch.no_grad()
def rollout(config: FlowGRPOConfig, adapter, prompts: list[str], iteration: int, window, generator,
            on_chunk=None) -> tuple:
    """Sample the iteration's images in `train.rollout_chunks` sequential batches of prompts; return (final latents
    [N, ...], group ids [N], StepBatch without advantages, the sample index of every StepBatch row [R], nfe,
    prompt index of the N samples). `on_chunk(final, prompt_index)` runs after each chunk (scoring it while the
    next chunk samples). Noise and the steps to train are drawn once per iteration, before the chunks."""
    s, a = config.sampling, config.algorithm
    sigmas = adapter.sigmas(s.num_steps)  # [T+1]
    embeds = adapter.encode_prompts(prompts)
    groups = config.train.group_size if a.name != "tempflow" else 1
    prompt_index = torch.arange(len(prompts)).repeat_interleave(groups)  # [N]
    noise = adapter.initial_noise(len(prompts) * groups, generator)  # [N, C, h, w]
    if s.same_noise_per_group:
        noise = noise[::groups].repeat_interleave(groups, dim=0)
    if a.name == "tempflow":
        steps = samplers.select_branch_steps(s.num_steps, a.branch_steps, subset=a.branch_subset,
                                             window=window.steps(iteration, generator) if window else None)
    elif a.name == "mixgrpo":
        sde_steps = window.steps(iteration, generator)
        trained = sde_steps
    else:  # flow_grpo: SDE on every noisy step, train a random fraction of them
        sde_steps = list(range(s.num_steps - 1))
        count = max(1, math.ceil(a.train_fraction * len(sde_steps)))
        trained = sorted(torch.randperm(len(sde_steps), generator=generator)[:count].tolist())

    parts = []
    for chunk in torch.arange(len(prompts)).tensor_split(min(config.train.rollout_chunks, len(prompts))):
        first, last = int(chunk[0]) * groups, (int(chunk[-1]) + 1) * groups  # this chunk's samples
        chunk_prompts = prompt_index[first:last]  # [n]
        if a.name == "tempflow":
            tiled = lambda rows, p=chunk_prompts: embeds[p[torch.arange(rows) % len(p)]]  # noqa: E731
            branches = samplers.branch_rollout(
                lambda x, sigma, tiled=tiled: adapter.velocity(x, sigma, tiled(x.shape[0]), s.guidance_scale),
                noise[first:last], sigmas, steps, a.num_branches, noise_level=s.noise_level, kind=s.sde_kind,
                generator=generator)
            sample_prompt = chunk_prompts[branches.prompt_index]  # [r] one row per final sample
            group_ids = samplers.branch_group_ids(first + branches.prompt_index, branches.branch_step, s.num_steps)
            rows = StepBatch(branches.latents, branches.next_latents, sigmas[branches.branch_step],
                             sigmas[branches.branch_step + 1], branches.log_probs, torch.zeros(len(group_ids)),
                             sample_prompt, branches.branch_step)
            part = (branches.final, group_ids, rows, torch.arange(len(group_ids)), branches.nfe, sample_prompt)
        else:
            velocity = velocity_fn_for(adapter, embeds[chunk_prompts], s.guidance_scale)
            trajectory = samplers.sample_trajectory(velocity, noise[first:last], sigmas, sde_steps,
                                                    noise_level=s.noise_level, kind=s.sde_kind, generator=generator,
                                                    flash_ratio=a.flash_ratio if a.name == "mixgrpo" else None)
            row = trajectory.training_rows(trained)  # step-major rows of the trained SDE steps
            rows = StepBatch(row["latents"], row["next_latents"], row["sigma"], row["sigma_next"], row["log_prob"],
                             torch.zeros(len(row["step"])), chunk_prompts[row["sample"]], row["step"])
            part = (trajectory.final, chunk_prompts, rows, row["sample"], trajectory.nfe, chunk_prompts)
        if on_chunk is not None:
            on_chunk(part[0], part[5])
        parts.append(part)
    finals, group_ids, batches, row_samples, nfes, sample_prompts = zip(*parts)
    offsets = torch.tensor([0] + [f.shape[0] for f in finals[:-1]]).cumsum(0)  # first sample of each chunk
    merged = StepBatch(*(torch.cat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(StepBatch)))
    row_sample = torch.cat([r + o for r, o in zip(row_samples, offsets.tolist())])  # [R]
    return torch.cat(finals), torch.cat(group_ids), merged, row_sample, sum(nfes), torch.cat(sample_prompts)


# ------------------------------------------------------------------------------------ reward
def score(rewards: dict, images: torch.Tensor, prompts: list[str], allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    metadata = [{} for _ in prompts]
    return {name: call_reward(name, fn, images, prompts, metadata, allow_nonfinite) for name, fn in rewards.items()}


# ------------------------------------------------------------------------------------ update
def update(config: FlowGRPOConfig, adapter, optimizer, params, embeds, batch: StepBatch, generator) -> dict:
    """updates_per_iteration optimizer steps over a shuffled split of the rows, micro-batched."""
    s, t = config.sampling, config.train
    transformer = adapter.transformer
    order = torch.randperm(len(batch), generator=generator)  # [R]
    totals: dict[str, float] = {}
    for part in order.chunk(t.updates_per_iteration):
        optimizer.zero_grad(set_to_none=True)
        for micro in part.split(t.micro_batch_size):
            rows = batch.rows(micro)
            step_embeds = embeds[rows.prompt_index]
            velocity = adapter.velocity(rows.latents, rows.sigma, step_embeds, s.guidance_scale)  # [m, C, h, w]
            _, log_prob, mean, std = samplers.sde_step_with_logprob(
                rows.latents, velocity, rows.sigma, rows.sigma_next, noise_level=s.noise_level, kind=s.sde_kind,
                prev_sample=rows.next_latents)
            loss, metrics = clipped_policy_loss(log_prob[:, None], rows.old_log_prob[:, None], rows.advantage,
                                                eps_low=t.clip_range, aggregation="grpo")  # one "token" per step
            if t.kl_beta > 0:
                with torch.no_grad(), reference_model(transformer, config.model.lora):
                    ref_velocity = adapter.velocity(rows.latents, rows.sigma, step_embeds, s.guidance_scale)
                    _, _, ref_mean, _ = samplers.sde_step_with_logprob(
                        rows.latents, ref_velocity, rows.sigma, rows.sigma_next, noise_level=s.noise_level,
                        kind=s.sde_kind, prev_sample=rows.next_latents)
                kl = gaussian_mean_kl(mean, ref_mean, std.clamp_min(1e-8)).mean()
                loss = loss + t.kl_beta * kl
                metrics["kl"] = kl.item()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()}; lower train.learning_rate or check the rewards")
            (loss * len(micro) / len(part)).backward()  # accumulation: the part's mean over rows
            metrics["loss"] = loss.item()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value * len(micro) / len(batch)
        totals["grad_norm"] = totals.get("grad_norm", 0.0) + float(
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)) / t.updates_per_iteration
        optimizer.step()
    return totals


# -------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(config: FlowGRPOConfig, adapter, rewards: dict, prompts: list[str], grid_path: Path | None) -> dict:
    """ODE samples of the eval prompts from held-out seeds; mean reward per reward fn; optional image grid."""
    seeds = config.data.eval_seeds
    repeated = [p for p in prompts for _ in range(seeds)]
    embeds = adapter.encode_prompts(prompts).repeat_interleave(seeds)
    generator = iteration_generator(config.train.seed + EVAL_SEED_OFFSET, 0, adapter.device)
    noise = adapter.initial_noise(len(repeated), generator)
    trajectory = samplers.sample_trajectory(velocity_fn_for(adapter, embeds, config.sampling.guidance_scale), noise,
                                            adapter.sigmas(config.sampling.eval_num_steps), [], generator=generator)
    images = adapter.decode(trajectory.final)  # [P*S, 3, H, W]
    if grid_path is not None:
        save_image_grid(images, rows=len(prompts), path=grid_path, labels=prompts)
    scores = score(rewards, images, repeated, allow_nonfinite=config.reward.on_bad_score == "drop")
    return {f"eval/{name}": value.nanmean().item() for name, value in scores.items()}  # dropped scores left out


# -------------------------------------------------------------------------------------- main
def train(config: FlowGRPOConfig, resume: bool = False) -> dict:
    from accelerate import Accelerator

    train_prompts, eval_prompts = read_prompts(config)
    out = Path(config.log.output_dir)
    checkpoint = open_output_dir(out, resume)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main_process = accelerator.is_main_process
    torch.manual_seed(config.train.seed)
    t, s, a = config.train, config.sampling, config.algorithm

    # setup: model, trainable parameters, optimizer, rewards
    adapter = load_adapter(config, accelerator.device)
    params = make_trainable(adapter.transformer, config.model.lora, config.model.lora_rank, config.model.lora_alpha,
                            config.model.lora_targets)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    adapter.transformer, optimizer = accelerator.prepare(adapter.transformer, optimizer)
    ema = EMA(params, t.ema_decay) if t.ema_decay else None
    rewards = {path: load_reward(path, config.reward.kwargs.get(path)) for path in config.reward.weights}
    window = None
    if a.name == "mixgrpo" or a.branch_steps == "window":
        window = samplers.SlidingWindow(num_steps=s.num_steps - 1, window_size=a.window_size, stride=a.window_stride,
                                        shift_interval=a.window_interval, mode=a.window_mode)
    samples_per_iteration = t.prompts_per_iteration * (t.group_size if a.name != "tempflow" else a.num_branches)
    if main_process:
        print(f"[flowalign] {a.name}: {t.prompts_per_iteration} prompts x "
              f"{t.group_size if a.name != 'tempflow' else a.num_branches} samples; {s.num_steps} steps; "
              f"{sum(p.numel() for p in params):,} trainable parameters; output {out}")

    start = 0
    if checkpoint is not None:
        load_trainable_state(accelerator.unwrap_model(adapter.transformer), load_state(checkpoint, "trainable"))
        optimizer.load_state_dict(load_state(checkpoint, "optimizer"))
        set_rng_state(load_state(checkpoint, "rng"))
        trainer_state = load_state(checkpoint, "trainer")
        start = trainer_state["iteration"]
        if ema is not None:
            ema.shadow = [x.to(accelerator.device) for x in load_state(checkpoint, "ema")]
        truncate_metrics(out / "metrics.jsonl", start)
        print(f"[flowalign] resumed from {checkpoint} at iteration {start}")
    elif resume:
        print(f"[flowalign] --resume: no checkpoint in {out / 'checkpoints'}, starting fresh")

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    too_long = adapter.prompts_over_context(train_prompts + eval_prompts)
    if too_long and main_process:  # the text encoders truncate them: say so once, with a count
        print(f"[flowalign] warning: {len(too_long)} prompt(s) exceed the text encoder's context and are truncated, "
              f"e.g. {too_long[0][:80]!r}")
    first_images = adapter.decode(adapter.initial_noise(2, iteration_generator(t.seed, -1, accelerator.device)))
    check_rewards_on_dummy_batch(rewards, first_images, [train_prompts[i % len(train_prompts)] for i in range(2)],
                                 allow_nonfinite=config.reward.on_bad_score == "drop")
    history = {}
    if start == 0 and main_process:
        history["before"] = evaluate(config, adapter, rewards, eval_prompts, out / "images" / "iter-000000.png")
        append_metrics(out / "metrics.jsonl", {"iteration": 0, **history["before"]})
        print(f"[flowalign] held-out reward before: {_fmt(history['before'])}")

    drop_bad = config.reward.on_bad_score == "drop"
    # async: one worker thread scores while the main thread samples; sync: the same calls, run on submit
    scorer = ThreadPoolExecutor(max_workers=1) if config.reward.async_scoring else _InlineExecutor()
    progress = tqdm(range(start, t.iterations), desc=a.name, disable=not main_process, initial=start, total=t.iterations)
    started = time.perf_counter()
    for iteration in progress:
        generator = iteration_generator(t.seed, iteration, accelerator.device)
        timings = {}

        # rollout (each chunk is decoded and handed to the scorer as soon as it is sampled)
        clock = time.perf_counter()
        rounds = -(-t.prompts_per_iteration // len(train_prompts))  # more prompts asked than exist: go round again
        chosen = torch.cat([torch.randperm(len(train_prompts), generator=generator) for _ in range(rounds)])
        prompts = [train_prompts[i] for i in chosen[: t.prompts_per_iteration].tolist()]
        jobs, reward_seconds = [], [0.0]

        def score_chunk(final_chunk, chunk_prompt_index):
            started_chunk = time.perf_counter()
            images = adapter.decode(final_chunk)  # [n, 3, H, W]
            texts = [prompts[i] for i in chunk_prompt_index.tolist()]
            jobs.append(scorer.submit(score, rewards, images, texts, drop_bad))  # async: overlaps the next chunk
            reward_seconds[0] += time.perf_counter() - started_chunk

        final, group_ids, batch, row_sample, nfe, sample_prompt = rollout(config, adapter, prompts, iteration, window,
                                                                         generator, on_chunk=score_chunk)
        timings["time/rollout"] = time.perf_counter() - clock - reward_seconds[0]

        # reward
        clock = time.perf_counter()
        chunk_scores = [job.result() for job in jobs]  # re-raises a reward's error here
        scores = {name: torch.cat([chunk[name] for chunk in chunk_scores]) for name in rewards}  # [N] each
        bad_sample = torch.stack(list(scores.values())).isnan().any(dim=0)  # [N] a reward gave NaN/inf
        timings["time/reward"] = reward_seconds[0] + time.perf_counter() - clock  # decode + scoring not overlapped

        # advantage (dropped samples: NaN rewards are masked out of the statistics and get advantage 0)
        advantages, reward_stats = compose_rewards(scores, config.reward.weights, group_ids,
                                                   mode=config.reward.composition, scale=t.advantage_scale,
                                                   nan_policy="mask" if drop_bad else "raise")
        advantages = advantages.masked_fill(bad_sample, 0.0)  # dropped from every reward, not just the bad one
        reward_stats["dropped"] = int(bad_sample.sum())
        advantages = clip_advantages(advantages, t.advantage_clip)  # [N]
        batch.advantage = advantages[row_sample]  # [R]
        if a.noise_aware_weighting:
            steps = sorted(set(batch.step.tolist()))
            weights = samplers.noise_aware_weights(adapter.sigmas(s.num_steps), steps, s.noise_level, s.sde_kind)  # [K]
            weight_of_step = torch.zeros(s.num_steps).index_copy_(0, torch.tensor(steps), weights)  # [T]
            # the clipped loss is linear in A for a positive weight w: w * l(A) = l(w * A)
            batch.advantage = batch.advantage * weight_of_step[batch.step]  # [R]

        # update
        clock = time.perf_counter()
        embeds = adapter.encode_prompts(prompts)
        adapter.transformer.train()
        try:
            metrics = update(config, adapter, optimizer, params, embeds, batch, generator)
        except FloatingPointError as error:
            last = latest_checkpoint(out / "checkpoints")
            raise FloatingPointError(f"iteration {iteration + 1}: {error}; the last good checkpoint is "
                                     f"{last or 'none (none written yet)'}, and --resume starts from it") from None
        adapter.transformer.eval()
        if ema is not None:
            ema.update()
        timings["time/update"] = time.perf_counter() - clock

        # log
        record = {"iteration": iteration + 1, **{f"reward/{k}": v for k, v in reward_stats.items()},
                  **{f"train/{k}": v for k, v in metrics.items()},
                  "nfe/rollout": nfe,  # batched velocity evaluations of the rollout (CFG's doubled batch counts once)
                  "nfe/update_forward": len(batch) * (2 if t.kl_beta > 0 else 1),  # per (sample, step) row; + reference
                  "nfe/update_backward": len(batch),
                  "samples": samples_per_iteration, **timings}
        done = iteration + 1
        last = done == t.iterations or (t.max_seconds is not None and time.perf_counter() - started > t.max_seconds)
        if config.log.eval_every and done % config.log.eval_every == 0 or last:
            with ema.swapped_in() if ema else contextlib.nullcontext():
                record.update(evaluate(config, adapter, rewards, eval_prompts, out / "images" / f"iter-{done:06d}.png"))
        if main_process:
            append_metrics(out / "metrics.jsonl", record)
            progress.set_postfix(reward=f"{reward_stats['total/mean']:.3f}", kl=f"{metrics.get('kl', 0):.2e}",
                                 clip=f"{metrics['clip_frac']:.2f}")

        # checkpoint
        if (config.log.checkpoint_every and done % config.log.checkpoint_every == 0) or last:
            save_training_checkpoint(config, accelerator, adapter, optimizer, ema, done, out)
        if last:
            break

    scorer.shutdown()
    final_eval = {k: v for k, v in record.items() if k.startswith("eval/")} if t.iterations > start else {}
    if main_process:
        plot_curves(out / "metrics.jsonl", out / "reward_curve.png",
                    ["reward/total/mean", *[f"eval/{name}" for name in rewards], "train/kl", "train/clip_frac"],
                    f"{a.name} on {config.model.path}")
        if "before" in history and final_eval:
            print(f"[flowalign] held-out reward before: {_fmt(history['before'])}")
            print(f"[flowalign] held-out reward after : {_fmt(final_eval)}")
        print(f"[flowalign] metrics {out / 'metrics.jsonl'}, curve {out / 'reward_curve.png'}, images {out / 'images'}")
    return {"before": history.get("before"), "after": final_eval}


def save_training_checkpoint(config, accelerator, adapter, optimizer, ema, iteration: int, out: Path) -> None:
    if not accelerator.is_main_process:
        return
    transformer = accelerator.unwrap_model(adapter.transformer)
    states = {"trainable": trainable_state(transformer), "optimizer": optimizer.state_dict(), "rng": rng_state(),
              "trainer": {"iteration": iteration, "config": to_dict(config)}}
    if ema is not None:
        states["ema"] = ema.shadow
    writer = (lambda tmp: save_lora_for_pipeline(type(adapter.pipeline), transformer, tmp / "lora")) if config.model.lora else None
    save_checkpoint(out / "checkpoints", iteration, states, keep_last=config.log.keep_last, extra_writer=writer)


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


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k.removeprefix('eval/')}={v:.4f}" for k, v in metrics.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe, e.g. configs/flow/flow_grpo.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in log.output_dir")
    parser.add_argument("--describe", action="store_true", help="list every config field and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.iterations=5")
    args = parser.parse_args(argv)
    if args.describe:
        print("\n".join(describe(FlowGRPOConfig)))
        return
    try:
        config = load_config(FlowGRPOConfig, args.config, args.overrides)
        read_prompts(config)
    except ConfigError as error:
        exit_on_config_error(error)
    try:
        train(config, resume=args.resume)
    except ConfigError as error:  # a used log.output_dir, found before anything loads
        exit_on_config_error(error)
    except RewardError as error:
        print(f"reward error: {error}", file=sys.stderr)
        raise SystemExit(3) from None
    except FloatingPointError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        raise SystemExit(4) from None


if __name__ == "__main__":
    main()

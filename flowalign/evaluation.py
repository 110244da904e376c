"""Rewards and the held-out evaluation of the flow recipes: loading the configured rewards, scoring a batch of
images, and the ODE evaluation on held-out noise (metrics, image grid, per-sample scores)."""

from __future__ import annotations

from pathlib import Path

import torch

from flowalign import samplers
from flowalign.config import FlowGRPOConfig
from flowalign.model import plain_transformer, sample_noise, velocity_fn_for
from flowalign.report import write_eval_scores
from flowalign.rewards.plugins import RewardError, call_reward, load_reward
from flowalign.visuals import save_image_grid
from shared.reward_calls import is_groupwise
from shared.run import Run
from shared.stats import mean_with_standard_error

GRID_SEEDS = 8
"""Columns of the evaluation image grid: the first seeds of each prompt (all of them are scored)."""


def load_rewards(config: FlowGRPOConfig) -> tuple[dict, dict]:
    """(training rewards of reward.weights, evaluation-only rewards of eval.rewards), each call bounded by
    reward.timeout_s (null: unbounded)."""
    rewards = {
        path: load_reward(path, config.reward.kwargs.get(path), timeout_s=config.reward.timeout_s)
        for path in config.reward.weights
    }
    try:  # scored on the evaluation samples only
        eval_rewards = {
            path: load_reward(path, kwargs or None, timeout_s=config.reward.timeout_s)
            for path, kwargs in config.eval.rewards.items()
        }
    except RewardError as error:  # its message names the reward; say which config field holds it
        raise RewardError(f"eval.rewards: {error}") from None
    return rewards, eval_rewards


def score(
    rewards: dict,
    images: torch.Tensor,
    prompts: list[str],
    metadata: list[dict],
    allow_nonfinite: bool = False,
    groups: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """name -> scores [B]; `groups` (image i's group id) for the groupwise rewards (shared.reward_calls)."""
    return {
        name: call_reward(name, fn, images, prompts, metadata, allow_nonfinite, groups=groups)
        for name, fn in rewards.items()
    }


@torch.no_grad()
def evaluate(
    config: FlowGRPOConfig,
    run: Run,
    adapter,
    encode,
    rewards: dict,
    prompts: list[str],
    grid_path: Path | None,
    scores_path: Path | None = None,
) -> dict:
    """ODE samples of the eval prompts from held-out noise, split over the ranks and gathered; mean reward per
    reward fn (`eval/<name>`) and its standard error (`eval_se/<name>`); the image grid (at most GRID_SEEDS
    columns) from the main process, and each sample's scores in `scores_path` (JSON, NaN as null), which the
    end of the run pairs with the first evaluation's. Sample i (prompt i // seeds) draws its noise from
    (eval, seed, i), so the numbers do not depend on the world size. Every rank samples the same count (the last
    sample repeated as padding), so ranks make the same forward calls."""
    s, seeds = config.sampling, config.data.eval_seeds
    total = len(prompts) * seeds
    per_rank = -(-total // run.world)
    mine = range(run.rank * per_rank, (run.rank + 1) * per_rank)
    index = [min(i, total - 1) for i in mine]
    real = [i for i in mine if i < total]
    embeds = encode(prompts)[[i // seeds for i in index]]
    noise = adapter.initial_noise(
        len(index), sample_noise(adapter.device, "eval", config.train.seed, samples=index).generators, s.height, s.width
    )  # [n, C, h, w]
    with plain_transformer(run, adapter):
        trajectory = samplers.sample_trajectory(
            velocity_fn_for(adapter, embeds, s.guidance_scale),
            noise,
            adapter.sigmas(s.eval_num_steps, s.height, s.width),
            [],
        )
    images, scores, error = None, {}, None
    alone = {name: fn for name, fn in rewards.items() if not is_groupwise(fn)}  # scored here, each image alone
    if real:  # a rank holding only padding (fewer samples than ranks) scores nothing
        images = adapter.decode(trajectory.final[: len(real)])  # [n, 3, H, W]
        try:
            scores = score(
                alone,
                images,
                [prompts[i // seeds] for i in real],
                [{"split": "eval", "sample": i} for i in real],
                allow_nonfinite=config.reward.on_bad_score == "drop",
            )
        except RewardError as failure:
            error = failure
    run.raise_together(error, RewardError)
    gathered = run.gather_objects(
        [(i, images[k].cpu(), {name: float(v[k]) for name, v in scores.items()}) for k, i in enumerate(real)]
    )
    gathered.sort(key=lambda item: item[0])  # sample order, as one process makes them
    if grid_path is not None:
        shown = min(seeds, GRID_SEEDS)
        run.main_only(
            lambda: save_image_grid(
                torch.stack([image for i, image, _ in gathered if i % seeds < shown]),
                rows=len(prompts),
                path=grid_path,
                labels=prompts,
            )
        )
    values = {name: torch.tensor([item[2][name] for item in gathered]) for name in alone}  # [P*S] each
    values.update(groupwise_eval_scores(config, run, rewards, gathered, prompts, seeds))
    values = {name: values[name] for name in rewards}  # the configured order
    if scores_path is not None:
        run.main_only(lambda: write_eval_scores(scores_path, values))
    metrics = {}
    for name, value in values.items():  # dropped scores (NaN) left out
        metrics[f"eval/{name}"], metrics[f"eval_se/{name}"], _ = mean_with_standard_error(value)
    return metrics


def groupwise_eval_scores(config, run: Run, rewards: dict, gathered: list, prompts: list[str], seeds: int) -> dict:
    """name -> [P*S] scores of the groupwise rewards (shared.reward_calls) on the gathered evaluation images (sample
    order), each prompt's seeds one group: a prompt's seeds may lie on several ranks, so the main process scores
    them all and shares the scores; a failure stops every rank with its message."""
    groupwise = {name: fn for name, fn in rewards.items() if is_groupwise(fn)}
    if not groupwise:
        return {}
    result, error = [], None
    if run.is_main:
        order = [i for i, _, _ in gathered]
        try:
            result = [
                score(
                    groupwise,
                    torch.stack([image for _, image, _ in gathered]),  # [P*S, 3, H, W]
                    [prompts[i // seeds] for i in order],
                    [{"split": "eval", "sample": i} for i in order],
                    allow_nonfinite=config.reward.on_bad_score == "drop",
                    groups=[i // seeds for i in order],
                )
            ]
        except RewardError as failure:
            error = failure
    run.raise_together(error, RewardError)
    return run.gather_objects(result)[0]


def evaluate_at(config, run: Run, adapter, encode, rewards: dict, prompts: list[str], done: int) -> dict:
    """`evaluate` after `done` iterations into the run's images/iter-N.png and eval/iter-N.json, its grid to the
    trackers that take images."""
    grid = run.out / "images" / f"iter-{done:06d}.png"
    metrics = evaluate(config, run, adapter, encode, rewards, prompts, grid, run.out / "eval" / f"iter-{done:06d}.json")
    run.log_image("eval/images", grid, step=done)
    return metrics

"""Load rewards named by import path and call them with checks.

A reward is a callable `(images [B, 3, H, W] in [0, 1], prompts: list[str], metadata: list[dict])
-> scores [B]`. A config names it as 'module:name'; `name` is either the reward itself or a
factory that returns it: called with the config's `reward.kwargs` when it has an entry, when it is marked
`is_reward_factory = True`, or with no arguments when all its parameters have defaults (the one rule of
shared.reward_calls.load_callable, which llmalign uses too). Problems are reported with the reward's name before training starts.

The loader, the deadline and the float conversion live in shared.reward_calls (llmalign's `build_reward` and GRPO
`score` use them too); they are imported here so that `flowalign.rewards.plugins` keeps naming them.
"""

from __future__ import annotations

import math
import sys

import torch

from shared.reward_calls import (
    ImageRewardFn,
    RewardError,
    RewardTimeout,
    GroupOutputError,
    call_with_deadline,  # noqa: F401 (re-exported for flowalign.rewards.server and users)
    import_path_problem,  # noqa: F401 (re-exported)
    is_groupwise,
    load_callable,
    score_groups,
    scores_as_floats,
    with_deadline,
)


def load_reward(path: str, kwargs: dict | None = None, timeout_s: float | None = None) -> ImageRewardFn:
    """Import 'module:name' and return the reward callable (calling the factory if it is one), by the loader both
    front ends share (shared.reward_calls.load_callable). With `timeout_s`, each call of the reward runs under that
    deadline (see `with_deadline`)."""
    return with_deadline(load_callable(path, kwargs, accepts=("images", "prompts", "metadata")), timeout_s)


def call_reward(
    name: str,
    fn: ImageRewardFn,
    images: torch.Tensor,
    prompts: list[str],
    metadata: list[dict],
    allow_nonfinite: bool = False,
    drop_timeouts: bool | None = None,
    groups: list[int] | None = None,
) -> torch.Tensor:
    """Call one reward and check its output: one float per image, finite unless `allow_nonfinite`
    (then None/NaN/inf come back as NaN, for the caller to drop). A call past the reward's deadline
    (`load_reward(..., timeout_s)`) is a RewardError, or with `drop_timeouts` (default: `allow_nonfinite`)
    a batch of NaN, with a warning on stderr. A groupwise reward (shared.reward_calls) is called once per group
    of `groups` (image i's group id) as fn(images [g, 3, H, W], prompt, metadata); without `groups` it is a
    RewardError (the caller scores images that are not groups). Videos [B, F, 3, H, W] are scored frame by frame
    and averaged (`_frame_averaged`)."""
    if images.ndim == 5:  # videos [B, F, 3, H, W]: an image reward scores each frame
        return _frame_averaged(name, fn, images, prompts, metadata, allow_nonfinite, drop_timeouts, groups)
    drop_timeouts = allow_nonfinite if drop_timeouts is None else drop_timeouts
    if groups is None and is_groupwise(fn):
        raise RewardError(
            f"reward '{name}' is groupwise (it compares the images of one prompt), but is asked to "
            "score images that are not a prompt's group"
        )
    try:
        scores = _call(fn, images, prompts, metadata, groups)
    except GroupOutputError as error:
        raise RewardError(f"reward '{name}' {error}") from None
    except RewardTimeout as error:
        message = f"reward '{name}' {error} (batch of {len(prompts)}, first prompt {prompts[0]!r})"
        if not drop_timeouts:
            raise RewardTimeout(f"{message}; raise reward.timeout_s or fix the reward") from None
        print(f"warning: {message}; its {len(prompts)} samples are dropped", file=sys.stderr, flush=True)
        return torch.full((len(prompts),), math.nan)  # [B] every sample dropped
    except Exception as error:
        raise RewardError(
            f"reward '{name}' raised {type(error).__name__}: {error} (batch of {len(prompts)}, "
            f"first prompt {prompts[0]!r})"
        ) from error
    try:
        scores, missing = scores_as_floats(scores)  # [B]
    except ValueError as error:
        raise RewardError(
            f"reward '{name}' {error} (batch of {len(prompts)}, first prompt {prompts[0]!r}); "
            "return one float (or None, dropped under reward.on_bad_score=drop) per image"
        ) from None
    if scores.numel() != len(prompts):
        raise RewardError(
            f"reward '{name}' returned {scores.numel()} scores for {len(prompts)} images; return one score per image"
        )
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad and allow_nonfinite:
        return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, float("nan")))
    if bad:
        values = [None if i in missing else scores[i].item() for i in bad[:3]]
        raise RewardError(
            f"reward '{name}' returned non-finite scores at positions {bad[:10]} "
            f"(prompts {[prompts[i] for i in bad[:3]]}); values {values}; fix the reward or set "
            "reward.on_bad_score=drop to drop and count such samples"
        )
    return scores


def _frame_averaged(
    name: str,
    fn: ImageRewardFn,
    videos: torch.Tensor,
    prompts: list[str],
    metadata: list[dict],
    allow_nonfinite: bool,
    drop_timeouts: bool | None,
    groups: list[int] | None,
) -> torch.Tensor:
    """A video's score under an image reward: the mean of its F frames' scores, [B]. The reward gets the B * F frames
    [B*F, 3, H, W] in one call, video-major, each with its video's prompt and metadata plus {"frame": f}; a groupwise
    reward gets frame f of every video of a group together (group id g * F + f). A frame the reward drops (NaN
    under allow_nonfinite) drops its video. A first form: temporal rewards (motion, consistency) need their own
    video reward."""
    batch, frames = videos.shape[:2]
    scores = call_reward(
        name,
        fn,
        videos.flatten(0, 1),  # [B*F, 3, H, W]
        [prompt for prompt in prompts for _ in range(frames)],
        [{**meta, "frame": f} for meta in metadata for f in range(frames)],
        allow_nonfinite,
        drop_timeouts,
        None if groups is None else [group * frames + f for group in groups for f in range(frames)],
    )  # [B*F]
    return scores.reshape(batch, frames).mean(dim=1)  # [B]


def _call(fn: ImageRewardFn, images: torch.Tensor, prompts: list[str], metadata: list[dict], groups):
    """The reward's raw output for the batch: one call, or for a groupwise reward one call per group."""
    if not is_groupwise(fn):
        return fn(images, prompts, metadata)
    return score_groups(
        groups, lambda members: fn(images[members], prompts[members[0]], [metadata[i] for i in members])
    )


def check_rewards_on_dummy_batch(
    rewards: dict[str, ImageRewardFn], images: torch.Tensor, prompts: list[str], allow_nonfinite: bool = False
) -> None:
    """Run each reward once on a small batch so a broken reward fails before training, not after a rollout.
    A timeout here stops the run even under drop: a reward that never answers has nothing to drop."""
    for name, fn in rewards.items():  # the batch as one group for a groupwise reward
        call_reward(name, fn, images, prompts, [{} for _ in prompts], allow_nonfinite, False, [0] * len(prompts))

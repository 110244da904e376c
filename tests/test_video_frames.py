"""The frame axis of video latents [B, C, F, h, w] and videos [B, F, 3, H, W] through the samplers, the image rewards
(scored per frame and averaged) and the evaluation grid (a frame strip per sample)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from flowalign import samplers
from flowalign.rewards.plugins import RewardError, call_reward
from flowalign.visuals import save_image_grid
from shared.reward_calls import groupwise


def test_sde_step_on_video_latents_is_the_step_on_their_elements():
    # The Flow-GRPO step is elementwise with a per-sample sigma: on [B, C, F, h, w] it equals the step on the same
    # numbers laid out [B, C*F, h, w], noise included (same generator, same element order), and the log-prob is the
    # mean over all C*F*h*w elements.
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 3, 5, 4, 4, generator=gen), torch.randn(2, 3, 5, 4, 4, generator=gen)
    sigma, sigma_next = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.3])
    video = samplers.sde_step_with_logprob(x, v, sigma, sigma_next, generator=torch.Generator().manual_seed(1))
    flat = samplers.sde_step_with_logprob(
        x.flatten(1, 2), v.flatten(1, 2), sigma, sigma_next, generator=torch.Generator().manual_seed(1)
    )
    assert video[0].shape == x.shape and video[1].shape == (2,) and video[3].shape == (2, 1, 1, 1, 1)
    assert_close(video[0].flatten(1, 2), flat[0], rtol=0, atol=0)
    assert_close(video[1], flat[1], rtol=0, atol=0)
    # By hand for sample 0: the Gaussian log-density of x' under (mean, std), averaged over its 240 elements.
    mean, std = video[2][0], float(video[3][0])
    by_hand = (-((video[0][0] - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean()
    assert_close(video[1][0], by_hand, rtol=1e-6, atol=1e-6)


def test_trajectory_keeps_the_frame_axis():
    x = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    sigmas = torch.tensor([1.0, 0.7, 0.3, 0.0])
    trajectory = samplers.sample_trajectory(lambda latents, sigma: -latents, x, sigmas, [0, 1])
    rows = trajectory.training_rows()
    assert trajectory.latents.shape == (3, 2, 3, 2, 4, 4) and rows["latents"].shape == (4, 3, 2, 4, 4)
    assert_close(rows["latents"][3], trajectory.latents[1, 1], rtol=0, atol=0)  # step-major: (step 1, sample 1)
    ode = samplers.sample_trajectory(lambda latents, sigma: -latents, x, sigmas, [])
    assert_close(ode.final, x * 1.3 * 1.4 * 1.3, rtol=1e-6, atol=1e-6)  # x + v dt = x (1 - dt), dt = -0.3, -0.4, -0.3


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))  # [N]


def videos_of_levels(levels):
    """[B, F, 3, 2, 2] videos whose frame f of video b is the constant levels[b][f]."""
    return torch.tensor(levels, dtype=torch.float32)[:, :, None, None, None].expand(-1, -1, 3, 2, 2).clone()


def test_an_image_reward_scores_each_frame_and_averages():
    videos = videos_of_levels([[0.1, 0.2, 0.6], [1.0, 0.0, 0.5]])
    seen = {}

    def recording(images, prompts, metadata):
        seen.update(count=len(images), prompts=prompts, frames=[m["frame"] for m in metadata])
        return brightness(images, prompts, metadata)

    scores = call_reward("brightness", recording, videos, ["a", "b"], [{}, {}])
    assert_close(scores, torch.tensor([0.3, 0.5]))  # (0.1 + 0.2 + 0.6) / 3, (1 + 0 + 0.5) / 3
    assert seen == {"count": 6, "prompts": ["a", "a", "a", "b", "b", "b"], "frames": [0, 1, 2, 0, 1, 2]}


def test_groupwise_rewards_compare_a_groups_videos_frame_by_frame():
    @groupwise
    def rank_in_group(images, prompt, metadata):
        return images.mean(dim=(1, 2, 3)).argsort().argsort().float()  # 0 = darkest frame among those given

    # Two videos of one group: at frames 0 and 1 video 1 is brighter, at frame 2 video 0 -> ranks (0, 0, 1), (1, 1, 0).
    videos = videos_of_levels([[0.1, 0.2, 0.9], [0.5, 0.6, 0.3]])
    scores = call_reward("rank", rank_in_group, videos, ["p", "p"], [{}, {}], groups=[0, 0])
    assert_close(scores, torch.tensor([1 / 3, 2 / 3]))


def test_a_dropped_frame_drops_its_video_and_counts_are_checked():
    def one_bad_frame(images, prompts, metadata):
        scores = brightness(images, prompts, metadata)
        scores[1] = float("nan")  # video 0, frame 1
        return scores

    videos = videos_of_levels([[0.1, 0.2], [0.3, 0.5]])
    scores = call_reward("bad", one_bad_frame, videos, ["a", "b"], [{}, {}], allow_nonfinite=True)
    assert math.isnan(scores[0]) and abs(float(scores[1]) - 0.4) < 1e-6
    with pytest.raises(RewardError, match="returned 1 scores for 4 images"):
        call_reward("short", lambda images, prompts, metadata: [0.0], videos, ["a", "b"], [{}, {}])


def test_grid_cells_of_videos_are_frame_strips(tmp_path):
    # 2 prompts x 1 seed, 3 frames of 4x4 pixels: each row is one strip of 3 frames, zoomed 64 / 12 -> 6x.
    videos = videos_of_levels([[0.0, 0.5, 1.0], [1.0, 0.0, 0.2]])
    videos = torch.nn.functional.interpolate(videos.flatten(0, 1), size=(4, 4)).reshape(2, 3, 3, 4, 4)
    save_image_grid(videos, rows=2, path=tmp_path / "grid.png")
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 4 * 6, 3 * 4 * 6, 3)
    cell = 4 * 6  # one frame, zoomed
    centres = [[int(grid[r * cell + cell // 2, f * cell + cell // 2, 0]) for f in range(3)] for r in range(2)]
    assert centres == [[0, 128, 255], [255, 0, 51]]  # round(255 * level)
    # The GIF beside it plays the grid frame by frame: frame f shows each sample's frame f in its cell.
    gif = Image.open(tmp_path / "grid.gif")
    assert gif.n_frames == 3 and gif.size == (4 * 16, 2 * 4 * 16)  # one 4x4 cell per row, zoomed 64 / 4 = 16x
    levels = []
    for f in range(3):
        gif.seek(f)
        rgb = np.asarray(gif.convert("RGB"))
        levels.append([int(rgb[r * 64 + 32, 32, 0]) for r in range(2)])
    assert levels == [[0, 255], [128, 0], [255, 51]]

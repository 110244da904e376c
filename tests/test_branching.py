import math

import pytest
import torch
from torch.testing import assert_close

from flowalign.samplers import (SlidingWindow, branch_group_ids, branch_rollout, euler_ode_step, noise_aware_weights,
                                select_branch_steps)
from shared.advantages import group_advantages

SIGMAS = torch.tensor([1.0, 0.8, 0.5, 0.25, 0.0])


def velocity(x, sigma):
    return 0.1 * x + sigma


def ode_from(x, start):
    for step in range(start, 4):
        x = euler_ode_step(x, velocity(x, float(SIGMAS[step])), SIGMAS[step], SIGMAS[step + 1])
    return x


def test_branch_bookkeeping_and_rewards_land_on_their_step():
    initial = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))  # 3 prompts
    rollout = branch_rollout(velocity, initial, SIGMAS, [0, 2], num_branches=2, generator=torch.Generator().manual_seed(1))
    assert rollout.prompt_index.tolist() == [0, 1, 2, 0, 1, 2] * 2
    assert rollout.branch_step.tolist() == [0] * 6 + [2] * 6
    # the state at the branch step is the shared ODE prefix; the final is the ODE continuation of the SDE sample
    prefix = [initial]
    for step in range(3):
        prefix.append(euler_ode_step(prefix[-1], velocity(prefix[-1], float(SIGMAS[step])), SIGMAS[step], SIGMAS[step + 1]))
    for row in range(12):
        k, b = rollout.branch_step[row].item(), rollout.prompt_index[row].item()
        assert_close(rollout.latents[row], prefix[k][b])
        assert_close(rollout.final[row], ode_from(rollout.next_latents[row:row + 1], k + 1)[0])
    assert not torch.equal(rollout.next_latents[0], rollout.next_latents[3])  # the K branches differ
    assert rollout.nfe == 3 + (4 - 0 - 1) + (4 - 2 - 1)  # prefix to step 2, then each branch's ODE tail
    # rewards: each (prompt, step) is its own group of K = 2 members
    ids = branch_group_ids(rollout.prompt_index, rollout.branch_step, num_steps=4)
    rewards = torch.arange(12, dtype=torch.float32)  # row r gets reward r
    advantages = group_advantages(rewards, ids, scale="none")
    # group (prompt 0, step 0) = rows 0 and 3: rewards 0, 3 -> -1.5, +1.5; (prompt 1, step 2) = rows 7, 10
    assert advantages[[0, 3, 7, 10]].tolist() == [-1.5, 1.5, -1.5, 1.5]
    assert len(set(ids.tolist())) == 6


def test_select_branch_steps():
    assert select_branch_steps(5) == [0, 1, 2, 3]  # the last step (into sigma 0) cannot branch
    assert select_branch_steps(5, "subset", subset=[3, 1]) == [1, 3]
    window = SlidingWindow(num_steps=4, window_size=2, shift_interval=1)
    assert select_branch_steps(5, "window", window=window.steps(1)) == [1, 2]
    with pytest.raises(ValueError, match="the last step cannot branch"):
        select_branch_steps(5, "subset", subset=[4])


def test_noise_aware_weights_by_hand():
    # step 1: sigma 0.8 -> 0.5: sigma_t = 0.7 sqrt(0.8 / 0.2) = 1.4, std = 1.4 sqrt(0.3)
    # step 2: sigma 0.5 -> 0.25: sigma_t = 0.7, std = 0.7 * 0.5 = 0.35; weights = std / mean(std)
    stds = torch.tensor([1.4 * math.sqrt(0.3), 0.35])
    assert_close(noise_aware_weights(SIGMAS, [1, 2], 0.7), stds / stds.mean())
    assert_close(noise_aware_weights(SIGMAS, [1, 2], 0.7).mean(), torch.tensor(1.0))

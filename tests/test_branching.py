import math

import pytest
import torch
from torch.testing import assert_close

from flowalign.samplers import (
    SDEConventions,
    SlidingWindow,
    branch_advantages,
    branch_group_ids,
    branch_rollout,
    euler_ode_step,
    noise_aware_weights,
    sde_step_with_logprob,
    select_branch_steps,
)
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
    rollout = branch_rollout(
        velocity, initial, SIGMAS, [2, 0], num_branches=2, generator=torch.Generator().manual_seed(1)
    )
    # rows: (step 0: branch 0 prompts 0..2, branch 1 prompts 0..2), then the same for step 2
    assert rollout.prompt_index.tolist() == [0, 1, 2, 0, 1, 2] * 2
    assert rollout.branch_step.tolist() == [0] * 6 + [2] * 6
    assert rollout.branch_index.tolist() == [0, 0, 0, 1, 1, 1] * 2
    # the state at the branch step is the shared ODE prefix; the final is the ODE continuation of the SDE sample
    prefix = [initial]
    for step in range(3):
        x = prefix[-1]
        prefix.append(euler_ode_step(x, velocity(x, float(SIGMAS[step])), SIGMAS[step], SIGMAS[step + 1]))
    for row in range(12):
        k, b = rollout.branch_step[row].item(), rollout.prompt_index[row].item()
        assert_close(rollout.latents[row], prefix[k][b])
        assert_close(rollout.final[row], ode_from(rollout.next_latents[row : row + 1], k + 1)[0])
    # the recorded old log-probs are those of the SDE step from the prefix state
    rows = slice(6, 12)
    _, log_prob, _, _ = sde_step_with_logprob(
        rollout.latents[rows], velocity(rollout.latents[rows], 0.5), 0.5, 0.25, prev_sample=rollout.next_latents[rows]
    )
    assert_close(log_prob, rollout.log_probs[rows])
    assert not torch.equal(rollout.next_latents[0], rollout.next_latents[3])  # the K branches differ
    assert rollout.nfe == 3 + (4 - 0 - 1) + (4 - 2 - 1)  # prefix to step 2, then each branch's ODE tail
    # rewards: each (prompt, step) is its own group of K = 2 members
    ids = branch_group_ids(rollout.prompt_index, rollout.branch_step, num_steps=4)
    rewards = torch.arange(12, dtype=torch.float32)  # row r gets reward r
    advantages = group_advantages(rewards, ids, scale="none")
    # group (prompt 0, step 0) = rows 0 and 3: rewards 0, 3 -> -1.5, +1.5; (prompt 1, step 2) = rows 7, 10
    assert advantages[[0, 3, 7, 10]].tolist() == [-1.5, 1.5, -1.5, 1.5]
    assert len(set(ids.tolist())) == 6


def test_rewards_of_a_predictable_rollout_land_on_prompt_and_step():
    """v = 0 and a = 0 leave every latent unchanged, so each final equals its prompt's initial latent; the calls
    show the prefix on [B] and each branch tail on [K*B] rows."""
    initial = torch.tensor([[10.0], [20.0]])  # prompt b is recognisable by its latent
    calls = []

    def recording(x, sigma):
        calls.append((x.shape[0], sigma))
        return torch.zeros_like(x)

    rollout = branch_rollout(recording, initial, SIGMAS, [1, 2], num_branches=3, noise_level=0.0)
    assert_close(rollout.final.flatten(), 10.0 * (rollout.prompt_index + 1).float())
    assert torch.equal(rollout.log_probs, torch.zeros(12))  # a = 0: deterministic, log-prob 0
    assert [c[0] for c in calls] == [2, 2, 2] + [6, 6] + [6]
    # prefix at steps 0, 1, 2; branch k = 1 finishes with steps 2, 3; branch k = 2 with step 3
    assert_close(torch.tensor([c[1] for c in calls]), SIGMAS[[0, 1, 2] + [2, 3] + [3]])
    assert rollout.nfe == len(calls)


def test_branch_advantages_by_hand():
    # two prompts x two steps x K = 3; rewards of (prompt 0, step 1) are 1, 2, 6:
    # mean 3, deviations -2, -1, 3, population std sqrt(14 / 3) = 2.1602469
    # A = dev / (2.1602469 + 1e-4) = -0.9257772, -0.4628886, 1.3886659
    prompt_index = torch.tensor([0, 1, 0, 1, 0, 1] * 2)
    branch_step = torch.tensor([1] * 6 + [3] * 6)
    rewards = torch.tensor([1.0, 5.0, 2.0, 5.0, 6.0, 5.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    advantages = branch_advantages(rewards, prompt_index, branch_step)
    assert_close(advantages[[0, 2, 4]], torch.tensor([-0.9257772, -0.4628886, 1.3886659]))
    assert torch.equal(advantages[[1, 3, 5]], torch.zeros(3))  # (prompt 1, step 1): all equal, no signal
    # (prompt 1, step 3): rewards 1, 0, 0: mean 1/3, std sqrt(2) / 3 = 0.4714045 -> (2/3) / 0.4715045 = 1.4139
    assert_close(advantages[[7, 9, 11]], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (math.sqrt(2) / 3 + 1e-4))
    assert torch.equal(advantages[[6, 8, 10]], torch.zeros(3))  # (prompt 0, step 3)
    # the same as group_advantages over explicit (prompt, step) ids
    ids = torch.tensor([0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3])
    assert_close(advantages, group_advantages(rewards, ids, scale="group"))


def test_select_branch_steps():
    assert select_branch_steps(5) == [0, 1, 2, 3]  # the last step (into sigma 0) cannot branch
    assert select_branch_steps(5, "subset", subset=[3, 1]) == [1, 3]
    window = SlidingWindow(num_steps=4, window_size=2, shift_interval=1)
    assert select_branch_steps(5, "window", window=window.steps(1)) == [1, 2]
    with pytest.raises(ValueError, match="the last step cannot branch"):
        select_branch_steps(5, "subset", subset=[4])
    with pytest.raises(ValueError, match="needs a non-empty subset"):
        select_branch_steps(5, "subset")
    with pytest.raises(ValueError, match="branch mode must be all, subset or window"):
        select_branch_steps(5, "every")
    with pytest.raises(ValueError, match="the last step cannot branch"):
        branch_rollout(velocity, torch.zeros(1, 2), SIGMAS, [3, 4], num_branches=2)
    with pytest.raises(ValueError, match="num_branches must be >= 1"):
        branch_rollout(velocity, torch.zeros(1, 2), SIGMAS, [1], num_branches=0)


def test_noise_aware_weights_by_hand():
    # 3-step schedule [1.0, 0.6, 0.3, 0.0], a = 0.7; noisy steps (all but the last) 0 and 1
    # step 0 (official sigma_one): sigma_t = 0.7 sqrt(1 / (1 - 0.6)), std = sigma_t sqrt(0.4) = 0.7 exactly
    # step 1: sigma = 0.6: sigma_t = 0.7 sqrt(0.6 / 0.4) = 0.8573214, std = sigma_t sqrt(0.3) = 0.4695743
    # step 2: sigma = 0.3: sigma_t = 0.7 sqrt(0.3 / 0.7) = 0.4582576, std = sigma_t sqrt(0.3) = 0.2509980
    # schedule normaliser: mean std of steps 0, 1 = 0.5847871, whichever steps are trained
    sigmas = torch.tensor([1.0, 0.6, 0.3, 0.0])
    assert_close(noise_aware_weights(sigmas, [0, 1], 0.7), torch.tensor([1.1970168, 0.8029832]))
    assert_close(noise_aware_weights(sigmas, [1], 0.7), torch.tensor([0.8029832]))  # fixed: not renormalised
    assert_close(noise_aware_weights(sigmas, [0, 1, 2], 0.7), torch.tensor([1.1970168, 0.8029832, 0.4292126]))
    # trained_steps (the first form): renormalised over the trained steps; equal when all noisy steps train
    assert_close(noise_aware_weights(sigmas, [1], 0.7, normalization="trained_steps"), torch.tensor([1.0]))
    assert_close(
        noise_aware_weights(sigmas, [0, 1], 0.7, normalization="trained_steps"), torch.tensor([1.1970168, 0.8029832])
    )
    # the first form in full (next_sigma at sigma = 1: sigma_t = 0.7 sqrt(0.6 / 0.4), std 0.5422177):
    # steps [0, 1]: mean std 0.5058960 -> 1.0717968, 0.9282032; [0, 1, 2]: mean 0.4209300 -> 1.2881422, ...
    first_form = SDEConventions(sigma_one="next_sigma")
    assert_close(
        noise_aware_weights(sigmas, [0, 1], 0.7, normalization="trained_steps", conventions=first_form),
        torch.tensor([1.0717968, 0.9282032]),
    )
    assert_close(
        noise_aware_weights(sigmas, [0, 1, 2], 0.7, normalization="trained_steps", conventions=first_form),
        torch.tensor([1.2881422, 1.1155639, 0.5962940]),
    )
    # CPS: std = sigma_next sin(a pi / 2), proportional to sigma_next: 0.6, 0.3 (mean 0.45) -> 4/3, 2/3
    assert_close(noise_aware_weights(sigmas, [0, 1], 0.7, "cps"), torch.tensor([4 / 3, 2 / 3]))
    assert_close(noise_aware_weights(sigmas, [1], 0.7, "cps"), torch.tensor([2 / 3]))
    with pytest.raises(ValueError, match="without noise"):
        noise_aware_weights(sigmas, [1, 2], 0.7, "cps")  # CPS's last step has std 0
    with pytest.raises(ValueError, match="steps must be a non-empty list in 0..2"):
        noise_aware_weights(sigmas, [3])
    with pytest.raises(ValueError, match="normalization must be one of"):
        noise_aware_weights(sigmas, [0], normalization="batch")


def test_noise_aware_weights_reproduce_tempflows_constant_on_sd3():
    """TempFlow's released code weights step k's loss by 2.25 * std_k; the schedule normalisation gives
    1 / (mean std of steps 0..8) = 2.2522 on SD3's 10-step shift-3 schedule at a = 0.7 (the embedded model's too)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowalign.toy import SCHEDULER_SHIFT

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.double()
    weights = noise_aware_weights(sigmas, [2, 5], 0.7)  # any subset: the same per-step weights
    dt = sigmas[1:] - sigmas[:-1]
    sigma_t = 0.7 * torch.sqrt(sigmas[:-1] / (1 - torch.where(sigmas[:-1] == 1, sigmas[1], sigmas[:-1])))
    std = sigma_t * torch.sqrt(-dt)  # [10] as the official step computes it
    assert abs(1 / float(std[:9].mean()) - 2.2522) < 1e-4
    assert_close(weights, std[[2, 5]] / std[:9].mean())

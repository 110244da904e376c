import math

import pytest
import torch

from flowalign.samplers import (SlidingWindow, compressed_sigmas, dpm_solver_2m_step, euler_ode_step,
                                sample_trajectory, sde_step_with_logprob)

SIGMAS = torch.tensor([1.0, 0.8, 0.5, 0.25, 0.0])


def toy_velocity(x, sigma):
    return 0.5 * x + sigma  # any smooth field: the samplers never look inside


def test_euler_step_by_hand():
    x, v = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    # dt = 0.6 - 0.8 = -0.2: x' = [1 - 0.1, 2 + 0.2]
    torch.testing.assert_close(euler_ode_step(x, v, 0.8, 0.6), torch.tensor([[0.9, 2.2]]))


@pytest.mark.parametrize("kind", ["flow_grpo", "cps"])
def test_noise_level_zero_is_the_ode_step(kind):
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    v = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    for sigma, sigma_next in [(1.0, 0.8), (0.8, 0.5), (0.25, 0.0)]:
        x_next, log_prob, mean, std = sde_step_with_logprob(x, v, sigma, sigma_next, noise_level=0.0, kind=kind)
        torch.testing.assert_close(x_next, euler_ode_step(x, v, sigma, sigma_next), rtol=1e-6, atol=1e-6)
        assert torch.equal(log_prob, torch.zeros(3)) and float(std.max()) == 0.0


def test_flow_grpo_mean_and_std_by_hand():
    # sigma = 0.5, sigma_next = 0.25, a = 0.7: sigma_t = 0.7 * sqrt(0.5 / 0.5) = 0.7, dt = -0.25
    # mean = x + v dt + 0.49 / 1.0 * (x + 0.5 v) dt = 2 - 0.25 - 0.49 * 2.5 * 0.25 = 1.44375 for x = 2, v = 1
    # std = 0.7 * sqrt(0.25) = 0.35
    x, v = torch.full((1, 1), 2.0), torch.ones(1, 1)
    _, _, mean, std = sde_step_with_logprob(x, v, 0.5, 0.25, noise_level=0.7)
    torch.testing.assert_close(mean, torch.tensor([[1.44375]]))
    torch.testing.assert_close(std.flatten(), torch.tensor([0.35]))
    # at sigma = 1 the ratio uses sigma_next: sigma_t = 0.7 * sqrt(0.8 / 0.2) = 1.4, std = 1.4 * sqrt(0.2)
    _, _, mean, std = sde_step_with_logprob(x, v, 1.0, 0.8, noise_level=0.7)
    torch.testing.assert_close(std.flatten(), torch.tensor([1.4 * math.sqrt(0.2)]))
    # mean = 2 - 0.2 + 1.96 / 2 * (2 + 0) * (-0.2) = 1.408
    torch.testing.assert_close(mean, torch.tensor([[1.408]]))


def test_cps_by_hand():
    # sigma = 0.5, sigma_next = 0.25, a = 0.5: std = 0.25 sin(pi/4) = 0.1767767; x = 2, v = 1
    # x0_hat = 2 - 0.5 = 1.5, x1_hat = 2 + 0.5 = 2.5; sqrt(0.0625 - 0.03125) = 0.1767767
    # mean = 0.75 * 1.5 + 0.1767767 * 2.5 = 1.5669417
    _, _, mean, std = sde_step_with_logprob(torch.full((1, 1), 2.0), torch.ones(1, 1), 0.5, 0.25, 0.5, kind="cps")
    torch.testing.assert_close(mean, torch.tensor([[1.5669417]]))
    torch.testing.assert_close(std.flatten(), torch.tensor([0.1767767]))


@pytest.mark.parametrize("kind", ["flow_grpo", "cps"])
def test_log_prob_matches_torch_normal(kind):
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    v = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.7, 0.5, 0.3])  # per-sample noise levels
    sigma_next = sigma - 0.1
    sample, log_prob, mean, std = sde_step_with_logprob(x, v, sigma, sigma_next, 0.7, kind,
                                                        generator=torch.Generator().manual_seed(2))
    reference = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, reference)
    # recomputing a recorded step with prev_sample gives the same log-prob and a gradient through the mean
    v_param = v.clone().requires_grad_(True)
    _, again, _, _ = sde_step_with_logprob(x, v_param, sigma, sigma_next, 0.7, kind, prev_sample=sample)
    torch.testing.assert_close(again, log_prob)
    again.sum().backward()
    assert v_param.grad.abs().sum() > 0


def test_full_window_equals_plain_sde_loop_and_empty_window_equals_ode():
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    trajectory = sample_trajectory(toy_velocity, x0, SIGMAS, [0, 1, 2, 3], generator=torch.Generator().manual_seed(5))
    generator, x, log_probs = torch.Generator().manual_seed(5), x0, []
    for i in range(4):
        x, log_prob, _, _ = sde_step_with_logprob(x, toy_velocity(x, float(SIGMAS[i])), float(SIGMAS[i]),
                                                  float(SIGMAS[i + 1]), generator=generator)
        log_probs.append(log_prob)
    torch.testing.assert_close(trajectory.final, x)
    torch.testing.assert_close(trajectory.log_probs, torch.stack(log_probs))
    assert trajectory.nfe == 4 and trajectory.sde_steps == [0, 1, 2, 3]

    ode = sample_trajectory(toy_velocity, x0, SIGMAS, [])
    x = x0
    for i in range(4):
        x = euler_ode_step(x, toy_velocity(x, float(SIGMAS[i])), SIGMAS[i], SIGMAS[i + 1])
    torch.testing.assert_close(ode.final, x)
    assert torch.equal(ode.log_probs, torch.zeros(4, 2))
    # a window: SDE states recorded where the window is, ODE elsewhere
    mixed = sample_trajectory(toy_velocity, x0, SIGMAS, [1, 2], generator=torch.Generator().manual_seed(5))
    assert (mixed.log_probs[[0, 3]] == 0).all() and (mixed.log_probs[[1, 2]] != 0).all()
    torch.testing.assert_close(mixed.latents[1], ode.latents[1])  # identical up to the window


def test_sliding_window_schedules():
    window = SlidingWindow(num_steps=9, window_size=4, stride=2, shift_interval=10)
    assert [window.start(i) for i in (0, 9, 10, 25, 1000)] == [0, 0, 2, 4, 5]  # capped at T - w = 5
    assert window.steps(10) == [2, 3, 4, 5]
    assert SlidingWindow(9, 4, mode="frozen").start(500) == 0
    starts = {SlidingWindow(9, 4, mode="random").start(0, torch.Generator().manual_seed(s)) for s in range(50)}
    assert starts <= set(range(6)) and len(starts) > 3
    with pytest.raises(ValueError, match="window_size 10 must be in 1..9"):
        SlidingWindow(9, 10)


def test_compressed_schedule_keeps_prefix_and_endpoints():
    sigmas = torch.linspace(1, 0, 11)  # 10 steps
    compressed = compressed_sigmas(sigmas, start_index=4, ratio=0.5)  # tail of 6 steps -> 3
    assert compressed.numel() == 4 + 3 + 1
    torch.testing.assert_close(compressed[:5], sigmas[:5])
    torch.testing.assert_close(compressed[4:], torch.tensor([0.6, 0.4, 0.2, 0.0]))


def gaussian_velocity(mu, s):
    """Exact marginal velocity for x0 ~ N(mu, s^2), noise ~ N(0, 1), x = (1 - t) x0 + t e (t = sigma).

    x is Gaussian with mean m = (1-t) mu and variance V = (1-t)^2 s^2 + t^2. Jointly Gaussian, so
    E[e - x0 | x] = E[e - x0] + Cov(e - x0, x) / V * (x - m), with E[e - x0] = -mu and
    Cov(e - x0, x) = t - (1 - t) s^2. Hence v(x, t) = -mu + (t - (1-t) s^2) / V * (x - m)."""

    def velocity(x, t):
        t = torch.as_tensor(t, dtype=x.dtype)
        variance = (1 - t) ** 2 * s**2 + t**2
        return -mu + (t - (1 - t) * s**2) / variance * (x - (1 - t) * mu)

    return velocity


def test_second_order_solver_converges_faster_than_euler():
    velocity = gaussian_velocity(2.0, 0.5)
    x = torch.randn(256, 1, generator=torch.Generator().manual_seed(0))
    shifted = lambda n: 3 * torch.linspace(1, 0, n + 1) / (1 + 2 * torch.linspace(1, 0, n + 1))  # noqa: E731
    exact = sample_trajectory(velocity, x, shifted(2000), []).final
    euler = [(sample_trajectory(velocity, x, shifted(n), []).final - exact).abs().max() for n in (10, 20)]
    flash = [(sample_trajectory(velocity, x, shifted(n), [], flash_ratio=1.0).final - exact).abs().max() for n in (10, 20)]
    assert 1.6 < euler[0] / euler[1] < 2.5  # first order: error halves when steps double
    assert flash[0] / flash[1] > 3.0  # second order: error roughly quarters
    assert flash[1] < euler[1] / 3  # measured: about 4.7x smaller at 20 steps
    # the first-order multistep step is exactly Euler
    v = velocity(x, 0.5)
    torch.testing.assert_close(dpm_solver_2m_step(x, v, 0.5, 0.3, None), euler_ode_step(x, v, 0.5, 0.3))


def test_flash_uses_fewer_evaluations_after_the_window():
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1, 0, 11)
    plain = sample_trajectory(toy_velocity, x0, sigmas, [1, 2], generator=torch.Generator().manual_seed(1))
    flash = sample_trajectory(toy_velocity, x0, sigmas, [1, 2], generator=torch.Generator().manual_seed(1),
                              flash_ratio=0.4)
    assert plain.nfe == 10 and flash.nfe == 3 + round(7 * 0.4)
    torch.testing.assert_close(flash.log_probs[:3], plain.log_probs[:3])  # the window is untouched


@pytest.mark.parametrize("kind, noise_level", [("flow_grpo", 0.7), ("flow_grpo", 1.0), ("flow_grpo", 0.0)])
def test_sde_sampling_keeps_the_gaussian_marginals(kind, noise_level):
    """With the exact velocity of N(mu, s^2) data, Flow-GRPO SDE samples end with mean mu and std s.
    (CPS injects a fixed fraction of noise per step, not one that shrinks with the step size, so it is
    not a discretisation of a marginal-preserving SDE and is left out here.)"""
    mu, s = 1.5, 0.5
    x = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0))
    steps = torch.linspace(1, 0, 201)
    sigmas = 3 * steps / (1 + 2 * steps)  # SD3's shift 3 schedule
    final = sample_trajectory(gaussian_velocity(mu, s), x, sigmas, list(range(199)), noise_level=noise_level,
                              kind=kind, generator=torch.Generator().manual_seed(1)).final
    assert abs(final.mean().item() - mu) < 0.03
    assert abs(final.std().item() - s) < 0.03

import math

import pytest
import torch
from torch.testing import assert_close

from flowalign.samplers import (
    OFFICIAL,
    SDEConventions,
    SlidingWindow,
    compressed_sigmas,
    convention_factors,
    dpm_solver_2m_step,
    euler_ode_step,
    kl_std,
    sample_trajectory,
    sde_step_with_logprob,
)

SIGMAS = torch.tensor([1.0, 0.8, 0.5, 0.25, 0.0])


def toy_velocity(x, sigma):
    return 0.5 * x + sigma  # any smooth field: the samplers never look inside


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def gaussian_velocity(mu, s):
    """Exact marginal velocity for x0 ~ N(mu, s^2), noise e ~ N(0, 1), x = (1 - t) x0 + t e (t = sigma).

    The model's target is v = e - x0, and the marginal velocity is v(x, t) = E[e - x0 | x_t = x].
    x_t is Gaussian with mean m = (1 - t) mu and variance V = (1 - t)^2 s^2 + t^2. (e - x0, x_t) are
    jointly Gaussian, so E[e - x0 | x] = E[e - x0] + Cov(e - x0, x_t) / V * (x - m) with E[e - x0] = -mu and
    Cov(e - x0, x_t) = Cov(e, t e) - Cov(x0, (1 - t) x0) = t - (1 - t) s^2. Hence
        v(x, t) = -mu + (t - (1 - t) s^2) / V * (x - m).
    Its ODE moves x_1 = e along x_t = m(t) + sqrt(V(t)) e (d/dt of that is -mu + V'/(2V) (x - m), and
    V'/2 = t - (1 - t) s^2), so the exact ODE endpoint is x_0 = mu + s * e."""

    def velocity(x, t):
        t = torch.as_tensor(t, dtype=x.dtype)
        variance = (1 - t) ** 2 * s**2 + t**2
        return -mu + (t - (1 - t) * s**2) / variance * (x - (1 - t) * mu)

    return velocity


# ------------------------------------------------------------------------------ single steps
def test_euler_step_by_hand():
    x, v = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    # dt = 0.6 - 0.8 = -0.2: x' = [1 - 0.1, 2 + 0.2]
    assert_close(euler_ode_step(x, v, 0.8, 0.6), torch.tensor([[0.9, 2.2]]))


@pytest.mark.parametrize("kind", ["flow_grpo", "cps"])
def test_noise_level_zero_is_the_ode_step(kind):
    """a = 0: std = 0, so x' = mean = the Euler step and log_prob is defined as 0 (no density to score)."""
    x, v = randn(3, 4, 2, 2, seed=0), randn(3, 4, 2, 2, seed=1)
    for sigma, sigma_next in [(1.0, 0.8), (0.8, 0.5), (0.25, 0.0)]:
        x_next, log_prob, mean, std = sde_step_with_logprob(
            x, v, sigma, sigma_next, noise_level=0.0, kind=kind, generator=torch.Generator().manual_seed(3)
        )
        assert_close(x_next, euler_ode_step(x, v, sigma, sigma_next), rtol=1e-6, atol=1e-6)
        assert torch.equal(x_next, mean)
        assert torch.equal(log_prob, torch.zeros(3)) and float(std.abs().max()) == 0.0
        # recomputing with prev_sample keeps the convention
        _, again, _, _ = sde_step_with_logprob(x, v, sigma, sigma_next, 0.0, kind, prev_sample=x_next)
        assert torch.equal(again, torch.zeros(3))


def test_last_step_noise_differs_between_kinds():
    # into sigma_next = 0 from sigma = 0.25: CPS std = 0 * sin(.) = 0 (deterministic, log_prob 0);
    # Flow-GRPO std = 0.7 sqrt(0.25 / 0.75) sqrt(0.25) = 0.2020726 (still stochastic)
    x, v = randn(2, 3, seed=0), randn(2, 3, seed=1)
    _, log_prob, _, std = sde_step_with_logprob(x, v, 0.25, 0.0, 0.7, "cps")
    assert torch.equal(log_prob, torch.zeros(2)) and float(std.max()) == 0.0
    _, log_prob, _, std = sde_step_with_logprob(x, v, 0.25, 0.0, 0.7, "flow_grpo")
    assert_close(std.flatten(), torch.full((2,), 0.7 * math.sqrt(1 / 3) * 0.5))
    assert (log_prob != 0).all()


def test_flow_grpo_mean_and_std_by_hand():
    # sigma = 0.5, sigma_next = 0.25, a = 0.7: sigma_t = 0.7 * sqrt(0.5 / 0.5) = 0.7, dt = -0.25
    # mean = x + v dt + 0.49 / 1.0 * (x + 0.5 v) dt = 2 - 0.25 - 0.49 * 2.5 * 0.25 = 1.44375 for x = 2, v = 1
    # std = 0.7 * sqrt(0.25) = 0.35
    x, v = torch.full((1, 1), 2.0), torch.ones(1, 1)
    _, _, mean, std = sde_step_with_logprob(x, v, 0.5, 0.25, noise_level=0.7)
    assert_close(mean, torch.tensor([[1.44375]]))
    assert_close(std.flatten(), torch.tensor([0.35]))
    # at sigma = 1 (official, the default): sigma_t = 0.7 * sqrt(1 / (1 - 0.8)) = 0.7 sqrt(5), sigma_t^2 = 2.45,
    # std = 0.7 sqrt(5) sqrt(0.2) = 0.7; mean = 2 - 0.2 + 2.45 / 2 * (2 + 0) * (-0.2) = 1.31
    _, _, mean, std = sde_step_with_logprob(x, v, 1.0, 0.8, noise_level=0.7)
    assert_close(std.flatten(), torch.tensor([0.7]))
    assert_close(mean, torch.tensor([[1.31]]))
    # the first form (next_sigma): sigma_t = 0.7 * sqrt(0.8 / 0.2) = 1.4, std = 1.4 * sqrt(0.2)
    # mean = 2 - 0.2 + 1.96 / 2 * (2 + 0) * (-0.2) = 1.408
    _, _, mean, std = sde_step_with_logprob(
        x, v, 1.0, 0.8, noise_level=0.7, conventions=SDEConventions(sigma_one="next_sigma")
    )
    assert_close(std.flatten(), torch.tensor([1.4 * math.sqrt(0.2)]))
    assert_close(mean, torch.tensor([[1.408]]))
    # below sigma = 1 the two agree
    for rule in ("flow_grpo", "next_sigma"):
        _, _, mean, std = sde_step_with_logprob(x, v, 0.5, 0.25, 0.7, conventions=SDEConventions(sigma_one=rule))
        assert_close(std.flatten(), torch.tensor([0.35]))


def test_cps_by_hand():
    # sigma = 0.5, sigma_next = 0.25, a = 0.5: std = 0.25 sin(pi/4) = 0.1767767; x = 2, v = 1
    # x0_hat = 2 - 0.5 = 1.5, x1_hat = 2 + 0.5 = 2.5; sqrt(0.0625 - 0.03125) = 0.1767767
    # mean = 0.75 * 1.5 + 0.1767767 * 2.5 = 1.5669417
    _, _, mean, std = sde_step_with_logprob(torch.full((1, 1), 2.0), torch.ones(1, 1), 0.5, 0.25, 0.5, kind="cps")
    assert_close(mean, torch.tensor([[1.5669417]]))
    assert_close(std.flatten(), torch.tensor([0.1767767]))


def test_cps_log_prob_official_and_gaussian_by_hand():
    # the CPS step of test_cps_by_hand (mean 1.5669417, std 0.25 sin(pi/4) = 0.1767767, std^2 = 1/32), x' = 1.7:
    # official: -(1.7 - 1.5669417)^2 = -0.0177045; gaussian: -0.0177045 * 16 - log(0.1767767) - log(2 pi)/2 = 0.5306572
    x, v, x_next = torch.full((1, 1), 2.0), torch.ones(1, 1), torch.full((1, 1), 1.7)
    _, official, _, _ = sde_step_with_logprob(x, v, 0.5, 0.25, 0.5, kind="cps", prev_sample=x_next)
    _, gaussian, _, _ = sde_step_with_logprob(
        x, v, 0.5, 0.25, 0.5, kind="cps", prev_sample=x_next, conventions=GAUSSIAN_CPS
    )
    assert_close(official, torch.tensor([-0.0177045]))
    assert_close(gaussian, torch.tensor([0.5306572]))
    # log-ratios between two velocities: the density's is the official one times 1 / (2 std^2) = 16
    other = torch.full((1, 1), 1.3)
    _, official_other, _, _ = sde_step_with_logprob(x, other, 0.5, 0.25, 0.5, kind="cps", prev_sample=x_next)
    _, gaussian_other, _, _ = sde_step_with_logprob(
        x, other, 0.5, 0.25, 0.5, kind="cps", prev_sample=x_next, conventions=GAUSSIAN_CPS
    )
    assert_close(gaussian_other - gaussian, 16 * (official_other - official))
    assert float((official_other - official).abs()) > 1e-3


def test_cps_refuses_noise_level_above_one():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"CPS needs noise_level in \[0, 1\]"):
        sde_step_with_logprob(x, x, 0.5, 0.25, noise_level=1.2, kind="cps")
    sde_step_with_logprob(x, x, 0.5, 0.25, noise_level=1.2, kind="flow_grpo")  # the Flow-GRPO step takes it
    with pytest.raises(ValueError, match="sigma_one must be flow_grpo or next_sigma"):
        SDEConventions(sigma_one="sigma_next")


def test_kl_forms_by_hand():
    # Flow-GRPO step 0.5 -> 0.25, a = 0.7: sigma_t = 0.7, std = 0.35; means 0.1 apart in every element
    # exact_step: 0.01 / (2 * 0.35^2) = 0.0408163; flow_grpo (official: / (2 sigma_t^2)): 0.01 / 0.98 = 0.0102041
    from shared.kl import gaussian_mean_kl

    mean, ref = torch.full((2, 3, 1, 1), 0.4), torch.full((2, 3, 1, 1), 0.3)
    std = torch.full((2, 1, 1, 1), 0.35)
    sigma, sigma_next = torch.full((2,), 0.5), torch.full((2,), 0.25)
    exact = gaussian_mean_kl(mean, ref, kl_std(std, sigma, sigma_next, "flow_grpo", "exact_step"))
    official = gaussian_mean_kl(mean, ref, kl_std(std, sigma, sigma_next, "flow_grpo", "flow_grpo"))
    assert_close(exact, torch.full((2,), 0.0408163))
    assert_close(official, torch.full((2,), 0.0102041))
    assert_close(exact * 0.25, official)  # exact = official / (-dt)
    # CPS: the official code's std_dev_t is the step's std, so both forms give the exact KL
    cps_std = torch.full((2, 1, 1, 1), 0.25 * math.sin(0.35 * math.pi))
    for form in ("flow_grpo", "exact_step"):
        assert torch.equal(kl_std(cps_std, sigma, sigma_next, "cps", form), cps_std)
    with pytest.raises(ValueError, match="KL form must be one of"):
        kl_std(std, sigma, sigma_next, "flow_grpo", "k3")


def sd3_sigmas(num_steps: int = 10) -> torch.Tensor:
    """SD3's scheduler (FlowMatchEulerDiscreteScheduler, 1000 training steps, shift 3), which the embedded model
    uses too (flowalign.toy builds it with SCHEDULER_SHIFT = 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowalign.toy import SCHEDULER_SHIFT

    assert SCHEDULER_SHIFT == 3.0
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.double()  # [T + 1]


def test_convention_factors_on_the_sd3_10_step_schedule():
    """The "Flow conventions" numbers (docs/conventions.md): on SD3's (and the embedded model's) 10-step shift-3
    schedule at a = 0.7, the CPS log-ratio of the last noisy step is 7900x larger under the Gaussian density, the exact
    KL is 3.7x (step 8) to 25.1x (step 0) the official one, and the first step's std is 0.700 vs 0.686."""
    sigmas = sd3_sigmas()
    factors = convention_factors(sigmas, 0.7)
    cps = factors["cps_log_ratio"]  # [10]
    assert abs(float(cps[8]) - 7900.31) < 0.01 and math.isinf(float(cps[9]))
    assert_close(
        cps[:8],
        torch.tensor([0.6832, 0.7550, 0.8561, 1.0082, 1.2590, 1.7370, 2.9143, 8.1464], dtype=torch.float64),
        rtol=0,
        atol=1e-4,
    )
    kl = factors["kl_exact_over_flow_grpo"]  # [10]
    assert_close(
        kl[:9],
        torch.tensor(
            [25.0811, 21.3765, 17.9673, 14.8535, 12.0352, 9.5122, 7.2847, 5.3525, 3.7158], dtype=torch.float64
        ),
        rtol=0,
        atol=1e-4,
    )
    assert_close(factors["first_step_std"], torch.tensor([0.7, 0.6859], dtype=torch.float64), rtol=0, atol=1e-4)

    # independently, through the step itself: CPS log-ratios of two velocities on the last noisy step (8)
    x, v, other = (
        randn(2, 4, 2, 2, seed=0).double(),
        randn(2, 4, 2, 2, seed=1).double(),
        randn(2, 4, 2, 2, seed=2).double(),
    )
    step = [float(sigmas[8]), float(sigmas[9])]
    x_next, _, _, _ = sde_step_with_logprob(x, v, *step, 0.7, "cps", generator=torch.Generator().manual_seed(3))
    ratios = {}
    for name, conventions in (("official", OFFICIAL), ("gaussian", GAUSSIAN_CPS)):
        logps = [
            sde_step_with_logprob(x, u, *step, 0.7, "cps", prev_sample=x_next, conventions=conventions)[1]
            for u in (v, other)
        ]
        ratios[name] = logps[1] - logps[0]  # [2]
    assert_close(
        ratios["gaussian"] / ratios["official"], torch.full((2,), 7900.312, dtype=torch.float64), rtol=1e-6, atol=0
    )
    # and the KL: exact / official = 1 / (-dt) on every noisy step, through the step's std and kl_std
    sigma, sigma_next = sigmas[:9], sigmas[1:10]
    _, _, _, std = sde_step_with_logprob(
        torch.zeros(9, 1, dtype=torch.float64),
        torch.zeros(9, 1, dtype=torch.float64),
        sigma,
        sigma_next,
        0.7,
        prev_sample=torch.zeros(9, 1, dtype=torch.float64),
    )
    exact, official = (
        kl_std(std, sigma, sigma_next, "flow_grpo", form).flatten() for form in ("exact_step", "flow_grpo")
    )
    assert_close((official / exact) ** 2, kl[:9])


GAUSSIAN_CPS = SDEConventions(cps_log_prob="gaussian")


@pytest.mark.parametrize(
    "kind, conventions", [("flow_grpo", OFFICIAL), ("flow_grpo", SDEConventions("next_sigma")), ("cps", GAUSSIAN_CPS)]
)
def test_log_prob_matches_torch_normal(kind, conventions):
    """The Flow-GRPO step always scores with the Gaussian density (as the official code); CPS with
    cps_log_prob=gaussian (the first form)."""
    x, v = randn(4, 3, 2, 2, seed=0), randn(4, 3, 2, 2, seed=1)
    sigma = torch.tensor([1.0, 0.7, 0.5, 0.3])  # per-sample noise levels, one at pure noise
    sigma_next = sigma - 0.1
    sample, log_prob, mean, std = sde_step_with_logprob(
        x, v, sigma, sigma_next, 0.7, kind, generator=torch.Generator().manual_seed(2), conventions=conventions
    )
    reference = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(sample).mean(dim=(1, 2, 3))
    assert_close(log_prob, reference)
    # the sample is mean + std * eps with eps drawn from the generator
    assert_close(sample, mean + std * randn(4, 3, 2, 2, seed=2))
    # recomputing a recorded step with prev_sample gives the same log-prob and a gradient through the mean
    v_param = v.clone().requires_grad_(True)
    _, again, _, _ = sde_step_with_logprob(
        x, v_param, sigma, sigma_next, 0.7, kind, prev_sample=sample, conventions=conventions
    )
    assert_close(again, log_prob)
    again.sum().backward()
    assert v_param.grad.abs().sum() > 0
    # a different velocity scores the same sample differently, and Normal agrees again
    other = v + 0.3
    _, shifted, mean2, std2 = sde_step_with_logprob(
        x, other, sigma, sigma_next, 0.7, kind, prev_sample=sample, conventions=conventions
    )
    assert_close(shifted, torch.distributions.Normal(mean2, std2.expand_as(mean2)).log_prob(sample).mean(dim=(1, 2, 3)))
    assert not torch.allclose(shifted, log_prob)


def test_sigma_as_float_0d_or_per_sample_tensor_agree():
    x, v = randn(3, 2, 2, 2, seed=0), randn(3, 2, 2, 2, seed=1)
    outputs = [
        sde_step_with_logprob(x, v, s, s_next, generator=torch.Generator().manual_seed(4))
        for s, s_next in [
            (0.6, 0.4),
            (torch.tensor(0.6), torch.tensor(0.4)),
            (torch.full((3,), 0.6), torch.full((3,), 0.4)),
        ]
    ]
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other):
            assert_close(a, b)
    with pytest.raises(ValueError, match="sigma must be"):
        sde_step_with_logprob(x, v, torch.full((2,), 0.6), 0.4)


def test_bfloat16_old_log_prob_equals_recomputed_one():
    """The sample is rounded to the latents' dtype before it is scored, so the stored next_latents give back the
    recorded log-prob (ratio exactly 1 before any update)."""
    x, v = randn(2, 4, 4, 4, seed=0).bfloat16(), randn(2, 4, 4, 4, seed=1).bfloat16()
    sample, log_prob, _, _ = sde_step_with_logprob(x, v, 0.2, 0.1, generator=torch.Generator().manual_seed(2))
    assert sample.dtype == torch.bfloat16
    _, again, _, _ = sde_step_with_logprob(x, v, 0.2, 0.1, prev_sample=sample)
    assert torch.equal(again, log_prob)


def test_bad_arguments_are_named():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="kind must be one of"):
        sde_step_with_logprob(x, x, 0.5, 0.4, kind="ddpm")
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        sde_step_with_logprob(x, x, 0.5, 0.4, noise_level=-0.1)
    with pytest.raises(ValueError, match="sigmas must decrease strictly"):
        sample_trajectory(toy_velocity, x, torch.tensor([1.0, 0.5, 0.5, 0.0]), [])
    with pytest.raises(ValueError, match=r"sde_steps \[4\] must lie in 0..3"):
        sample_trajectory(toy_velocity, x, SIGMAS, [4])


# ------------------------------------------------------------------------------ trajectories
def test_full_window_equals_plain_sde_loop_and_empty_window_equals_ode():
    x0 = randn(2, 3, seed=0)
    trajectory = sample_trajectory(toy_velocity, x0, SIGMAS, [3, 0, 1, 2], generator=torch.Generator().manual_seed(5))
    generator, x, log_probs = torch.Generator().manual_seed(5), x0, []
    for i in range(4):
        x, log_prob, _, _ = sde_step_with_logprob(
            x, toy_velocity(x, float(SIGMAS[i])), float(SIGMAS[i]), float(SIGMAS[i + 1]), generator=generator
        )
        log_probs.append(log_prob)
    assert_close(trajectory.final, x)
    assert_close(trajectory.log_probs, torch.stack(log_probs))
    assert trajectory.nfe == 4 and trajectory.sde_steps == [0, 1, 2, 3]
    assert_close(trajectory.next_latents[-1], trajectory.final)
    assert_close(trajectory.latents[1:], trajectory.next_latents[:-1])  # each state feeds the next step

    ode = sample_trajectory(toy_velocity, x0, SIGMAS, [])
    x = x0
    for i in range(4):
        x = euler_ode_step(x, toy_velocity(x, float(SIGMAS[i])), SIGMAS[i], SIGMAS[i + 1])
    assert_close(ode.final, x)
    assert torch.equal(ode.log_probs, torch.zeros(4, 2)) and ode.nfe == 4 and ode.sde_steps == []
    # a window: SDE states recorded where the window is, ODE elsewhere
    mixed = sample_trajectory(toy_velocity, x0, SIGMAS, [1, 2], generator=torch.Generator().manual_seed(5))
    assert (mixed.log_probs[[0, 3]] == 0).all() and (mixed.log_probs[[1, 2]] != 0).all()
    assert_close(mixed.latents[1], ode.latents[1])  # identical up to the window


def test_training_rows_recompute_the_old_log_probs():
    x0 = randn(3, 2, 2, seed=0)
    trajectory = sample_trajectory(toy_velocity, x0, SIGMAS, [1, 2], generator=torch.Generator().manual_seed(1))
    rows = trajectory.training_rows()
    assert rows["step"].tolist() == [1, 1, 1, 2, 2, 2] and rows["sample"].tolist() == [0, 1, 2, 0, 1, 2]
    assert_close(rows["sigma"], torch.tensor([0.8] * 3 + [0.5] * 3))
    assert_close(rows["sigma_next"], torch.tensor([0.5] * 3 + [0.25] * 3))
    # what the trainer does: new velocity at the recorded state, score the recorded next state
    velocity = toy_velocity(rows["latents"], rows["sigma"][:, None, None])
    _, log_prob, _, _ = sde_step_with_logprob(
        rows["latents"], velocity, rows["sigma"], rows["sigma_next"], prev_sample=rows["next_latents"]
    )
    assert_close(log_prob, rows["log_prob"])
    with pytest.raises(ValueError, match=r"steps \[0\] were ODE steps"):
        trajectory.training_rows([0])


# ------------------------------------------------------------------------------ MixGRPO window
def test_sliding_window_schedules():
    # T = 9, w = 4, s = 2, tau = 10: l = min(floor(i / 10) * 2, 9 - 4 = 5)
    window = SlidingWindow(num_steps=9, window_size=4, stride=2, shift_interval=10)
    # i = 0 -> 0; i = tau - 1 = 9 -> 0; i = tau = 10 -> 2; i = 25 -> 4; i = 1000 -> min(200, 5) = 5
    assert [window.start(i) for i in (0, 9, 10, 25, 1000)] == [0, 0, 2, 4, 5]
    assert window.steps(10) == [2, 3, 4, 5] and window.steps(1000) == [5, 6, 7, 8]
    assert SlidingWindow(9, 4, mode="frozen").start(500) == 0
    starts = [SlidingWindow(9, 4, mode="random").start(0, torch.Generator().manual_seed(s)) for s in range(50)]
    assert set(starts) <= set(range(6)) and len(set(starts)) > 3
    # the same generator state gives the same window (reproducible)
    assert SlidingWindow(9, 4, mode="random").steps(3, torch.Generator().manual_seed(7)) == SlidingWindow(
        9, 4, mode="random"
    ).steps(3, torch.Generator().manual_seed(7))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"window_size": 10}, "window_size 10 must be in 1..9"),
        ({"window_size": 0}, "window_size 0 must be in 1..9"),
        ({"window_size": 4, "stride": 0}, "stride must be >= 1"),
        ({"window_size": 4, "shift_interval": 0}, "shift_interval must be >= 1"),
        ({"window_size": 4, "mode": "backwards"}, "mode must be progressive, frozen or random"),
    ],
)
def test_sliding_window_rejects_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlidingWindow(num_steps=9, **kwargs)


# ------------------------------------------------------------------------------ MixGRPO-Flash
def test_compressed_schedule_keeps_prefix_and_endpoints():
    sigmas = torch.linspace(1, 0, 11)  # 10 steps
    compressed = compressed_sigmas(sigmas, start_index=4, ratio=0.5)  # tail of 6 steps -> 3
    assert compressed.numel() == 4 + 3 + 1
    assert_close(compressed[:5], sigmas[:5])
    assert_close(compressed[4:], torch.tensor([0.6, 0.4, 0.2, 0.0]))
    # ratio 0.4 on a 7-step tail: round(2.8) = 3 steps; a tiny ratio still keeps one step
    assert compressed_sigmas(sigmas, 3, 0.4).numel() == 3 + 3 + 1
    assert_close(compressed_sigmas(sigmas, 3, 0.01)[3:], torch.tensor([0.7, 0.0]))
    # ratio 1 changes nothing; a shifted schedule keeps its shape (points on the original curve)
    shifted = 3 * sigmas / (1 + 2 * sigmas)
    assert_close(compressed_sigmas(shifted, 2, 1.0), shifted)
    half = compressed_sigmas(shifted, 2, 0.5)  # tail of 8 steps -> 4, at original indices 2, 4, 6, 8, 10
    assert_close(half, shifted[[0, 1, 2, 4, 6, 8, 10]])
    with pytest.raises(ValueError, match="ratio must be > 0"):
        compressed_sigmas(sigmas, 3, 0.0)
    with pytest.raises(ValueError, match="start_index must be in 0..10"):
        compressed_sigmas(sigmas, 11, 0.5)


def test_second_order_solver_against_the_closed_form_gaussian_flow():
    """For Gaussian data the ODE endpoint is exactly mu + s * e (see gaussian_velocity)."""
    mu, s = 2.0, 0.5
    velocity = gaussian_velocity(mu, s)
    e = randn(256, 1, seed=0).double()
    exact = mu + s * e
    shifted = lambda n: (
        3
        * torch.linspace(1, 0, n + 1, dtype=torch.float64)
        / (1 + 2 * torch.linspace(1, 0, n + 1, dtype=torch.float64))
    )
    euler = [(sample_trajectory(velocity, e, shifted(n), []).final - exact).abs().max() for n in (10, 20, 40)]
    flash = [
        (sample_trajectory(velocity, e, shifted(n), [], flash_ratio=1.0).final - exact).abs().max()
        for n in (10, 20, 40)
    ]
    assert 1.6 < euler[1] / euler[2] < 2.5  # first order: the error halves when the steps double
    assert flash[1] / flash[2] > 3.3  # second order: the error roughly quarters
    assert flash[2] < euler[2] / 5
    # the first-order multistep step is exactly Euler, and so are the steps from sigma = 1 and into sigma = 0
    v = velocity(e, 0.5)
    assert_close(dpm_solver_2m_step(e, v, 0.5, 0.3, None), euler_ode_step(e, v, 0.5, 0.3))
    assert_close(dpm_solver_2m_step(e, v, 1.0, 0.3, (e, 0.0)), euler_ode_step(e, v, 1.0, 0.3))
    assert_close(dpm_solver_2m_step(e, v, 0.2, 0.0, (e, 0.0)), euler_ode_step(e, v, 0.2, 0.0))


def test_second_order_step_is_exact_when_the_data_prediction_is_constant():
    """Single data point c: x_t = (1 - t) c + t e, v = (x - c) / t, the data prediction x - t v = c everywhere.
    The exact flow from x at t = 0.6: e = (x - 0.4 c) / 0.6, x' = 0.65 c + 0.35 e = (0.35 / 0.6) x + (0.65 -
    0.35 * 0.4 / 0.6) c. DPM-Solver++ must hit it from any state (Euler does too here: this checks the
    coefficients sigma_next / sigma and -(1 - sigma_next) expm1(-h) and that D = c when x0_prev = c)."""
    c, x = torch.tensor([[0.3, -1.2]]), torch.tensor([[1.0, 0.5]])
    v = (x - c) / 0.6
    expected = (0.35 / 0.6) * x + (0.65 - 0.35 * 0.4 / 0.6) * c
    assert_close(dpm_solver_2m_step(x, v, 0.6, 0.35, (c, math.log(0.2 / 0.8))), expected)


def test_flash_uses_fewer_evaluations_after_the_window():
    x0 = randn(2, 3, seed=0)
    sigmas = torch.linspace(1, 0, 11)
    plain = sample_trajectory(toy_velocity, x0, sigmas, [1, 2], generator=torch.Generator().manual_seed(1))
    flash = sample_trajectory(
        toy_velocity, x0, sigmas, [1, 2], generator=torch.Generator().manual_seed(1), flash_ratio=0.4
    )
    # 3 steps up to the end of the window, then round(7 * 0.4) = 3 instead of 7
    assert plain.nfe == 10 and flash.nfe == 3 + 3 and flash.sigmas.numel() == 7
    assert_close(flash.log_probs[:3], plain.log_probs[:3])  # the window is untouched
    assert_close(flash.latents[:4], plain.latents[:4])
    assert_close(flash.sigmas[:4], sigmas[:4]) and flash.sigmas[-1] == 0
    calls = []
    sample_trajectory(
        lambda x, sigma: calls.append(sigma) or toy_velocity(x, sigma),
        x0,
        sigmas,
        [1, 2],
        generator=torch.Generator().manual_seed(1),
        flash_ratio=0.4,
    )
    assert len(calls) == flash.nfe
    with pytest.raises(ValueError, match="flash_ratio must be > 0"):
        sample_trajectory(toy_velocity, x0, sigmas, [1], flash_ratio=0.0)


# ------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("noise_level", [0.0, 0.7, 1.0])
def test_flow_grpo_sampling_keeps_the_gaussian_marginals(noise_level):
    """With the exact velocity of N(mu, s^2) data, 50 uniform steps (SDE on all but the last, as Flow-GRPO
    trains them; a = 0 is the ODE) end with mean mu and std s. Measured errors: below 0.013 for every
    noise level; the Monte Carlo standard errors at N = 20000 are ~0.004 (mean) and ~0.003 (std).
    (CPS injects a fixed fraction of noise per step, not one that shrinks with the step size: it is not a
    discretisation of a marginal-preserving SDE, ends under-dispersed, and is left out here.)"""
    mu, s = 1.5, 0.5
    x = randn(20000, 1, seed=0)
    sigmas = torch.linspace(1, 0, 51)
    final = sample_trajectory(
        gaussian_velocity(mu, s),
        x,
        sigmas,
        list(range(49)),
        noise_level=noise_level,
        generator=torch.Generator().manual_seed(1),
    ).final
    assert abs(final.mean().item() - mu) < 0.03
    assert abs(final.std().item() - s) < 0.03

"""DiffusionNFT (arXiv:2509.16117): the loss in shared/nft.py against hand-worked numbers and an independent
gradient; the flow recipe's `algorithm.name: diffusion_nft` (smoke, config errors, 1 vs 2 processes, SIGKILL
resume)."""

import pytest
import torch

from shared.nft import diffusion_nft_loss, optimality_probability, velocity_gap

# One row, two latent elements (shape [1, 2]): x0 = [1, 0], eps = [0, 2], t = 0.5
#   x_t = 0.5 * [1, 0] + 0.5 * [0, 2] = [0.5, 1];   target velocity eps - x0 = [-1, 2]
CLEAN = torch.tensor([[1.0, 0.0]])
NOISED = torch.tensor([[0.5, 1.0]])
T = torch.tensor([0.5])
PERFECT = torch.tensor([[-1.0, 2.0]])  # v = eps - x0
ZERO = torch.zeros(1, 2)


def test_optimality_maps_clipped_advantages_to_zero_one():
    # r = clip(A, -5, 5) / 10 + 0.5: -5 -> 0, -10 -> 0 (clipped), 0 -> 0.5, 2.5 -> 0.75, 5 -> 1, 10 -> 1
    r = optimality_probability(torch.tensor([-5.0, -10.0, 0.0, 2.5, 5.0, 10.0]), clip=5.0)
    assert torch.allclose(r, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


@pytest.mark.parametrize("r, expected", [(1.0, 0.0), (0.0, 5.0 / 3.0), (0.5, 5.0 / 6.0)])
def test_beta_one_adaptive_by_hand(r, expected):
    # beta = 1, v_old = 0, v = [-1, 2] (the exact velocity):
    #   v+ = v = [-1, 2]: x0+ = [0.5, 1] - 0.5 * [-1, 2] = [1, 0] = x0, error 0 (weight clamped to 1e-5: 0 / 1e-5 = 0)
    #   v- = 2 v_old - v = [1, -2]: x0- = [0.5, 1] - 0.5 * [1, -2] = [0, 2], error [-1, 2]:
    #   mean square (1 + 4) / 2 = 2.5, adaptive weight mean |error| = 1.5, e- = 2.5 / 1.5 = 5/3
    #   loss = r * 0 + (1 - r) * 5/3
    loss, metrics = diffusion_nft_loss(PERFECT, ZERO, NOISED, CLEAN, T, torch.tensor([r]), beta=1.0)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["nft_negative"] == pytest.approx(5.0 / 3.0, rel=1e-6)
    assert metrics["old_deviation"] == pytest.approx(2.5)  # mean((v - 0)^2) = (1 + 4) / 2


def test_beta_half_plain_mean_by_hand():
    # beta = 0.5, v_old = 0, v = [-1, 2], no adaptive weighting, r = 0.75, scale 5:
    #   v+ = 0.5 v = [-0.5, 1]: x0+ = [0.5, 1] - 0.5 * [-0.5, 1] = [0.75, 0.5], error [-0.25, 0.5],
    #        e+ = (0.0625 + 0.25) / 2 = 0.15625
    #   v- = 1.5 * 0 - 0.5 v = [0.5, -1]: x0- = [0.5, 1] - 0.5 * [0.5, -1] = [0.25, 1.5], error [-0.75, 1.5],
    #        e- = (0.5625 + 2.25) / 2 = 1.40625
    #   loss = 5 * (0.75 * 0.15625 + 0.25 * 1.40625) / 0.5 = 5 * 0.46875 / 0.5 = 4.6875
    loss, metrics = diffusion_nft_loss(
        PERFECT, ZERO, NOISED, CLEAN, T, torch.tensor([0.75]), beta=0.5, adaptive=False, scale=5.0
    )
    assert loss.item() == pytest.approx(4.6875, rel=1e-6)
    assert metrics["nft_positive"] == pytest.approx(0.15625) and metrics["nft_negative"] == pytest.approx(1.40625)


def test_two_rows_are_independent_and_the_gap_is_per_row():
    # row 0 as above (beta 1, r 0: 5/3); row 1: v = v_old = 0 at t = 0.5 with x0 = [1, 0], x_t = [0.5, 1]:
    #   v+ = v- = 0, x0+- = x_t, error [-0.5, 1]: mean square 0.625, mean |.| 0.75, e = 0.625 / 0.75 = 5/6 both;
    #   r = 0.25: loss = 0.25 * 5/6 + 0.75 * 5/6 = 5/6
    velocity = torch.cat([PERFECT, ZERO])
    loss, _ = diffusion_nft_loss(
        velocity,
        torch.zeros(2, 2),
        NOISED.repeat(2, 1),
        CLEAN.repeat(2, 1),
        T.repeat(2),
        torch.tensor([0.0, 0.25]),
        1.0,
    )
    assert torch.allclose(loss, torch.tensor([5.0 / 3.0, 5.0 / 6.0]))
    # the KL term: mean over elements of (v - v_ref)^2: row 0 (1 + 4) / 2 = 2.5, row 1 0
    assert torch.allclose(velocity_gap(velocity, torch.zeros(2, 2)), torch.tensor([2.5, 0.0]))


@pytest.mark.parametrize("adaptive", [True, False])
def test_gradient_matches_the_closed_form(adaptive):
    """d loss / d v, worked out by hand: x0+ = x_t - t (beta v + (1 - beta) v_old) has d x0+/dv = -t beta and
    x0- = x_t - t ((1 + beta) v_old - beta v) has d x0-/dv = +t beta, so with D elements per row and the adaptive
    weights w+-, constants,
        dL/dv = scale * (-2 r t (x0+ - x0) / w+ + 2 (1 - r) t (x0- - x0) / w-) / D."""
    generator = torch.Generator().manual_seed(0)
    shape = (3, 2, 2, 2)  # [R, C, h, w]
    velocity = torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_(True)
    old, clean, noise = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    noised = (1 - t.view(-1, 1, 1, 1)) * clean + t.view(-1, 1, 1, 1) * noise
    r = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    beta, scale = 0.3, 5.0
    loss, _ = diffusion_nft_loss(velocity, old, noised, clean, t, r, beta, adaptive=adaptive, scale=scale)
    loss.sum().backward()
    with torch.no_grad():
        tt = t.view(-1, 1, 1, 1)
        plus = noised - tt * (beta * velocity + (1 - beta) * old) - clean  # [R, C, h, w]
        minus = noised - tt * ((1 + beta) * old - beta * velocity) - clean  # [R, C, h, w]
        weight = lambda e: e.abs().mean(dim=(1, 2, 3), keepdim=True) if adaptive else 1.0
        rr, elements = r.view(-1, 1, 1, 1), 8
        expected = scale * (-2 * rr * tt * plus / weight(plus) + 2 * (1 - rr) * tt * minus / weight(minus)) / elements
    assert torch.allclose(velocity.grad, expected, rtol=1e-10, atol=1e-12)


def test_beta_one_positive_policy_is_the_trained_one_and_no_gradient_reaches_the_old():
    # beta = 1: v+ = v, so with r = 1 the loss is the flow-matching x0 error of v alone: v = v_target gives 0
    old = torch.tensor([[3.0, -7.0]], requires_grad=True)
    loss, _ = diffusion_nft_loss(PERFECT, old, NOISED, CLEAN, T, torch.tensor([1.0]), beta=1.0, adaptive=False)
    assert loss.item() == 0.0
    assert not loss.requires_grad  # v_old is detached: the only input needing a gradient was it

"""GPM scores (arXiv 2410.02197) on numbers worked out by hand."""

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from shared.gpm import (
    bradley_terry_loss,
    gpm_pair_loss,
    gpm_probability,
    gpm_score,
    gpm_score_table,
    gpm_win_rates,
    skew_rotate,
    sppo_targets,
)


def test_skew_rotate_by_hand():
    # per block (x, y) -> (-y, x): (1, 2, 3, 4) -> (-2, 1, -4, 3)
    assert_close(skew_rotate(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-2.0, 1.0, -4.0, 3.0]))


def test_score_2d_by_hand():
    # v_i = (1, 2), v_j = (3, -1): R v_i = (-2, 1); <R v_i, v_j> = -6 - 1 = -7
    # = v_i[0] v_j[1] - v_i[1] v_j[0] = 1 * (-1) - 2 * 3 = -7 (the official 2-D formula); tau 0.5 -> -14
    v_i, v_j = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    assert_close(gpm_score(v_i, v_j, tau=0.5), torch.tensor(-14.0))
    assert_close(gpm_score(v_j, v_i, tau=0.5), torch.tensor(14.0))
    assert_close(gpm_probability(v_i, v_j, tau=0.5), torch.tensor(1 / (1 + math.exp(14.0))))
    # (1, 0) against (0, 1): 1 * 1 - 0 * 0 = 1; tau 0.1 -> 10
    assert_close(gpm_score(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])), torch.tensor(10.0))


def test_score_4d_sums_blocks():
    # block 1 as above: -7; block 2: (0.5, 0) against (1, 2): 0.5 * 2 - 0 * 1 = 1; sum -6, tau 0.1 -> -60
    v_i, v_j = torch.tensor([1.0, 2.0, 0.5, 0.0]), torch.tensor([3.0, -1.0, 1.0, 2.0])
    assert_close(gpm_score(v_i, v_j), torch.tensor(-60.0))


def test_normalize_scales_to_unit_vectors():
    # (3, 4) -> (0.6, 0.8), (0, 2) -> (0, 1): 0.6 * 1 - 0.8 * 0 = 0.6; tau 1 -> 0.6
    assert_close(
        gpm_score(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0]), tau=1.0, normalize=True), torch.tensor(0.6)
    )


def test_table_antisymmetric_and_matches_pairs():
    torch.manual_seed(0)
    v = torch.randn(5, 6)  # [K, 2k]
    table = gpm_score_table(v)  # [K, K]
    assert torch.equal(table, -table.T)
    assert torch.equal(torch.diagonal(table), torch.zeros(5))
    for i, j in itertools.product(range(5), repeat=2):
        assert_close(table[i, j], gpm_score(v[i], v[j]))


def _cyclic_embeddings() -> torch.Tensor:
    # unit vectors at 0, 120, 240 degrees for a, b, c; for unit vectors s(u, w) = sin(theta_w - theta_u) / tau
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=torch.float64)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # [3, 2]


def test_cyclic_preference_is_represented():
    a, b, c = _cyclic_embeddings()
    # s(a, b) = sin(120) / 0.1, s(b, c) = sin(120) / 0.1, s(c, a) = sin(-240) / 0.1 = sin(120) / 0.1
    expected = 1 / (1 + math.exp(-math.sin(2 * math.pi / 3) / 0.1))  # sigmoid(5 sqrt(3)) = 0.99983
    for winner, loser in ((a, b), (b, c), (c, a)):
        p = gpm_probability(winner, loser)
        assert p > 0.5
        assert_close(p, torch.tensor(expected, dtype=torch.float64))


def _bradley_terry_correct(r_a: float, r_b: float, r_c: float) -> int:
    """How many of the cyclic pairs a > b, b > c, c > a a scalar reward orders correctly."""
    return (r_a > r_b) + (r_b > r_c) + (r_c > r_a)


def test_no_scalar_reward_orders_the_cycle():
    # the three margins (r_a - r_b) + (r_b - r_c) + (r_c - r_a) sum to 0, so not all can be > 0; check
    # every ordering of three distinct values (the 3 rotations of the cycle get 2 right, the 3 reversed
    # orderings 1) and a grid with ties
    counts = sorted(_bradley_terry_correct(*r) for r in itertools.permutations((0.0, 1.0, 2.0)))
    assert counts == [1, 1, 1, 2, 2, 2]
    grid = (-1.0, 0.0, 0.5, 1.0)
    assert max(_bradley_terry_correct(*r) for r in itertools.product(grid, repeat=3)) == 2


def test_odd_dimension_raises():
    with pytest.raises(ValueError, match="last dimension 3"):
        gpm_score(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="even"):
        gpm_score_table(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="even"):
        skew_rotate(torch.zeros(2, 1))


def test_pair_loss_by_hand():
    # chosen (1, 2), rejected (3, -1): raw score -7; tau 0.5 -> logit -14; loss = log(1 + e^14)
    # second pair chosen (1, 0), rejected (0, 1): raw 1, margin 0.5 -> (1 - 0.5) / 0.5 = 1; loss = log(1 + e^-1)
    chosen = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    rejected = torch.tensor([[3.0, -1.0], [0.0, 1.0]])
    losses, metrics = gpm_pair_loss(chosen, rejected, tau=0.5, margin=torch.tensor([0.0, 0.5]))
    assert_close(losses, torch.tensor([math.log(1 + math.exp(14.0)), math.log(1 + math.exp(-1.0))]))
    assert_close(metrics["probability"], torch.tensor([1 / (1 + math.exp(14.0)), 1 / (1 + math.exp(-1.0))]))
    assert_close(metrics["score"], torch.tensor([-14.0, 2.0]))


def test_win_rates_by_hand():
    # (1, 0) and (0, 1), tau 1: S_12 = 1, S_21 = -1; P_1 = (1/2 + s(1)) / 2, P_2 = (1/2 + s(-1)) / 2
    table = gpm_score_table(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), tau=1.0)
    sig1 = 1 / (1 + math.exp(-1.0))
    assert_close(gpm_win_rates(table), torch.tensor([(0.5 + sig1) / 2, (0.5 + 1 - sig1) / 2]))
    # official antisymmetrised version: sigmoid(S_12 - S_21) = sigmoid(2)
    sig2 = 1 / (1 + math.exp(-2.0))
    assert_close(gpm_win_rates(table, antisymmetrize=True), torch.tensor([(0.5 + sig2) / 2, (0.5 + 1 - sig2) / 2]))
    # a perfect cycle: each row has sigmoid(x) + sigmoid(-x) + 1/2 = 3/2 -> every win rate is 1/2
    cyclic = gpm_win_rates(gpm_score_table(_cyclic_embeddings()))
    assert_close(cyclic, torch.full((3,), 0.5, dtype=torch.float64))


def test_sppo_targets_by_hand():
    # (P - 1/2) / beta: P = 0.75, beta 0.5 -> 0.5; P = 0.5 -> 0; P = 0.25 -> -0.5
    assert_close(sppo_targets(torch.tensor([0.75, 0.5, 0.25]), beta=0.5), torch.tensor([0.5, 0.0, -0.5]))


def test_score_equals_explicit_block_matrix():
    # R written out as the official loss.py builds it: R[i, i+1] = -1, R[i+1, i] = 1;
    # score = (v_i @ R^T) . v_j / tau
    torch.manual_seed(1)
    v_i, v_j = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)  # [B, 2k]
    R = torch.zeros(6, 6, dtype=torch.float64)
    for i in range(0, 6, 2):
        R[i, i + 1], R[i + 1, i] = -1.0, 1.0
    assert_close(gpm_score(v_i, v_j), ((v_i @ R.T) * v_j).sum(-1) / 0.1)


def test_pair_loss_gradient_by_hand():
    # chosen (1, 0), rejected (0, 1), tau 1: s = c0 r1 - c1 r0 = 1; dL/ds = -(1 - sigmoid(1))
    # ds/dc = (r1, -r0) = (1, 0), ds/dr = (-c1, c0) = (0, 1)
    chosen = torch.tensor([[1.0, 0.0]], requires_grad=True)
    rejected = torch.tensor([[0.0, 1.0]], requires_grad=True)
    losses, _ = gpm_pair_loss(chosen, rejected, tau=1.0)
    losses.sum().backward()
    g = -(1 - 1 / (1 + math.exp(-1.0)))
    assert_close(chosen.grad, torch.tensor([[g, 0.0]]))
    assert_close(rejected.grad, torch.tensor([[0.0, g]]))


def test_bradley_terry_loss_by_hand():
    # r_w - r_l = (2 - 1, 0 - 0, -1 - 1) = (1, 0, -2): -log sigmoid = log(1 + e^-1), log 2, log(1 + e^2)
    losses, metrics = bradley_terry_loss(torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0]))
    assert_close(losses, torch.tensor([math.log(1 + math.exp(-1)), math.log(2), math.log(1 + math.exp(2))]))
    assert_close(metrics["probability"], torch.tensor([1 / (1 + math.exp(-1)), 0.5, 1 / (1 + math.exp(2))]))
    assert_close(metrics["score"], torch.tensor([1.0, 0.0, -2.0]))
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2, 1))

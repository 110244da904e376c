"""shared.metrics.pass_at_k against hand-worked binomials and against counting every draw of k samples."""

from __future__ import annotations

from itertools import combinations

import pytest

from shared.metrics import pass_at_k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (8, 2, 4, 1 - 15 / 70),  # C(6, 4) = 15, C(8, 4) = 70: 55/70 = 11/14
        (8, 1, 1, 1 / 8),  # pass@1 is the fraction correct
        (8, 3, 1, 3 / 8),
        (5, 2, 2, 1 - 3 / 10),  # C(3, 2) = 3, C(5, 2) = 10
        (8, 0, 8, 0.0),  # nothing correct: 0 at any k
        (8, 1, 8, 1.0),  # all 8 drawn: the correct one is among them
        (8, 5, 4, 1.0),  # n - c = 3 < k = 4: every draw of 4 holds a correct one
        (10, 4, 3, 1 - 20 / 120),  # C(6, 3) = 20, C(10, 3) = 120
    ],
)
def test_pass_at_k_hand_worked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("n", [1, 4, 8, 9])
def test_pass_at_k_is_the_fraction_of_k_draws_with_a_correct_sample(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            draws = list(combinations(samples, k))
            counted = sum(any(draw) for draw in draws) / len(draws)
            assert pass_at_k(n, c, k) == pytest.approx(counted, abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(8, 2, 0), (8, 2, 9), (8, 9, 1), (8, -1, 1)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)

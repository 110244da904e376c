"""Evaluation metrics on counts, pure functions (no torch, no front end)."""

from __future__ import annotations

from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem from n samples of which c are correct: the probability that k samples
    drawn without replacement from the n hold at least one correct one,

        pass@k = 1 - C(n - c, k) / C(n, k)

    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv 2107.03374, Sec. 2.1, Eq. 1; a
    benchmark's pass@k is the mean over its problems). Computed with exact integer binomials (math.comb), so no
    product form is needed for stability; it is 1 when n - c < k (every draw of k holds a correct sample)."""
    if not 0 < k <= n:
        raise ValueError(f"pass_at_k: k={k} must be in 1..n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c={c} correct must be in 0..n={n}")
    return 1.0 - comb(n - c, k) / comb(n, k)

"""Pairwise-preference rewards ranked by win rates: Pref-GRPO (Wang et al. 2025, arXiv:2508.20751).

A pairwise comparator answers "is a better than b?" with p = P(a > b) in [0, 1] (a hard judge: 1, 0, or 1/2 for a
tie). Pref-GRPO turns the comparisons inside one prompt's group of K samples into one reward per sample, its win
rate against the others of the group:

    w_i = 1 / (K - 1) * sum_{j != i} P[i, j],      P[i, j] = P(sample i beats sample j),

then normalises the win rates within the group as GRPO does (that part is the front end's advantage stage). A
group's win rates always average 1/2 (each pair hands out 1 in total over K (K - 1) / 2 pairs), so the reward's
logged mean is 0.5 and its spread carries the signal.

Checked against the official code, github.com/CodeGoat24/Pref-GRPO, `fastvideo/train_flux_pref_grpo.py`
(`cal_win_rate`, read at its stored HEAD, not run): the pairs are `itertools.combinations` of the group, so each
unordered pair is asked once, the lower index shown as "Image 1", and no image is compared with itself; a win adds
1 to the winner, an answer that names neither image (or has no `<answer>` tag) adds 1/2 to both (a tie, with a
printed warning); the win rate is wins / comparisons = wins / (K - 1), rounded to 3 decimals, then normalised per
group with std + 1e-8. The paper's own text was not at hand; the formula above is the code's.

Here (departures named): `pairing="unordered"` asks K (K - 1) / 2 pairs as the official code does, (i, j) with
i < j, and P[j, i] = 1 - P[i, j]. `pairing="both_orders"` asks every ordered pair, K (K - 1) calls, and takes
P[i, j] = (p(i, j) + 1 - p(j, i)) / 2: a judge that favours the first (or second) image it is shown gives both
members of a pair that bias equally, so it cancels; it costs twice the calls, and for a comparator without position
bias (the digit toy's) it gives the same numbers. The win rates are not rounded. A comparison that got no answer
(the comparator returned None: a judge that timed out or answered nonsense) is, by `failed_pair`, "drop": both
members of that pair get no score (None, NaN in the tensors), which the front ends treat as any reward's bad score
(the run stops naming the reward, or under reward.on_bad_score=drop the samples are dropped and counted), or
"tie": 1/2 to each, as the official code does. Drop is the default: a made-up tie looks like a real one, and pulls
both members' rewards toward 1/2 with nothing in the log to say so.

`shared.gpm.gpm_win_rates` is a different mean: GPO's row sum / K with the self-pair's 1/2 included, which equals
((K - 1) w_i + 1/2) / K here.
"""

from __future__ import annotations

import itertools
import math
import numbers
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch import Tensor

from shared.reward_calls import load_callable

FAILED_PAIR_POLICIES = ("drop", "tie")


def unordered_pairs(k: int) -> list[tuple[int, int]]:
    """The K (K - 1) / 2 pairs (i, j), i < j, in lexicographic order (as itertools.combinations)."""
    return list(itertools.combinations(range(k), 2))


def ordered_pairs(k: int) -> list[tuple[int, int]]:
    """The K (K - 1) ordered pairs (i, j), i != j: each pair in both orders."""
    return list(itertools.permutations(range(k), 2))


PAIRINGS: dict[str, Callable[[int], list[tuple[int, int]]]] = {
    "unordered": unordered_pairs,
    "both_orders": ordered_pairs,
}


def preference_matrix(k: int, pairs: list[tuple[int, int]], probabilities: Tensor) -> Tensor:
    """P [K, K], P[i, j] = P(i beats j), from comparator answers p_m = P(a_m > b_m) for pairs m = (a_m, b_m).

    Each answer counts for (a, b) as p and for (b, a) as 1 - p; an entry with several answers (a pair asked in both
    orders) is their mean, so with both orders P[i, j] = (p(i, j) + 1 - p(j, i)) / 2. A NaN answer (no answer) makes
    both of its entries NaN; an entry never asked, and the diagonal, are NaN. probabilities [M] -> [K, K]."""
    if len(pairs) != probabilities.numel():
        raise ValueError(f"{len(pairs)} pairs but {probabilities.numel()} probabilities; give one per pair")
    total = torch.zeros(k, k, dtype=torch.float64)  # [K, K]
    count = torch.zeros(k, k, dtype=torch.float64)  # [K, K]
    for (a, b), p in zip(pairs, probabilities.double().tolist()):
        if a == b:
            raise ValueError(f"pair ({a}, {b}) compares a member with itself; a win rate counts the others only")
        total[a, b] += p
        total[b, a] += 1.0 - p
        count[a, b] += 1
        count[b, a] += 1
    return total / count  # [K, K] float64; 0 / 0 -> NaN where never asked (the diagonal)


def win_rates(preference: Tensor) -> Tensor:
    """Each member's win rate w_i = 1 / (K - 1) * sum_{j != i} P[i, j] (Pref-GRPO, arXiv:2508.20751), the diagonal
    ignored. preference [K, K] -> [K]; a NaN off the diagonal makes its row's win rate NaN (no score).

    Off-diagonal entries must lie in [0, 1] (or be NaN); K >= 2 (a group of one has nobody to beat)."""
    if preference.dim() != 2 or preference.shape[0] != preference.shape[1]:
        raise ValueError(f"preference must be a square matrix [K, K], got shape {tuple(preference.shape)}")
    k = preference.shape[0]
    if k < 2:
        raise ValueError(f"a group of {k} has no other member to compare with; a win rate needs groups of 2 or more")
    others = ~torch.eye(k, dtype=torch.bool)  # [K, K] off the diagonal
    values = preference[others]  # [K * (K - 1)]
    outside = values[~values.isnan() & ((values < 0) | (values > 1))]
    if outside.numel():
        raise ValueError(f"preference holds {outside[0].item():g}, outside [0, 1]; give probabilities P(i beats j)")
    return torch.where(others, preference, torch.zeros_like(preference)).sum(dim=1) / (k - 1)  # [K]


def _probability(value: Any, pair: tuple[int, int]) -> float:
    """A comparator's answer as a float in [0, 1], NaN for None; ValueError naming the pair for anything else."""
    if value is None:
        return math.nan
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) <= 1:
        raise ValueError(
            f"comparator returned {value!r} for pair {pair}; return P(a beats b) in [0, 1], or None for no answer"
        )
    return float(value)


def check_options(pairing: str, failed_pair: str) -> None:
    """ValueError naming the option and its choices when `pairing` or `failed_pair` is not one of them."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing {pairing!r}: choose one of {sorted(PAIRINGS)}")
    if failed_pair not in FAILED_PAIR_POLICIES:
        raise ValueError(f"failed_pair {failed_pair!r}: choose one of {list(FAILED_PAIR_POLICIES)}")


def group_win_rates(
    compare: Callable[[int, int], Any],
    k: int,
    pairing: str = "unordered",
    failed_pair: str = "drop",
    pool: Executor | None = None,
) -> list[float | None]:
    """The win rates of a group of `k` members from `compare(i, j)` -> P(member i beats member j), None for no
    answer (see the module docstring for `pairing` and `failed_pair`). The comparisons run one after another, or on
    `pool` (a fixed-size executor: at most its workers at once). A member without a score comes back None."""
    check_options(pairing, failed_pair)
    pairs = PAIRINGS[pairing](k)
    answers = list(pool.map(lambda pair: compare(*pair), pairs)) if pool else [compare(*pair) for pair in pairs]
    probabilities = torch.tensor([_probability(value, pair) for value, pair in zip(answers, pairs)])  # [M]
    if failed_pair == "tie":
        probabilities = probabilities.nan_to_num(nan=0.5)  # [M]
    rates = win_rates(preference_matrix(k, pairs, probabilities))  # [K]
    return [None if math.isnan(rate) else rate for rate in rates.tolist()]


def load_comparator(path: str, kwargs: dict | None = None) -> Callable:
    """The comparator fn(prompt, a, b) -> P(a > b) that an import path 'module:name' names, built by the rewards'
    one factory rule (shared.reward_calls.load_callable: called with `kwargs` when given); RewardError naming it."""
    return load_callable(path, kwargs, accepts=("prompt", "a", "b"))


def win_rate_scorer(
    comparator: str | Callable,
    comparator_kwargs: dict | None = None,
    pairing: str = "unordered",
    failed_pair: str = "drop",
    max_workers: int = 1,
    pool: Executor | None = None,
) -> Callable[[Any, Any], list[float | None]]:
    """fn(prompt, members) -> each member's win rate in its group, for the front ends' groupwise rewards (flowalign:
    members = the group's images [K, 3, H, W]; llmalign: its K completions). `comparator` is fn(prompt, a, b) ->
    P(a > b) or None, or the import path of one (built with `comparator_kwargs`). Comparisons run on `pool`, or on
    a pool of `max_workers` threads made here (1: one after another, for comparators that are not thread-safe)."""
    check_options(pairing, failed_pair)
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers {max_workers!r}: give a whole number of threads, 1 or more")
    compare = load_comparator(comparator, comparator_kwargs) if isinstance(comparator, str) else comparator
    if pool is None and max_workers > 1:
        pool = ThreadPoolExecutor(max_workers, thread_name_prefix="pairwise-compare")

    def score(prompt: Any, members: Any) -> list[float | None]:
        return group_win_rates(
            lambda i, j: compare(prompt, members[i], members[j]), len(members), pairing, failed_pair, pool
        )

    return score

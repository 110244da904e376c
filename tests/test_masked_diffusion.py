"""Coupled-GRPO (DiffuCoder, arXiv 2506.20639): masks, the coupled log-prob and LOO advantages by hand and brute force."""

import itertools

import pytest
import torch
from torch.testing import assert_close

from shared.advantages import group_advantages
from shared.masked_diffusion import (
    complementary_masks,
    coupled_pass_inputs,
    coupled_token_logps,
    leave_one_out_advantages,
    masks_from_uniforms,
    sample_mask_ratio,
    single_mask_token_logps,
)

# Two sequences of length 6: prompt (P), completion (C), padding after EOS (-).
#   row 0: P P C C C C      row 1: P C C C - -
COMPLETION = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)


def test_masks_from_uniforms_by_hand():
    u = torch.tensor([[0.1, 0.1, 0.1, 0.5, 0.29, 0.31], [0.9, 0.7, 0.2, 0.3, 0.0, 0.99]])
    # row 0, t = 0.3: completion positions 2..5 have u = 0.1, 0.5, 0.29, 0.31 -> u < 0.3 at 2 and 4.
    # row 1, t = 0.75: completion positions 1..3 have u = 0.7, 0.2, 0.3 -> all < 0.75; padding 4 (u=0) stays out.
    mask_a, mask_b = masks_from_uniforms(COMPLETION, torch.tensor([0.3, 0.75]), u)
    assert mask_a.tolist() == [[False, False, True, False, True, False], [False, True, True, True, False, False]]
    assert mask_b.tolist() == [[False, False, False, True, False, True], [False, False, False, False, False, False]]
    # A scalar t (the official one ratio per batch) is broadcast: t = 0.3 in row 1 gives u < 0.3 at 2 only.
    mask_a, _ = masks_from_uniforms(COMPLETION, 0.3, u)
    assert mask_a[1].tolist() == [False, False, True, False, False, False]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_masks_cover_each_completion_token_exactly_once(seed):
    g = torch.Generator().manual_seed(seed)
    completion = torch.rand(5, 40, generator=g) < 0.6  # [B, L] arbitrary completion layout
    mask_a, mask_b = complementary_masks(completion, torch.tensor([0.2, 0.4, 0.5, 0.6, 0.8]), g)
    assert not (mask_a & mask_b).any()  # never both
    assert torch.equal(mask_a | mask_b, completion)  # every completion token once, nothing else


def test_same_seed_same_masks_other_seed_other_masks():
    t = torch.tensor([0.5, 0.5])
    first = complementary_masks(COMPLETION, t, torch.Generator().manual_seed(42))
    again = complementary_masks(COMPLETION, t, torch.Generator().manual_seed(42))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    # and they are u < t for the u the seeded generator draws first
    u = torch.rand(COMPLETION.shape, generator=torch.Generator().manual_seed(42))
    assert torch.equal(first[0], COMPLETION & (u < 0.5))
    big = torch.ones(4, 64, dtype=torch.bool)
    a1, _ = complementary_masks(big, 0.5, torch.Generator().manual_seed(1))
    a2, _ = complementary_masks(big, 0.5, torch.Generator().manual_seed(2))
    assert not torch.equal(a1, a2)


def test_masked_fraction_is_bernoulli_t():
    # Each token independently with probability t (no rounding to a count): over n = 200,000 tokens the
    # fraction has std sqrt(t (1 - t) / n) <= 0.0012; allow 5 std.
    completion = torch.ones(100, 2000, dtype=torch.bool)
    for t in (0.2, 0.5, 0.8):
        mask_a, _ = complementary_masks(completion, t, torch.Generator().manual_seed(3))
        assert abs(mask_a.float().mean().item() - t) < 5 * (t * (1 - t) / completion.numel()) ** 0.5


def test_sample_mask_ratio_range_and_seed():
    ts = [sample_mask_ratio(torch.Generator().manual_seed(s)) for s in range(200)]
    assert all(0.2 <= t <= 0.8 for t in ts) and max(ts) - min(ts) > 0.5
    assert sample_mask_ratio(torch.Generator().manual_seed(5)) == sample_mask_ratio(torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="0 < low <= high < 1"):
        sample_mask_ratio(torch.Generator(), 0.0, 0.8)


def test_bad_inputs_raise():
    u = torch.zeros(2, 6)
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\)"):
        masks_from_uniforms(COMPLETION, 1.0, u)
    with pytest.raises(ValueError, match="one ratio per sample"):
        masks_from_uniforms(COMPLETION, torch.tensor([0.5, 0.5, 0.5]), u)
    with pytest.raises(ValueError, match="uniforms has shape"):
        masks_from_uniforms(COMPLETION, 0.5, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="at least 2 members"):
        leave_one_out_advantages(torch.zeros(3), 1)


def test_pass_inputs_by_hand():
    ids = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 0, 0]])
    mask_a = torch.tensor([[0, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    mask_b = COMPLETION & ~mask_a
    out = coupled_pass_inputs(ids, COMPLETION, mask_a, mask_b, mask_token_id=99)
    assert out.tolist() == [
        [[10, 11, 99, 99, 99, 99], [20, 99, 99, 99, 0, 0]],  # fully masked completion; prompt, padding kept
        [[10, 11, 99, 13, 99, 15], [20, 99, 22, 99, 0, 0]],  # pass A
        [[10, 11, 12, 99, 14, 99], [20, 21, 99, 23, 0, 0]],  # pass B
    ]


def test_coupled_token_logps_by_hand():
    # One sequence, 3 completion tokens, t = 0.25 (weights 1/t = 4, 1/(1-t) = 4/3):
    #   token 0 in mask_a: (-1.0 + 4 * -0.5) / 2 = -1.5
    #   token 1 in mask_b: (-2.0 + 4/3 * -0.75) / 2 = -1.5
    #   token 2 in mask_a: (-0.2 + 4 * -0.1) / 2 = -0.3
    full = torch.tensor([[-1.0, -2.0, -0.2]])
    a = torch.tensor([[-0.5, -9.0, -0.1]])  # -9 is pass A's value at a token it did not mask: unused
    b = torch.tensor([[-9.0, -0.75, -9.0]])
    mask_a = torch.tensor([[True, False, True]])
    assert_close(coupled_token_logps(full, a, b, mask_a, 0.25), torch.tensor([[-1.5, -1.5, -0.3]]))
    keep = torch.tensor([[1, 1, 0]])
    assert_close(coupled_token_logps(full, a, b, mask_a, 0.25, keep), torch.tensor([[-1.5, -1.5, 0.0]]))


def _toy_model(ids: list[int], mask_id: int) -> list[float]:
    """log p(true token at j | masked ids): depends on j and on which positions are masked."""
    masked = [k for k, x in enumerate(ids) if x == mask_id]
    return [
        -0.1 * (j + 1) - 0.05 * len(masked) - (0.3 if j in masked else 0.0) - 0.01 * sum(masked)
        for j in range(len(ids))
    ]


def test_coupled_estimate_equals_brute_force():
    mask_id = 99
    ids = torch.tensor([[5, 6, 7, 8, 9, 4], [5, 1, 2, 3, 0, 0]])
    t = torch.tensor([0.3, 0.6])
    mask_a, mask_b = complementary_masks(COMPLETION, t, torch.Generator().manual_seed(11))
    passes = coupled_pass_inputs(ids, COMPLETION, mask_a, mask_b, mask_id)  # [3, B, L]
    logps = torch.tensor([[_toy_model(row.tolist(), mask_id) for row in p] for p in passes])  # [3, B, L]
    got = coupled_token_logps(logps[0], logps[1], logps[2], mask_a, t, COMPLETION)
    # From the definition, one token at a time, building each pass's sequence by hand.
    expected = torch.zeros(2, 6)
    for b, j in itertools.product(range(2), range(6)):
        if not COMPLETION[b, j]:
            continue
        seq = ids[b].tolist()
        full = [mask_id if COMPLETION[b, k] else x for k, x in enumerate(seq)]
        in_a = bool(mask_a[b, j])
        chosen = [mask_id if (mask_a if in_a else mask_b)[b, k] else x for k, x in enumerate(seq)]
        weight = 1 / t[b].item() if in_a else 1 / (1 - t[b].item())
        expected[b, j] = (_toy_model(full, mask_id)[j] + weight * _toy_model(chosen, mask_id)[j]) / 2
    assert_close(got, expected)


def test_leave_one_out_by_hand():
    # group 1: r = (1, 0, 0, 1): A_0 = 1 - 1/3 = 2/3, A_1 = 0 - 2/3 = -2/3
    # group 2: r = (3, 1, 2, 2): A_0 = 3 - 5/3 = 4/3, A_1 = 1 - 7/3 = -4/3, A_2 = A_3 = 2 - 2 = 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 4 / 3, -4 / 3, 0.0, 0.0])
    assert_close(leave_one_out_advantages(rewards, 4), expected)
    # scaled: sample std of group 1 = sqrt(1/3) = 0.577350; of group 2 = sqrt(2/3) = 0.816497
    scaled = leave_one_out_advantages(rewards, 4, scale=True)
    std = torch.tensor([0.577350] * 4 + [0.816497] * 4)
    assert_close(scaled, expected / (std + 1e-4))
    # G = 3, r = (0, 3, 6): A = 0 - 4.5, 3 - 3, 6 - 1.5
    assert_close(leave_one_out_advantages(torch.tensor([0.0, 3.0, 6.0]), 3), torch.tensor([-4.5, 0.0, 4.5]))


def test_leave_one_out_is_group_mean_advantage_times_g_over_g_minus_1():
    rewards = torch.rand(12, generator=torch.Generator().manual_seed(0))
    groups = torch.arange(4).repeat_interleave(3)
    assert_close(leave_one_out_advantages(rewards, 3), 1.5 * group_advantages(rewards, groups, scale="none"))


def test_single_mask_estimate_by_hand():
    # the ablation: logp_a / t on mask_a, 0 elsewhere. t = 0.25 in row 0, 0.5 in row 1.
    logp_a = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -0.1]])
    mask_a = torch.tensor([[True, False, True], [False, True, False]])
    got = single_mask_token_logps(logp_a, mask_a, torch.tensor([0.25, 0.5]))
    assert_close(got, torch.tensor([[-4.0, 0.0, -12.0], [0.0, -8.0, 0.0]]))
    # a scalar t: the official one ratio per batch
    assert_close(single_mask_token_logps(logp_a, mask_a, 0.5)[0], torch.tensor([-2.0, 0.0, -6.0]))
    with pytest.raises(ValueError, match="one shape"):
        single_mask_token_logps(logp_a, mask_a[:, :2], 0.5)

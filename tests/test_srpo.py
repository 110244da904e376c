"""SRPO loss (arXiv 2406.01660) on numbers worked out by hand."""

import pytest
import torch
from torch.testing import assert_close

from shared.preference import srpo_loss

# log-ratios in the argument order: r(y_w|x), r(y_l|x), r(y_w|x,y_l), r(y_l|x,y_l), r(y_w|x,y_w), r(y_l|x,y_w)
RATIOS = (1.0, -1.0, 2.0, 0.0, 1.0, -1.0)


def _inputs(ratios, dtype=torch.float32):
    ref = [torch.tensor([-10.0], dtype=dtype) for _ in ratios]  # [B] each
    policy = [r + torch.tensor([v], dtype=dtype) for r, v in zip(ref, ratios)]  # [B] each
    return policy, ref


def test_at_reference_is_one_minus_alpha_plus_half_alpha():
    # all log-ratios 0: (1 - a)(0 - 1)^2 + a (1/4 + 1/4) = 0.2 + 0.4 = 0.6 at a = 0.8
    policy, ref = _inputs((0.0,) * 6)
    losses, metrics = srpo_loss(*policy, *ref, beta=0.3, alpha=0.8)
    assert_close(losses, torch.tensor([0.6]))
    assert_close(metrics["generation_margin"], torch.tensor([0.0]))


def test_nonzero_log_ratios_by_hand():
    # beta 0.5, alpha 0.8, RATIOS:
    # generation: 0.5 (2 + 1 - (-1) - (-1)) = 2.5 -> (2.5 - 1)^2 = 2.25, times 0.2 = 0.45
    # revision from y_l: 1/2 - 0.5 (2 - 0) = -0.5 -> 0.25; from y_w: 1/2 - 0.5 (1 - (-1)) = -0.5 -> 0.25
    # total 0.45 + 0.8 * 0.5 = 0.85
    policy, ref = _inputs(RATIOS)
    losses, metrics = srpo_loss(*policy, *ref, beta=0.5, alpha=0.8)
    assert_close(losses, torch.tensor([0.85]))
    assert_close(metrics["generation_margin"], torch.tensor([2.5]))
    assert_close(metrics["revision_margin_given_rejected"], torch.tensor([1.0]))
    assert_close(metrics["revision_margin_given_chosen"], torch.tensor([1.0]))


def test_gradient_by_hand():
    # with g = 2.5, e_l = 1/2 - 1 = -0.5, e_w = -0.5, b = 0.5, a = 0.8:
    # dL/dr(y_w|x)     = (1-a) 2 (g-1) b                = 0.2 * 2 * 1.5 * 0.5 = 0.3
    # dL/dr(y_l|x)     = -0.3
    # dL/dr(y_w|x,y_l) = 0.3 + a 2 e_l (-b)              = 0.3 + 0.4 = 0.7
    # dL/dr(y_l|x,y_l) = a 2 e_l b                       = -0.4
    # dL/dr(y_w|x,y_w) = a 2 e_w (-b)                    = 0.4
    # dL/dr(y_l|x,y_w) = -0.3 + a 2 e_w b                = -0.7
    # the reference log-probs get the negatives
    policy, ref = _inputs(RATIOS)
    for t in policy + ref:
        t.requires_grad_(True)
    losses, _ = srpo_loss(*policy, *ref, beta=0.5, alpha=0.8)
    losses.sum().backward()
    expected = (0.3, -0.3, 0.7, -0.4, 0.4, -0.7)
    for p, r, e in zip(policy, ref, expected):
        assert_close(p.grad, torch.tensor([e]))
        assert_close(r.grad, torch.tensor([-e]))


def test_gradcheck_float64():
    torch.manual_seed(0)
    inputs = tuple(torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(12))  # [B] each
    assert torch.autograd.gradcheck(lambda *x: srpo_loss(*x, beta=0.7, alpha=0.8)[0], inputs)


def test_rejects_bad_inputs():
    policy, ref = _inputs((0.0,) * 6)
    with pytest.raises(ValueError, match="alpha"):
        srpo_loss(*policy, *ref, alpha=1.5)
    with pytest.raises(ValueError, match="beta"):
        srpo_loss(*policy, *ref, beta=0.0)
    with pytest.raises(ValueError, match=r"\[B\]"):
        srpo_loss(*policy[:-1], torch.zeros(2), *ref)

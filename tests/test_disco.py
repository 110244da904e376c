"""DisCO loss and micro-batch denominators, by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from shared.disco import disco_loss
from shared.losses import aggregation_denominator, clipped_policy_loss

# One group of four, two tokens each (mask all ones), logp = logp_old (KL = 0).
# Token log-probs chosen so the log-likelihood scores are the row means:
#   correct: -1, -3  -> mean s+ = -2
#   wrong:   -2, -4
LOGP = torch.tensor([[-1.0, -1.0], [-2.0, -4.0], [-2.0, -2.0], [-5.0, -3.0]])
CORRECT = torch.tensor([True, True, False, False])
GROUPS = torch.tensor([0, 0, 0, 0])
MASK = torch.ones(4, 2)


@pytest.mark.parametrize("tau, soft_max", [
    (1.0, math.log((math.exp(-2) + math.exp(-4)) / 2)),  # log(0.0768255) = -2.566219
    (10.0, 10 * math.log((math.exp(-0.2) + math.exp(-0.4)) / 2)),  # 10 * log(0.7445255) = -2.950112
])
def test_objective_by_hand(tau, soft_max):
    loss, metrics = disco_loss(LOGP, LOGP, MASK, CORRECT, GROUPS, tau=tau)
    assert_close(loss, torch.tensor(-(-2.0 - soft_max)))  # J = mean s+ - soft max of s-
    assert metrics["kl"] == 0.0 and metrics["groups_used"] == 1.0
    assert_close(torch.tensor(metrics["score_neg"]), torch.tensor(-3.0))


def test_gradient_on_correct_tokens():
    logp = LOGP.clone().requires_grad_(True)
    disco_loss(logp, LOGP, MASK, CORRECT, GROUPS, tau=1.0)[0].backward()
    # d(-J)/d logp of a correct token = -(1/2 correct answers) * (1/2 tokens) = -0.25
    assert_close(logp.grad[:2], torch.full((2, 2), -0.25))
    # wrong: d/d s_j of tau*log mean exp(s/tau) = softmax weight w_j; s = -2, -4 at tau 1:
    # w = e^-2 / (e^-2 + e^-4) = 0.880797, 0.119203; per token / 2
    w = torch.tensor([math.exp(-2), math.exp(-4)]) / (math.exp(-2) + math.exp(-4))
    assert_close(logp.grad[2:], (w / 2)[:, None].expand(2, 2))


def test_kl_squared_hinge():
    old = LOGP + 0.02  # KL(old || new) estimate = mean(logp_old - logp) = 0.02
    loss, metrics = disco_loss(LOGP, old, MASK, CORRECT, GROUPS, tau=1.0, delta=1e-4, penalty=1e3)
    base, _ = disco_loss(LOGP, LOGP, MASK, CORRECT, GROUPS, tau=1.0)
    assert_close(torch.tensor(metrics["kl"]), torch.tensor(0.02))
    assert_close(loss - base, torch.tensor(500 * 0.0199**2))  # (1e3 / 2) * (0.02 - 1e-4)^2 = 0.198005
    inside, _ = disco_loss(LOGP, LOGP + 5e-5, MASK, CORRECT, GROUPS, tau=1.0)  # KL < delta: no penalty
    assert_close(inside, base)


def test_likelihood_ratio_score_and_skipped_groups():
    # group 1 is all correct: no signal, left out (and out of the KL)
    logp = torch.cat([LOGP, torch.zeros(2, 2)])
    old = torch.cat([LOGP, torch.full((2, 2), -1.0)])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    correct = torch.cat([CORRECT, torch.tensor([True, True])])
    loss, metrics = disco_loss(logp, old, torch.ones(6, 2), correct, groups, score="likelihood_ratio", tau=1.0)
    # ratios are 1 in group 0: s = 1 everywhere, J = 1 - log mean exp(1) = 0
    assert_close(loss, torch.tensor(0.0))
    assert metrics["groups_used"] == 0.5 and metrics["kl"] == 0.0


def test_no_usable_group_gives_connected_zero():
    logp = LOGP.clone().requires_grad_(True)
    loss, metrics = disco_loss(logp, LOGP, MASK, torch.ones(4, dtype=torch.bool), GROUPS)
    loss.backward()
    assert loss.item() == 0.0 and metrics["groups_used"] == 0.0
    assert torch.equal(logp.grad, torch.zeros(4, 2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="score must be one of"):
        disco_loss(LOGP, LOGP, MASK, CORRECT, GROUPS, score="ratio")
    with pytest.raises(ValueError, match=r"correct and group_ids must be \[N\]=4"):
        disco_loss(LOGP, LOGP, MASK, CORRECT[:3], GROUPS)


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_weighted_by_denominator_equal_the_batch(aggregation):
    # 5 rows, ragged masks (row 3 fully masked); split 2 + 3
    torch.manual_seed(0)
    logp, old = torch.randn(5, 4), torch.randn(5, 4)
    adv = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]]).bool()
    full, _ = clipped_policy_loss(logp, old, adv, mask, aggregation=aggregation, max_length=4)
    total = aggregation_denominator(aggregation, mask)
    assert total == {"grpo": 4, "dapo": 10, "dr_grpo": 5}[aggregation]  # rows with tokens / tokens / rows
    parts = 0.0
    for rows in (slice(0, 2), slice(2, 5)):
        part, _ = clipped_policy_loss(logp[rows], old[rows], adv[rows], mask[rows], aggregation=aggregation, max_length=4)
        parts = parts + part * aggregation_denominator(aggregation, mask[rows]) / total
    assert_close(parts, full)

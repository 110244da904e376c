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


@pytest.mark.parametrize(
    "tau, soft_max",
    [
        (1.0, math.log((math.exp(-2) + math.exp(-4)) / 2)),  # log(0.0768255) = -2.566219
        (10.0, 10 * math.log((math.exp(-0.2) + math.exp(-0.4)) / 2)),  # 10 * log(0.7445255) = -2.950112
    ],
)
def test_objective_by_hand(tau, soft_max):
    loss, metrics = disco_loss(LOGP, LOGP, MASK, CORRECT, GROUPS, tau=tau)
    assert_close(loss, torch.tensor(-(-2.0 - soft_max)))  # J = mean s+ - soft max of s-
    assert metrics["trust_region_kl"] == 0.0 and metrics["groups_used"] == 1.0
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
    assert_close(torch.tensor(metrics["trust_region_kl"]), torch.tensor(0.02))
    assert_close(loss - base, torch.tensor(500 * 0.0199**2))  # (1e3 / 2) * (0.02 - 1e-4)^2 = 0.198005
    inside, _ = disco_loss(LOGP, LOGP + 5e-5, MASK, CORRECT, GROUPS, tau=1.0)  # KL < delta: no penalty
    assert_close(inside, base)


def test_likelihood_ratio_score_and_a_question_without_contrast():
    # group 1 is all correct: J_1 = 0, but it counts as a question and its tokens count in the KL
    logp = torch.cat([LOGP, torch.zeros(2, 2)])
    old = torch.cat([LOGP, torch.full((2, 2), -1.0)])  # k1 = old - logp = -1 on group 1's 4 tokens
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    correct = torch.cat([CORRECT, torch.tensor([True, True])])
    loss, metrics = disco_loss(logp, old, torch.ones(6, 2), correct, groups, score="likelihood_ratio", tau=1.0)
    # ratios are 1 in group 0: s = 1 everywhere, J_0 = 1 - log mean exp(1) = 0; KL = -4 / 12 < delta: no penalty
    assert_close(loss, torch.tensor(0.0))
    assert metrics["groups_used"] == 0.5
    assert_close(torch.tensor(metrics["trust_region_kl"]), torch.tensor(-4 / 12))


def test_objective_is_the_mean_over_all_questions():
    # group 0 as above (tau 1: J_0 = -2 - log((e^-2 + e^-4) / 2) = -2 + 2.566219 = 0.566219); group 1 all wrong
    logp = torch.cat([LOGP, torch.full((2, 2), -3.0)])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    correct = torch.cat([CORRECT, torch.tensor([False, False])])
    loss, metrics = disco_loss(logp, logp, torch.ones(6, 2), correct, groups, tau=1.0)
    j0 = -2.0 - math.log((math.exp(-2) + math.exp(-4)) / 2)
    assert_close(loss, torch.tensor(-j0 / 2))  # -(J_0 + 0) / 2 questions = -0.283110
    assert metrics["groups_used"] == 0.5


def test_trust_region_covers_every_completion():
    # group 0 (mixed) has not moved; group 1 (all correct) has: k1 = 0.02 on its 4 of the 12 tokens
    logp = torch.cat([LOGP, torch.full((2, 2), -1.0)])
    old = torch.cat([LOGP, torch.full((2, 2), -0.98)])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    correct = torch.cat([CORRECT, torch.tensor([True, True])])
    loss, metrics = disco_loss(logp, old, torch.ones(6, 2), correct, groups, tau=1.0)
    base, _ = disco_loss(logp, logp, torch.ones(6, 2), correct, groups, tau=1.0)
    kl = 0.02 * 4 / 12  # 0.0066667
    assert_close(torch.tensor(metrics["trust_region_kl"]), torch.tensor(kl))
    assert_close(loss - base, torch.tensor(500 * (kl - 1e-4) ** 2))  # (1e3 / 2) * 0.0065667^2 = 0.0215606
    # a batch without any mixed question is still held in the trust region: the hinge alone pulls it back
    moved = torch.full((2, 2), -1.0, requires_grad=True)
    alone, _ = disco_loss(
        moved, torch.full((2, 2), -0.98), torch.ones(2, 2), torch.tensor([True, True]), torch.tensor([0, 0])
    )
    alone.backward()
    # d/dlogp of (beta/2)(K - delta)^2 with K = mean(old - logp) over 4 tokens: -beta (K - delta) / 4
    assert_close(alone, torch.tensor(500 * (0.02 - 1e-4) ** 2))
    assert_close(moved.grad, torch.full((2, 2), -1e3 * (0.02 - 1e-4) / 4))


def test_a_dropped_completion_is_no_answer():
    # row 3 (wrong) has no tokens: group 0 is then the three others, as if row 3 were not there
    mask = MASK.clone()
    mask[3] = 0
    loss, metrics = disco_loss(LOGP, LOGP + 0.1, mask, CORRECT, GROUPS, tau=1.0)
    kept, kept_metrics = disco_loss(LOGP[:3], LOGP[:3] + 0.1, MASK[:3], CORRECT[:3], GROUPS[:3], tau=1.0)
    assert_close(loss, kept)
    assert metrics == kept_metrics
    # and a question whose completions are all dropped is not counted
    both, _ = disco_loss(
        torch.cat([LOGP, LOGP]),
        torch.cat([LOGP, LOGP]),
        torch.cat([MASK, torch.zeros(4, 2)]),
        torch.cat([CORRECT, CORRECT]),
        torch.tensor([0] * 4 + [1] * 4),
        tau=1.0,
    )
    assert_close(both, disco_loss(LOGP, LOGP, MASK, CORRECT, GROUPS, tau=1.0)[0])


@pytest.mark.parametrize("score", ["log_likelihood", "likelihood_ratio"])
@pytest.mark.parametrize("parts", [[[0, 1, 2, 3]], [[0, 1], [2, 3]], [[0], [1], [2], [3]], [[3, 0], [2], [1]]])
def test_parts_with_the_batch_kl_sum_to_the_whole_batch(score, parts):
    """Micro-batches given the whole batch's normalisers and KL value: their loss values and gradients sum to the
    squared hinge's computed on the whole batch by autograd (float64, to 1e-12)."""
    g = torch.Generator().manual_seed(3)
    N, T, G = 12, 5, 3
    logp = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3  # [N, T]
    old = logp + 0.2 * torch.randn(N, T, generator=g, dtype=torch.float64)  # [N, T] far enough: K > delta
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (N,), generator=g)[:, None]).double()  # [N, T]
    mask[7] = 0  # a dropped completion
    correct = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0, 1, 0, 1, 1]).bool()  # groups: all right, all wrong, mixed x2
    groups = torch.arange(N) // G
    kwargs = dict(score=score, tau=2.0, delta=1e-4, penalty=1e3)

    whole_logp = logp.clone().requires_grad_(True)
    whole, whole_metrics = disco_loss(whole_logp, old, mask, correct, groups, **kwargs)
    whole.backward()
    assert whole_metrics["trust_region_kl"] > 1e-4  # the hinge is active

    part_logp = logp.clone().requires_grad_(True)
    batch_kl = float((old - logp)[mask.bool()].sum() / mask.sum())  # the no-grad pass over the batch
    total = 0.0
    for questions in parts:
        rows = torch.cat([torch.arange(q * G, (q + 1) * G) for q in questions])
        loss, metrics = disco_loss(
            part_logp[rows],
            old[rows],
            mask[rows],
            correct[rows],
            groups[rows],
            questions=4,
            kl_tokens=float(mask.sum()),
            batch_kl=batch_kl,
            **kwargs,
        )
        loss.backward()
        total = total + loss.detach()
        assert metrics["trust_region_kl"] == batch_kl
    assert_close(total, whole.detach(), atol=1e-12, rtol=1e-12)
    assert_close(part_logp.grad, whole_logp.grad, atol=1e-12, rtol=1e-12)


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
        part, _ = clipped_policy_loss(
            logp[rows], old[rows], adv[rows], mask[rows], aggregation=aggregation, max_length=4
        )
        parts = parts + part * aggregation_denominator(aggregation, mask[rows]) / total
    assert_close(parts, full)

"""clipped_policy_loss: every aggregation, the clip fractions and the gradient, by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from shared.losses import LOSS_AGGREGATIONS, clipped_policy_loss

# The 2x3 example used throughout. logp_old = 0, so ratio = exp(logp_new).
# eps_low = 0.2, eps_high = 0.28 (DAPO clip-higher) -> clip range [0.8, 1.28].
#   row 0, A = +1: ratio 1.0 -> -min(1.0, 1.0)   = -1.0
#                  ratio 1.5 -> -min(1.5, 1.28)  = -1.28   upper clip binds (A > 0, ratio > 1.28)
#                  ratio 0.5 -> -min(0.5, 0.8)   = -0.5    not clipped: the unclipped term is smaller
#   row 1, A = -2: ratio 1.1 -> -min(-2.2, -2.2) =  2.2
#                  ratio 0.7 -> -min(-1.4, -1.6) =  1.6    lower clip binds (A < 0, ratio < 0.8)
#                  ratio 2.0 -> masked out (would be -min(-4.0, -2.56) = 4.0)
# Row sums over unmasked: -2.78 (3 tokens) and 3.8 (2 tokens); batch sum 1.02 over 5 tokens.
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 2.0]])
ADVANTAGES = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def run(aggregation="grpo", mask=MASK, advantages=ADVANTAGES, **kwargs):
    logp_new = RATIOS.log().requires_grad_(True)
    logp_old = torch.zeros(2, 3, requires_grad=True)  # must receive no gradient
    loss, metrics = clipped_policy_loss(
        logp_new, logp_old, advantages, mask, eps_low=0.2, eps_high=0.28, aggregation=aggregation, **kwargs
    )
    return loss, metrics, logp_new, logp_old


@pytest.mark.parametrize(
    "aggregation, expected",
    [
        ("grpo", (-2.78 / 3 + 3.8 / 2) / 2),  # (-0.926667 + 1.9) / 2 = 0.486667: mean of the row means
        ("dapo", 1.02 / 5),  # 0.204: token mean over the batch
        ("dr_grpo", 1.02 / (2 * 3)),  # 0.17: sum / (B * T)
    ],
)
def test_aggregations_by_hand(aggregation, expected):
    loss, _, _, _ = run(aggregation)
    assert_close(loss, torch.tensor(expected))


def test_dr_grpo_max_length():
    loss, _, _, _ = run("dr_grpo", max_length=10)
    assert_close(loss, torch.tensor(1.02 / 20))  # 0.051
    with pytest.raises(ValueError, match="max_length"):
        run("dr_grpo", max_length=0)


def test_metrics_by_hand():
    _, metrics, _, _ = run("dapo")
    # 5 unmasked elements: one lower clip (row 1, ratio 0.7), one upper clip (row 0, ratio 1.5);
    # ratio mean (1 + 1.5 + 0.5 + 1.1 + 0.7) / 5 = 0.96; max 1.5 (the masked 2.0 is not counted)
    assert metrics == pytest.approx(
        {"clip_frac_low": 0.2, "clip_frac_high": 0.2, "clip_frac": 0.4, "ratio_mean": 0.96, "ratio_max": 1.5}
    )
    assert all(isinstance(v, float) for v in metrics.values())


def test_gradient_is_zero_where_clipped_by_hand():
    # d(-ratio * A)/d logp_new = -ratio * A on unclipped elements, 0 on clipped and masked ones.
    # grpo weights: 1 / (3 tokens * 2 rows) = 1/6 in row 0, 1 / (2 * 2) = 1/4 in row 1
    #   row 0: -1 * 1.0 / 6 = -0.166667, clipped 0, -1 * 0.5 / 6 = -0.083333
    #   row 1: 2 * 1.1 / 4 = 0.55, clipped 0, masked 0
    loss, _, logp_new, logp_old = run("grpo")
    loss.backward()
    assert_close(logp_new.grad, torch.tensor([[-1 / 6, 0.0, -0.5 / 6], [0.55, 0.0, 0.0]]))
    assert logp_old.grad is None
    # dapo weights 1/5: row 0 (-0.2, 0, -0.1), row 1 (0.44, 0, 0)
    loss, _, logp_new, _ = run("dapo")
    loss.backward()
    assert_close(logp_new.grad, torch.tensor([[-0.2, 0.0, -0.1], [0.44, 0.0, 0.0]]))


def test_clip_only_binds_on_the_side_that_helps_the_objective():
    # A = -1, ratio 2.0 > 1.28: -min(-2.0, -1.28) = 2.0 and the gradient stays -ratio * A = 2.0
    # (the pessimistic bound keeps the unclipped term), so it is not counted as clipped.
    logp = torch.tensor([[math.log(2.0)]], requires_grad=True)
    loss, metrics = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), eps_low=0.2, eps_high=0.28)
    loss.backward()
    assert_close(loss.detach(), torch.tensor(2.0))
    assert_close(logp.grad, torch.tensor([[2.0]]))
    assert metrics["clip_frac"] == 0.0


def test_fully_masked_row_is_left_out():
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    loss, metrics, _, _ = run("grpo", mask=mask)
    assert_close(loss, torch.tensor(-2.78 / 3))  # mean over the one non-empty row only
    loss, _, _, _ = run("dapo", mask=mask)
    assert_close(loss, torch.tensor(-2.78 / 3))  # 3 tokens in the batch
    loss, _, _, _ = run("dr_grpo", mask=mask)
    assert_close(loss, torch.tensor(-2.78 / 6))  # still divided by B * T
    assert metrics["clip_frac_high"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("aggregation", sorted(LOSS_AGGREGATIONS))
def test_everything_masked_gives_zero_differentiable_loss(aggregation):
    loss, metrics, logp_new, _ = run(aggregation, mask=torch.zeros(2, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logp_new.grad, torch.zeros(2, 3))
    assert metrics["clip_frac"] == 0.0 and math.isnan(metrics["ratio_mean"])


def test_infinite_logprobs_under_the_mask_do_not_leak_nan():
    # padding often holds -inf log-probs in both tensors; -inf - (-inf) = NaN must stay masked
    logp_new = torch.tensor([[0.0, -math.inf]], requires_grad=True)
    logp_old = torch.tensor([[0.0, -math.inf]])
    loss, metrics = clipped_policy_loss(logp_new, logp_old, torch.tensor([1.0]), torch.tensor([[True, False]]))
    loss.backward()
    assert_close(loss.detach(), torch.tensor(-1.0))
    assert_close(logp_new.grad, torch.tensor([[-1.0, 0.0]]))
    assert metrics["ratio_max"] == 1.0


def test_mask_none_bool_and_per_element_advantages_agree():
    full = run("grpo", mask=None)[0]
    # no mask: row 1 keeps its third element: (-2.78 / 3 + (3.8 + 4.0) / 3) / 2 = 0.836667
    assert_close(full, torch.tensor((-2.78 / 3 + 7.8 / 3) / 2))
    assert_close(run("grpo", mask=MASK.bool())[0], run("grpo")[0])
    per_element = ADVANTAGES[:, None].expand(2, 3).clone()  # [B, T]
    assert_close(run("grpo", advantages=per_element)[0], run("grpo")[0])


def test_eps_high_defaults_to_eps_low():
    # ratio 1.25, A = 1, eps 0.2: -min(1.25, 1.2) = -1.2 and the upper clip binds
    logp = torch.log(torch.tensor([[1.25]]))
    loss, metrics = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), eps_low=0.2)
    assert_close(loss, torch.tensor(-1.2))
    assert metrics["clip_frac_high"] == 1.0


def test_bad_arguments():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"aggregation must be one of \['dapo', 'dr_grpo', 'grpo'\]"):
        clipped_policy_loss(logp, logp, torch.ones(2), aggregation="mean")
    with pytest.raises(ValueError, match="logp_new must be"):
        clipped_policy_loss(torch.zeros(3), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="logp_old has shape"):
        clipped_policy_loss(logp, torch.zeros(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="advantages must be"):
        clipped_policy_loss(logp, logp, torch.ones(3))
    with pytest.raises(ValueError, match="mask has shape"):
        clipped_policy_loss(logp, logp, torch.ones(2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="only 0 and 1"):
        clipped_policy_loss(logp, logp, torch.ones(2), torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="eps_low"):
        clipped_policy_loss(logp, logp, torch.ones(2), eps_low=1.0)


def test_sppo_loss_by_hand():
    """Row 0: log-ratio 0.5 + 0 (the third token masked), target 0.25 / 0.5 = 0.5, loss 0; row 1: log-ratio 1,
    target -0.5, loss 1.5^2 = 2.25; row 2 has no kept token and is left out: loss (0 + 2.25) / 2 = 1.125, and the
    gradient on each of row 1's tokens is 2 * 1.5 / 2 = 1.5."""
    from shared.losses import sppo_policy_loss

    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [-4.0, -4.0, -4.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0, -2.5], [-2.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    advantages = torch.tensor([0.25, -0.25, 7.0])[:, None].expand(3, 3)  # [B, T] one value per sequence
    loss, metrics = sppo_policy_loss(logp, old, advantages, mask, beta=0.5)
    assert loss.item() == pytest.approx(1.125)
    assert metrics == pytest.approx({"log_ratio_mean": 0.75, "target_mean_abs": 0.5})
    loss.backward()
    assert torch.equal(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [1.5, 1.5, 1.5], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="beta must be positive"):
        sppo_policy_loss(logp, old, advantages, mask, beta=0.0)

import math

import pytest
import torch
from torch.testing import assert_close

from shared.losses import clipped_policy_loss

# ratios (logp_old = 0): row 0 (A = +1): 1.0, 1.5, 0.5; row 1 (A = -2): 1.1, 0.7, 1.0 (last masked)
# eps_low = 0.2, eps_high = 0.3 -> clip range [0.8, 1.3]
# row 0: -min(1.0, 1.0) = -1; -min(1.5, 1.3) = -1.3 (upper clip binds); -min(0.5, 0.8) = -0.5
# row 1: -min(-2.2, -2.2) = 2.2; -min(-1.4, -1.6) = 1.6 (lower clip binds); 2.0 (masked)
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 1.0]])
ADVANTAGES = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def run(aggregation, mask=MASK, **kwargs):
    logp_new = RATIOS.log().clone().requires_grad_(True)
    loss, metrics = clipped_policy_loss(logp_new, torch.zeros(2, 3), ADVANTAGES, mask, eps_low=0.2, eps_high=0.3,
                                        aggregation=aggregation, **kwargs)
    return loss, metrics, logp_new


@pytest.mark.parametrize("aggregation, expected", [
    ("grpo", ((-1 - 1.3 - 0.5) / 3 + (2.2 + 1.6) / 2) / 2),  # mean of per-row token means
    ("dapo", (-2.8 + 3.8) / 5),  # token mean over the batch
    ("dr_grpo", (-2.8 + 3.8) / (2 * 3)),  # sum / (B * L_max)
])
def test_aggregations_by_hand(aggregation, expected):
    loss, _, _ = run(aggregation)
    assert_close(loss, torch.tensor(expected))


def test_dr_grpo_constant_length_and_metrics():
    loss, metrics, _ = run("dr_grpo", max_length=4)
    assert_close(loss, torch.tensor(1.0 / 8))
    assert metrics == pytest.approx({"clip_frac_low": 0.2, "clip_frac_high": 0.2, "clip_frac": 0.4,
                                     "ratio_mean": 4.8 / 5, "ratio_max": 1.5})


def test_gradient_is_zero_where_clipped_and_masked():
    loss, _, logp_new = run("dapo")
    loss.backward()
    # d(-r A)/d logp = -r A, divided by 5 tokens; clipped (0,1), (1,1) and masked (1,2) give 0
    assert_close(logp_new.grad, torch.tensor([[-0.2, 0.0, -0.1], [0.44, 0.0, 0.0]]))


def test_fully_masked_rows():
    loss, _, _ = run("grpo", mask=torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert_close(loss, torch.tensor(-2.8 / 3))  # the empty row is left out of the mean
    loss, metrics, logp_new = run("grpo", mask=torch.zeros(2, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logp_new.grad, torch.zeros(2, 3))


def test_symmetric_default_and_bad_aggregation():
    logp = torch.log(torch.tensor([[1.25]]))
    loss, metrics = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), eps_low=0.2)
    assert_close(loss, torch.tensor(-1.2))  # eps_high defaults to eps_low
    assert metrics["clip_frac_high"] == 1.0
    with pytest.raises(ValueError, match="aggregation must be one of"):
        clipped_policy_loss(logp, logp, torch.ones(1), aggregation="mean")

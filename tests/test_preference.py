import math

import pytest
import torch
from torch.testing import assert_close

from shared.preference import PREFERENCE_LOSSES

# policy chosen -1, rejected -3; reference -2 for both -> implied log-ratios +1 and -1, D = 2
PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
SOFTPLUS_MINUS_1 = math.log(1 + math.exp(-1))  # -log sigmoid(1) = 0.313262
SOFTPLUS_1 = math.log(1 + math.exp(1))  # -log sigmoid(-1) = 1.313262


def test_sigmoid_dpo_and_label_smoothing():
    losses, chosen, rejected = PREFERENCE_LOSSES["sigmoid"](PC, PR, RC, RR, beta=0.5)  # beta D = 1
    assert_close(losses, torch.tensor([SOFTPLUS_MINUS_1]))
    assert_close(chosen, torch.tensor([0.5])) and assert_close(rejected, torch.tensor([-0.5]))
    losses, _, _ = PREFERENCE_LOSSES["sigmoid"](PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert_close(losses, torch.tensor([0.9 * SOFTPLUS_MINUS_1 + 0.1 * SOFTPLUS_1]))  # 0.413262


def test_robust_dpo():
    losses, _, _ = PREFERENCE_LOSSES["robust"](PC, PR, RC, RR, beta=0.5, flip_rate=0.1)
    assert_close(losses, torch.tensor([(0.9 * SOFTPLUS_MINUS_1 - 0.1 * SOFTPLUS_1) / 0.8]))  # 0.188262
    with pytest.raises(ValueError, match="flip_rate"):
        PREFERENCE_LOSSES["robust"](PC, PR, RC, RR, flip_rate=0.5)


def test_hinge():
    assert_close(PREFERENCE_LOSSES["hinge"](PC, PR, RC, RR, beta=0.5)[0], torch.tensor([0.0]))  # 1 - 1
    assert_close(PREFERENCE_LOSSES["hinge"](PC, PR, RC, RR, beta=0.25)[0], torch.tensor([0.5]))  # 1 - 0.5


def test_ipo_uses_per_token_log_ratios():
    # chosen 1 / 2 tokens = 0.5, rejected -1 / 4 tokens = -0.25 -> D_avg 0.75; 1 / (2 * 0.5) = 1
    losses, _, _ = PREFERENCE_LOSSES["ipo"](PC, PR, RC, RR, torch.tensor([2.0]), torch.tensor([4.0]), beta=0.5)
    assert_close(losses, torch.tensor([(0.75 - 1) ** 2]))


def test_simpo_needs_no_reference():
    # 2 * (-2 / 4) = -1; 2 * (-6 / 3) = -4; margin 3 - gamma 0.5 = 2.5 -> log(1 + e^-2.5) = 0.078889
    losses, chosen, rejected = PREFERENCE_LOSSES["simpo"](torch.tensor([-2.0]), torch.tensor([-6.0]),
                                                          torch.tensor([4.0]), torch.tensor([3.0]), beta=2.0, gamma=0.5)
    assert_close(losses, torch.tensor([math.log(1 + math.exp(-2.5))]))
    assert_close(chosen, torch.tensor([-1.0])) and assert_close(rejected, torch.tensor([-4.0]))


def test_gradients_push_chosen_up():
    pc = PC.clone().requires_grad_(True)
    PREFERENCE_LOSSES["sigmoid"](pc, PR, RC, RR, beta=0.5)[0].sum().backward()
    # d/dpc -log s(b D) = -b (1 - s(b D)) = -0.5 * (1 - s(1))
    assert_close(pc.grad, torch.tensor([-0.5 * (1 - 1 / (1 + math.exp(-1)))]))

"""Preference losses on numbers worked out by hand."""

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from shared.preference import (
    PREFERENCE_LOSSES,
    chosen_nll_loss,
    dpo_sigmoid_loss,
    dpop_loss,
    hinge_loss,
    ipo_loss,
    modpo_loss,
    robust_dpo_loss,
    simpo_loss,
)

# policy chosen -10, rejected -12; reference -11 for both
# -> log-ratios: chosen +1, rejected -1; D = 1 - (-1) = 2; with beta 0.1, beta D = 0.2
PC, PR, RC, RR = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
NEG_LOGSIG_02 = math.log(1 + math.exp(-0.2))  # -log s(0.2)  = 0.598139
NEG_LOGSIG_M02 = math.log(1 + math.exp(0.2))  # -log s(-0.2) = 0.798139


def test_dict():
    assert PREFERENCE_LOSSES == {
        "sigmoid": dpo_sigmoid_loss,
        "dpop": dpop_loss,
        "ipo": ipo_loss,
        "robust": robust_dpo_loss,
        "hinge": hinge_loss,
        "simpo": simpo_loss,
        "modpo": modpo_loss,
    }


def test_sigmoid_dpo_by_hand():
    losses, chosen, rejected = dpo_sigmoid_loss(PC, PR, RC, RR, beta=0.1)
    assert_close(losses, torch.tensor([0.598139]))  # log(1 + e^-0.2)
    assert_close(chosen, torch.tensor([0.1]))  # beta * (pc - rc) = 0.1 * 1
    assert_close(rejected, torch.tensor([-0.1]))  # beta * (pr - rr) = 0.1 * -1


def test_sigmoid_dpo_label_smoothing_by_hand():
    # 0.9 * 0.598139 + 0.1 * 0.798139 = 0.538325 + 0.079814 = 0.618139
    losses, _, _ = dpo_sigmoid_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    assert_close(losses, torch.tensor([0.618139]))
    assert_close(losses, torch.tensor([0.9 * NEG_LOGSIG_02 + 0.1 * NEG_LOGSIG_M02]))
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_sigmoid_loss(PC, PR, RC, RR, label_smoothing=0.5)


def test_sigmoid_dpo_gradient_pushes_chosen_up():
    pc = PC.clone().requires_grad_(True)
    losses, chosen, _ = dpo_sigmoid_loss(pc, PR, RC, RR, beta=0.1)
    losses.sum().backward()
    # d/dpc -log s(beta D) = -beta (1 - s(beta D)) = -0.1 * (1 - 0.549834) = -0.0450166
    assert_close(pc.grad, torch.tensor([-0.0450166]))
    assert not chosen.requires_grad  # logging rewards are detached


def test_sigmoid_dpo_is_stable_for_large_margins():
    big = torch.tensor([1e4])
    losses, _, _ = dpo_sigmoid_loss(big, -big, torch.zeros(1), torch.zeros(1), beta=1.0)  # beta D = 2e4
    assert losses.item() == 0.0
    losses, _, _ = dpo_sigmoid_loss(-big, big, torch.zeros(1), torch.zeros(1), beta=1.0)  # beta D = -2e4
    assert_close(losses, torch.tensor([2e4]))  # -log s(-x) = x for large x, finite


def test_dpop_is_dpo_while_the_chosen_answer_stays_above_the_reference():
    # PC = -10 > RC = -11: penalty max(0, -11 - -10) = 0, so DPOP is sigmoid DPO
    assert_close(dpop_loss(PC, PR, RC, RR, beta=0.1, lambda_=50.0)[0], torch.tensor([0.598139]))


def test_dpop_penalises_a_chosen_answer_below_the_reference_by_hand():
    # chosen -12 vs reference -11 (log-ratio -1), rejected -15 vs -11 (-4): D = 3, penalty 1
    # beta 0.5, lambda 2: beta (D - lambda * 1) = 0.5; -log s(0.5) = log(1 + e^-0.5) = 0.474077
    # (plain DPO: -log s(1.5) = 0.201413, it likes this pair though the chosen answer lost probability)
    pc = torch.tensor([-12.0], requires_grad=True)
    ref = torch.tensor([-11.0])
    losses, chosen, rejected = dpop_loss(pc, torch.tensor([-15.0]), ref, ref, beta=0.5, lambda_=2.0)
    assert_close(losses, torch.tensor([0.474077]))
    assert_close(dpo_sigmoid_loss(pc, torch.tensor([-15.0]), ref, ref, beta=0.5)[0], torch.tensor([0.201413]))
    assert_close(chosen, torch.tensor([-0.5])) and assert_close(rejected, torch.tensor([-2.0]))
    losses.sum().backward()
    # d/dpc = -beta (1 + lambda) (1 - s(0.5)) = -0.5 * 3 * 0.377541 = -0.566311: (1 + lambda) times DPO's pull
    assert_close(pc.grad, torch.tensor([-0.566311]))
    with pytest.raises(ValueError, match="lambda_"):
        dpop_loss(PC, PR, RC, RR, lambda_=-1.0)


def test_robust_dpo_by_hand():
    # [0.9 * 0.598139 - 0.1 * 0.798139] / (1 - 0.2) = (0.538325 - 0.079814) / 0.8 = 0.573139
    losses, chosen, rejected = robust_dpo_loss(PC, PR, RC, RR, beta=0.1, flip_rate=0.1)
    assert_close(losses, torch.tensor([0.573139]))
    assert_close(chosen, torch.tensor([0.1])) and assert_close(rejected, torch.tensor([-0.1]))
    # flip_rate 0 is plain DPO
    assert_close(robust_dpo_loss(PC, PR, RC, RR, beta=0.1, flip_rate=0.0)[0], torch.tensor([NEG_LOGSIG_02]))
    for bad in (0.5, -0.1):
        with pytest.raises(ValueError, match="flip_rate must be in"):
            robust_dpo_loss(PC, PR, RC, RR, flip_rate=bad)


def test_hinge_by_hand():
    assert_close(hinge_loss(PC, PR, RC, RR, beta=0.1)[0], torch.tensor([0.8]))  # relu(1 - 0.2)
    assert_close(hinge_loss(PC, PR, RC, RR, beta=0.5)[0], torch.tensor([0.0]))  # relu(1 - 1)
    pc = PC.clone().requires_grad_(True)
    hinge_loss(pc, PR, RC, RR, beta=1.0)[0].sum().backward()  # relu(1 - 2) = 0: past the margin
    assert_close(pc.grad, torch.tensor([0.0]))
    pc = PC.clone().requires_grad_(True)
    hinge_loss(pc, PR, RC, RR, beta=0.1)[0].sum().backward()  # inside the margin: d/dpc = -beta
    assert_close(pc.grad, torch.tensor([-0.1]))


def test_ipo_uses_per_token_log_ratios():
    # chosen log-ratio 1 over 2 tokens = 0.5; rejected -1 over 4 tokens = -0.25 -> D_avg = 0.75
    # beta 0.5: target 1 / (2 * 0.5) = 1 -> (0.75 - 1)^2 = 0.0625
    # beta 0.1: target 5            -> (0.75 - 5)^2 = 18.0625
    lc, lr = torch.tensor([2.0]), torch.tensor([4.0])
    assert_close(ipo_loss(PC, PR, RC, RR, lc, lr, beta=0.5)[0], torch.tensor([0.0625]))
    losses, chosen, rejected = ipo_loss(PC, PR, RC, RR, lc, lr, beta=0.1)
    assert_close(losses, torch.tensor([18.0625]))
    assert_close(chosen, torch.tensor([0.1])) and assert_close(rejected, torch.tensor([-0.1]))
    with pytest.raises(ValueError, match="chosen_lengths must be > 0"):
        ipo_loss(PC, PR, RC, RR, torch.tensor([0.0]), lr)


def test_simpo_needs_no_reference():
    assert "ref_chosen" not in inspect.signature(simpo_loss).parameters
    # chosen: 2 * (-2 / 4) = -1; rejected: 2 * (-6 / 3) = -4; margin -1 - (-4) - 0.5 = 2.5
    # loss = log(1 + e^-2.5) = 0.078889
    losses, chosen, rejected = simpo_loss(
        torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([4.0]), torch.tensor([3.0]), beta=2.0, gamma=0.5
    )
    assert_close(losses, torch.tensor([0.078889]))
    assert_close(chosen, torch.tensor([-1.0])) and assert_close(rejected, torch.tensor([-4.0]))


def test_batched_rows_are_independent():
    pc, pr = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -5.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    # row 1 has D = 0: -log s(0) = log 2
    assert_close(dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.1)[0], torch.tensor([NEG_LOGSIG_02, math.log(2)]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="same shape"):
        dpo_sigmoid_loss(PC, torch.zeros(2), RC, RR)
    with pytest.raises(ValueError, match="beta must be > 0"):
        hinge_loss(PC, PR, RC, RR, beta=0.0)


def test_chosen_nll_by_hand():
    # chosen log-probs -10 over 4 tokens and -3 over 2 tokens -> NLL per token 2.5 and 1.5
    assert_close(chosen_nll_loss(torch.tensor([-10.0, -3.0]), torch.tensor([4.0, 2.0])), torch.tensor([2.5, 1.5]))
    with pytest.raises(ValueError, match="chosen_lengths"):
        chosen_nll_loss(torch.tensor([-1.0]), torch.tensor([0.0]))

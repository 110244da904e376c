"""shared/preference.py's flow-model preference losses (Diffusion-DPO and SmPO-Diffusion for rectified flow):
hand-worked numbers, the rectified-flow inputs by hand, the label against the official code's formula, the
limits (policy = reference, alpha = 1, alpha = 1/2), gradients and bad arguments."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from shared.preference import (
    FLOW_PREFERENCE_LOSSES,
    diffusion_dpo_loss,
    flow_matching_errors,
    flow_matching_inputs,
    flow_pair_inputs,
    smpo_diffusion_loss,
    smpo_label,
)

torch.set_num_threads(1)

# Two pairs, beta 10 (so -beta/2 = -5):
# pair 0: err_w 0.30, ref_w 0.40, err_l 0.50, ref_l 0.45
#   (err_w - ref_w) - (err_l - ref_l) = -0.10 - 0.05 = -0.15 -> logit = -5 * -0.15 = 0.75
#   chosen reward -5 * -0.10 = 0.5, rejected reward -5 * 0.05 = -0.25
# pair 1: err_w 0.50, ref_w 0.40, err_l 0.30, ref_l 0.30
#   0.10 - 0.00 = 0.10 -> logit = -0.5; chosen -0.5, rejected 0
ERR_W, REF_W = torch.tensor([0.30, 0.50], dtype=torch.float64), torch.tensor([0.40, 0.40], dtype=torch.float64)
ERR_L, REF_L = torch.tensor([0.50, 0.30], dtype=torch.float64), torch.tensor([0.45, 0.30], dtype=torch.float64)
LOGITS = (0.75, -0.5)


def neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def test_dict():
    assert FLOW_PREFERENCE_LOSSES == {"diffusion_dpo": diffusion_dpo_loss, "smpo": smpo_diffusion_loss}


def test_flow_matching_inputs_and_errors_by_hand():
    # x0 = [1, 2], eps = [3, -1], t = 0.25: x_t = 0.75 [1, 2] + 0.25 [3, -1] = [1.5, 1.25]; target = [2, -3]
    x_t, target = flow_matching_inputs(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]]), torch.tensor([0.25]))
    assert_close(x_t, torch.tensor([[1.5, 1.25]]))
    assert_close(target, torch.tensor([[2.0, -3.0]]))
    # prediction [1, -1]: ((2 - 1)^2 + (-3 + 1)^2) / 2 = 2.5
    assert_close(flow_matching_errors(torch.tensor([[1.0, -1.0]]), target), torch.tensor([2.5]))
    # t = 0 is the data, t = 1 the noise; a [N, C, H, W] sample broadcasts t over C, H, W
    x0, eps = torch.arange(8.0).reshape(2, 1, 2, 2), -torch.ones(2, 1, 2, 2)
    x_t, target = flow_matching_inputs(x0, eps, torch.tensor([0.0, 1.0]))
    assert_close(x_t[0], x0[0])
    assert_close(x_t[1], eps[1])
    assert_close(target, eps - x0)


def test_flow_pair_inputs_share_noise_and_time():
    winner, loser = torch.zeros(2, 3), torch.ones(2, 3)
    noise = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    x_t, target = flow_pair_inputs(winner, loser, noise, torch.tensor([0.5, 0.25]))
    # winners first: x_t = t eps; losers: (1 - t) + t eps, the same eps and t per pair
    assert_close(x_t[:2], torch.tensor([[0.5, 1.0, 1.5], [1.0, 1.25, 1.5]]))
    assert_close(x_t[2:], torch.tensor([[1.0, 1.5, 2.0], [1.75, 2.0, 2.25]]))
    assert_close(target, torch.cat([noise, noise - 1]))


def test_diffusion_dpo_by_hand():
    losses, metrics = diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, beta=10.0)
    assert_close(losses, torch.tensor([neg_log_sigmoid(x) for x in LOGITS], dtype=torch.float64))
    assert_close(metrics["reward_margin"], torch.tensor(LOGITS, dtype=torch.float64))
    assert_close(metrics["chosen_rewards"], torch.tensor([0.5, -0.5], dtype=torch.float64))
    assert_close(metrics["rejected_rewards"], torch.tensor([-0.25, 0.0], dtype=torch.float64))
    assert metrics["implicit_accuracy"].tolist() == [1.0, 0.0]
    assert_close(metrics["policy_error"], torch.tensor([0.40, 0.40], dtype=torch.float64))
    assert_close(metrics["reference_error"], torch.tensor([0.425, 0.35], dtype=torch.float64))


def test_diffusion_dpo_at_the_reference_is_log_2_and_pushes_the_winner_error_down():
    err_w = torch.tensor([0.3], requires_grad=True)
    err_l = torch.tensor([0.6], requires_grad=True)
    losses, _ = diffusion_dpo_loss(err_w, err_l, torch.tensor([0.3]), torch.tensor([0.6]), beta=4.0)
    assert_close(losses, torch.tensor([math.log(2)]))
    losses.sum().backward()
    # d/d err_w of -log s(-beta/2 (err_w - ...)) at logit 0 = (beta/2) s(0) = 1; d/d err_l = -1
    assert_close(err_w.grad, torch.tensor([1.0]))
    assert_close(err_l.grad, torch.tensor([-1.0]))


def test_diffusion_dpo_on_a_linear_velocity_model_written_out():
    # An independent path: a linear v(x) = A x, errors written out by hand from x_t and eps - x0.
    g = torch.Generator().manual_seed(0)
    winner, loser, noise = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    policy, reference = (torch.randn(4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    x_t, target = flow_pair_inputs(winner, loser, noise, t)
    errors = {name: flow_matching_errors(x_t @ m.T, target) for name, m in (("p", policy), ("r", reference))}
    losses, _ = diffusion_dpo_loss(errors["p"][:3], errors["p"][3:], errors["r"][:3], errors["r"][3:], beta=2.0)
    for i in range(3):
        terms = {}
        for name, x0 in (("w", winner[i]), ("l", loser[i])):
            xt = (1 - t[i]) * x0 + t[i] * noise[i]
            for model_name, m in (("p", policy), ("r", reference)):
                terms[name + model_name] = sum((noise[i][d] - x0[d] - (m @ xt)[d]) ** 2 for d in range(4)) / 4
        logit = -1.0 * ((terms["wp"] - terms["wr"]) - (terms["lp"] - terms["lr"]))
        assert_close(losses[i], -F.logsigmoid(logit))


def test_smpo_label_by_hand_and_against_the_official_normalised_softmax():
    # r_w 0.8, r_l 0.6, temperature 0.2: s(1) = 0.7310586
    assert_close(smpo_label(torch.tensor([0.8]), torch.tensor([0.6]), 0.2), torch.tensor([1 / (1 + math.exp(-1))]))
    # JaydenLyh/SmPO train.py: min-max normalise PickScores, then exp(s_w) / (exp(s_w) + exp(s_l))
    low, high = 0.11543526500463486, 0.28201571106910706
    scores_w = torch.tensor([0.25, 0.20, 0.2213], dtype=torch.float64)
    scores_l = torch.tensor([0.12, 0.20, 0.2412], dtype=torch.float64)
    norm_w, norm_l = (scores_w - low) / (high - low), (scores_l - low) / (high - low)
    official = norm_w.exp() / (norm_w.exp() + norm_l.exp())
    assert_close(smpo_label(scores_w, scores_l, high - low), official)


def test_smpo_by_hand():
    # alpha = s(1) = 0.7310586, gamma 1: scale 2 alpha - 1 = 0.4621172 on the Diffusion-DPO logits above
    alpha = 1 / (1 + math.exp(-1))
    label = torch.tensor([alpha, 0.25], dtype=torch.float64)
    losses, metrics = smpo_diffusion_loss(ERR_W, ERR_L, REF_W, REF_L, label, beta=10.0)
    expected = [(2 * alpha - 1) * LOGITS[0], (2 * 0.25 - 1) * LOGITS[1]]  # [0.3465879, 0.25]
    assert_close(metrics["reward_margin"], torch.tensor(expected, dtype=torch.float64))
    assert_close(losses, torch.tensor([neg_log_sigmoid(x) for x in expected], dtype=torch.float64))
    assert metrics["implicit_accuracy"].tolist() == [1.0, 1.0]  # alpha < 1/2 flips pair 1's direction
    assert_close(metrics["label"], label)
    # gamma 1.5 with alpha 1: scale 0.5
    losses, _ = smpo_diffusion_loss(ERR_W[:1], ERR_L[:1], REF_W[:1], REF_L[:1], torch.ones(1), beta=10.0, gamma=1.5)
    assert_close(losses, torch.tensor([neg_log_sigmoid(0.5 * 0.75)], dtype=torch.float64))


def test_smpo_limits_label_1_is_diffusion_dpo_and_label_half_has_no_gradient():
    dpo, dpo_metrics = diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, beta=10.0)
    smpo, smpo_metrics = smpo_diffusion_loss(ERR_W, ERR_L, REF_W, REF_L, torch.ones(2, dtype=torch.float64), 10.0)
    assert torch.equal(smpo, dpo)
    assert torch.equal(smpo_metrics["reward_margin"], dpo_metrics["reward_margin"])
    err_w = ERR_W.clone().requires_grad_()
    losses, _ = smpo_diffusion_loss(err_w, ERR_L, REF_W, REF_L, torch.full((2,), 0.5, dtype=torch.float64), 10.0)
    assert_close(losses, torch.full((2,), math.log(2), dtype=torch.float64))
    losses.sum().backward()
    assert torch.equal(err_w.grad, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, beta=0.0), "beta must be > 0"),
        (lambda: diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, beta=-1.0), "beta must be > 0"),
        (lambda: smpo_diffusion_loss(ERR_W, ERR_L, REF_W, REF_L, torch.ones(2), beta=0.0), "beta must be > 0"),
        (lambda: smpo_label(ERR_W, ERR_L, temperature=0.0), "temperature must be > 0"),
        (lambda: smpo_label(ERR_W, ERR_L, temperature=-0.1), "temperature must be > 0"),
        (lambda: smpo_diffusion_loss(ERR_W, ERR_L, REF_W, REF_L, torch.tensor([1.2, 0.5]), 1.0), "label must lie"),
        (lambda: smpo_diffusion_loss(ERR_W, ERR_L, REF_W, REF_L, torch.ones(2), 1.0, gamma=0.0), "gamma must be"),
        (lambda: diffusion_dpo_loss(ERR_W, ERR_L[:1], REF_W, REF_L, beta=1.0), "same shape"),
        (lambda: diffusion_dpo_loss(ERR_W[:, None], ERR_L, REF_W, REF_L, beta=1.0), "1-D"),
        (lambda: flow_matching_inputs(torch.ones(1, 2), torch.ones(1, 2), torch.tensor([1.5])), "t must lie"),
        (lambda: flow_matching_inputs(torch.ones(1, 2), torch.ones(1, 3), torch.tensor([0.5])), "share a shape"),
        (lambda: flow_pair_inputs(torch.ones(1, 2), torch.ones(2, 2), torch.ones(1, 2), torch.ones(1)), "same shape"),
        (lambda: flow_matching_errors(torch.ones(2, 3), torch.ones(2, 4)), "share a shape"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()

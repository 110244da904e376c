"""GRPO-Guard's losses (shared/guard.py): hand-worked values for both averaging orders, the RatioNorm identity
against the sampler's own log-probs, and the gradient against a closed form."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowalign import samplers
from flowalign.config import FlowGRPOConfig
from shared.config import ConfigError, load_config
from shared.guard import GUARD_LOSSES, guard_log_ratio, guard_loss_after_ratio, guard_loss_before_ratio


def worked_rows():
    """Two rows of two latent elements (step std s, dt, advantage A), worked by hand below."""
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # [B, D] x'
    old = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # [B, D] mu_old
    new = torch.tensor([[0.5, -0.5], [0.2, 1.0]], dtype=torch.float64)  # [B, D] mu_theta
    std = torch.tensor([0.5, 1.0], dtype=torch.float64)  # [B]
    dt = torch.tensor([0.25, 0.5], dtype=torch.float64)  # [B]
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)  # [B]
    return x, new, old, std, dt, adv


def test_ratio_norm_by_hand():
    x, new, old, std, _, _ = worked_rows()
    # row 0: s = 0.5, d = (0.5, -0.5), x' - mu_old = (1, 0), x' - mu = (0.5, 0.5)
    #   log r = ((1, 0) - (0.25, 0.25)) / (2 * 0.25) = (1.5, -0.5); bias d^2 / (2 s^2) = (0.5, 0.5)
    #   s * (log r + bias) = 0.5 * (2.0, 0.0) = (1.0, 0.0)  [= (x' - mu_old) * d / s = (1 * 0.5, 0) / 0.5]
    # row 1: s = 1, d = (0.2, 0), x' - mu_old = (0, 1), x' - mu = (-0.2, 1)
    #   log r = ((0, 1) - (0.04, 1)) / 2 = (-0.02, 0); bias = (0.02, 0); s * (log r + bias) = (0, 0)
    expected = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(guard_log_ratio(x, new, old, std), expected, atol=1e-12)


def test_before_ratio_by_hand():
    x, new, old, std, dt, adv = worked_rows()
    # row 0: mean log-ratio (1 + 0) / 2 = 0.5, ratio e^0.5 = 1.648721; A = 1, eps = 0.7: 1.6487 < 1.7, not clipped
    #   l_0 = -1.648721, / dt 0.25 = -6.594885
    # row 1: mean log-ratio 0, ratio 1; A = -1: l_1 = +1, / dt 0.5 = 2.0
    # loss = (-6.594885 + 2.0) / 2 = -2.2974425
    loss, ratio, clipped = guard_loss_before_ratio(x, new, old, std, dt, adv, 0.7)
    assert loss.item() == pytest.approx((-4 * math.exp(0.5) + 2.0) / 2, abs=1e-12)
    assert torch.allclose(ratio, torch.tensor([math.exp(0.5), 1.0], dtype=torch.float64))
    assert clipped.tolist() == [0.0, 0.0]


def test_after_ratio_by_hand():
    x, new, old, std, dt, adv = worked_rows()
    # row 0: element ratios (e^1, e^0) = (2.718282, 1); A = 1, eps = 0.7: e clipped to 1.7
    #   elements -1.7 and -1 -> l_0 = -1.35, / 0.25 = -5.4; half its elements clipped
    # row 1: ratios (1, 1), A = -1 -> l_1 = 1, / 0.5 = 2.0
    # loss = (-5.4 + 2.0) / 2 = -1.7
    loss, ratio, clipped = guard_loss_after_ratio(x, new, old, std, dt, adv, 0.7)
    assert loss.item() == pytest.approx(-1.7, abs=1e-12)
    assert torch.allclose(ratio, torch.tensor([(math.e + 1) / 2, 1.0], dtype=torch.float64))
    assert clipped.tolist() == [0.5, 0.0]


def test_before_ratio_clips_by_hand():
    x, new, old, std, dt, adv = worked_rows()
    # eps = 0.2: row 0's ratio 1.6487 > 1.2 with A = 1 -> l_0 = -1.2, / 0.25 = -4.8; row 1 as before: 2.0
    loss, _, clipped = guard_loss_before_ratio(x, new, old, std, dt, adv, 0.2)
    assert loss.item() == pytest.approx((-4.8 + 2.0) / 2, abs=1e-12)
    assert clipped.tolist() == [1.0, 0.0]


def test_on_policy_both_orders_give_ratio_one():
    """mu_theta = mu_old: every normalised log-ratio is 0, so both orders give -mean(A / dt)."""
    g = torch.Generator().manual_seed(0)
    x, old = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)  # [B, C, h, w]
    std, dt, adv = torch.tensor([0.3, 0.5, 0.7]), torch.tensor([0.1, 0.2, 0.1]), torch.tensor([1.0, -2.0, 0.5])
    for loss_fn in GUARD_LOSSES.values():
        loss, ratio, clipped = loss_fn(x, old.clone(), old, std, dt, adv, 1e-4)
        assert loss.item() == pytest.approx(-(adv / dt).mean().item(), rel=1e-6)
        assert torch.allclose(ratio, torch.ones(3)) and clipped.sum() == 0


def test_ratio_norm_matches_the_official_formula_on_the_samplers_log_probs():
    """before_ratio's log-ratio equals the official s * (logp_new - logp_old + mean(d^2) / (2 s^2)) with the log-probs
    of flowalign's SDE step (Flow-GRPO kind, averaged over C*H*W), and the closed form mean((x' - mu_old) d) / s."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=g)  # [B, C, h, w]
    v_old = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=g)
    v_new = v_old + 0.05 * torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=g)
    sigma, sigma_next = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.8, 0.6, 0.4, 0.2])
    nxt, logp_old, mu_old, std = samplers.sde_step_with_logprob(x, v_old, sigma, sigma_next, generator=g)
    _, logp_new, mu_new, std_new = samplers.sde_step_with_logprob(x, v_new, sigma, sigma_next, prev_sample=nxt)
    assert torch.equal(std, std_new)
    s = std.flatten()  # [B]
    bias = (mu_new - mu_old).pow(2).mean(dim=(1, 2, 3)) / (2 * s**2)  # [B]
    official = s * (logp_new - logp_old + bias)  # [B]
    mine = guard_log_ratio(nxt, mu_new, mu_old, std).mean(dim=1)  # [B]
    closed = ((nxt - mu_old) * (mu_new - mu_old)).mean(dim=(1, 2, 3)) / s  # [B]
    assert torch.allclose(mine, official, atol=1e-10) and torch.allclose(mine, closed, atol=1e-12)
    assert not torch.allclose(logp_new, logp_old)  # the check is not vacuous


@pytest.mark.parametrize("order", ["before_ratio", "after_ratio"])
def test_gradient_against_the_closed_form(order):
    """With z_bi = (x' - mu_old)_bi d_bi / s_b, dz_bi / dmu_bi = (x' - mu_old)_bi / s_b. Unclipped elements give
    d loss / d mu_bi = -A_b exp(z) (x' - mu_old)_bi / (s_b dt_b B) (times 1/D for the element mean), clipped ones 0;
    before_ratio takes z_b = mean_i z_bi inside exp, after_ratio each z_bi."""
    g = torch.Generator().manual_seed(2)
    B, D = 4, 6
    x, old = torch.randn(B, D, dtype=torch.float64, generator=g), torch.randn(B, D, dtype=torch.float64, generator=g)
    new = (old + 0.3 * torch.randn(B, D, dtype=torch.float64, generator=g)).requires_grad_()
    std = torch.tensor([0.4, 0.6, 0.8, 1.0], dtype=torch.float64)
    dt = torch.tensor([0.1, 0.2, 0.1, 0.3], dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    eps = 0.05
    loss, _, clipped = GUARD_LOSSES[order](x, new, old, std, dt, adv, eps)
    (grad,) = torch.autograd.grad(loss, new)
    with torch.no_grad():
        a = x - old  # [B, D]
        z = a * (new - old) / std[:, None]  # [B, D]
        z = z.mean(dim=1, keepdim=True).expand(B, D) if order == "before_ratio" else z  # [B, D]
        r = z.exp()
        active = ((adv[:, None] > 0) & (r > 1 + eps)) | ((adv[:, None] < 0) & (r < 1 - eps))  # [B, D]
        expected = -adv[:, None] * r * a / (std[:, None] * dt[:, None] * B * D)
        expected = torch.where(active, torch.zeros_like(expected), expected)  # [B, D]
    assert 0 < clipped.sum() < B  # some rows (or elements) clipped, some not: both branches checked
    assert torch.allclose(grad, expected, atol=1e-12)


def test_the_two_orders_differ_off_policy():
    x, new, old, std, dt, adv = worked_rows()
    before, _, _ = guard_loss_before_ratio(x, new, old, std, dt, adv, 0.7)
    after, _, _ = guard_loss_after_ratio(x, new, old, std, dt, adv, 0.7)
    assert before.item() == pytest.approx(-2.2974425, abs=1e-6) and after.item() == pytest.approx(-1.7)


# ----------------------------------------------------------------------------- config
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["algorithm.name=tempflow", "algorithm.guard=true"],
            "config field 'algorithm.guard': GRPO-Guard applies to flow_grpo and mixgrpo, not tempflow",
        ),
        (
            ["algorithm.guard=true", "sampling.sde_kind=cps"],
            "config field 'algorithm.guard': GRPO-Guard's RatioNorm and 1/dt reweighting are derived for the "
            "Flow-GRPO SDE step; set sampling.sde_kind=flow_grpo or algorithm.guard=false",
        ),
        (
            ["algorithm.guard_average=after_ratio"],
            "config field 'algorithm.guard_average': after_ratio is read only with algorithm.guard=true",
        ),
        (["algorithm.guard=true", "algorithm.guard_average=middle"], "algorithm.guard_average"),
    ],
)
def test_bad_guard_combinations_are_refused(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(FlowGRPOConfig, ROOT / "configs" / "flow" / "flow_grpo.yaml", overrides)
    assert message in str(info.value)


def test_guard_on_a_preference_recipe_is_an_unknown_field_with_one_line_and_exit_2():
    done = subprocess.run(
        [
            sys.executable,
            "flowalign/preference.py",
            "--config",
            "configs/flow/diffusion_dpo.yaml",
            "algorithm.guard=true",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: unknown config field 'algorithm.guard'"), lines


def test_guard_is_accepted_on_both_flow_algorithms():
    for name in ("flow_grpo", "mixgrpo"):
        config = load_config(
            FlowGRPOConfig,
            ROOT / "configs" / "flow" / "flow_grpo.yaml",
            [f"algorithm.name={name}", "algorithm.guard=true", "algorithm.guard_average=after_ratio"],
        )
        assert config.algorithm.guard and config.algorithm.guard_average == "after_ratio"

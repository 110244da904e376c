"""DiffusionNFT (arXiv:2509.16117): the loss in shared/nft.py against hand-worked numbers and an independent
gradient; the flow recipe's `algorithm.name: diffusion_nft` (smoke, config errors, 1 vs 2 processes, SIGKILL
resume)."""

import json
import math
from pathlib import Path

import pytest
import torch

from flowalign.config import FlowGRPOConfig
from flowalign.train import train
from shared.checkpoint import latest_checkpoint, load_state
from shared.config import ConfigError, load_config
from shared.nft import diffusion_nft_loss, old_policy_decay, optimality_probability, velocity_gap
from tests.multiproc import kill_at_checkpoint
from tests.test_flow_distributed import assert_relatively_close, final_weights, flow_run, records
from tests.test_train_smoke import tiny_config, tiny_overrides, tiny_pipeline_dir  # noqa: F401  (fixture)

# One row, two latent elements (shape [1, 2]): x0 = [1, 0], eps = [0, 2], t = 0.5
#   x_t = 0.5 * [1, 0] + 0.5 * [0, 2] = [0.5, 1];   target velocity eps - x0 = [-1, 2]
CLEAN = torch.tensor([[1.0, 0.0]])
NOISED = torch.tensor([[0.5, 1.0]])
T = torch.tensor([0.5])
PERFECT = torch.tensor([[-1.0, 2.0]])  # v = eps - x0
ZERO = torch.zeros(1, 2)


def test_optimality_maps_clipped_advantages_to_zero_one():
    # r = clip(A, -5, 5) / 10 + 0.5: -5 -> 0, -10 -> 0 (clipped), 0 -> 0.5, 2.5 -> 0.75, 5 -> 1, 10 -> 1
    r = optimality_probability(torch.tensor([-5.0, -10.0, 0.0, 2.5, 5.0, 10.0]), clip=5.0)
    assert torch.allclose(r, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


@pytest.mark.parametrize("r, expected", [(1.0, 0.0), (0.0, 5.0 / 3.0), (0.5, 5.0 / 6.0)])
def test_beta_one_adaptive_by_hand(r, expected):
    # beta = 1, v_old = 0, v = [-1, 2] (the exact velocity):
    #   v+ = v = [-1, 2]: x0+ = [0.5, 1] - 0.5 * [-1, 2] = [1, 0] = x0, error 0 (weight clamped to 1e-5: 0 / 1e-5 = 0)
    #   v- = 2 v_old - v = [1, -2]: x0- = [0.5, 1] - 0.5 * [1, -2] = [0, 2], error [-1, 2]:
    #   mean square (1 + 4) / 2 = 2.5, adaptive weight mean |error| = 1.5, e- = 2.5 / 1.5 = 5/3
    #   loss = r * 0 + (1 - r) * 5/3
    loss, metrics = diffusion_nft_loss(PERFECT, ZERO, NOISED, CLEAN, T, torch.tensor([r]), beta=1.0)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["nft_negative"] == pytest.approx(5.0 / 3.0, rel=1e-6)
    assert metrics["old_deviation"] == pytest.approx(2.5)  # mean((v - 0)^2) = (1 + 4) / 2


def test_beta_half_plain_mean_by_hand():
    # beta = 0.5, v_old = 0, v = [-1, 2], no adaptive weighting, r = 0.75, scale 5:
    #   v+ = 0.5 v = [-0.5, 1]: x0+ = [0.5, 1] - 0.5 * [-0.5, 1] = [0.75, 0.5], error [-0.25, 0.5],
    #        e+ = (0.0625 + 0.25) / 2 = 0.15625
    #   v- = 1.5 * 0 - 0.5 v = [0.5, -1]: x0- = [0.5, 1] - 0.5 * [0.5, -1] = [0.25, 1.5], error [-0.75, 1.5],
    #        e- = (0.5625 + 2.25) / 2 = 1.40625
    #   loss = 5 * (0.75 * 0.15625 + 0.25 * 1.40625) / 0.5 = 5 * 0.46875 / 0.5 = 4.6875
    loss, metrics = diffusion_nft_loss(
        PERFECT, ZERO, NOISED, CLEAN, T, torch.tensor([0.75]), beta=0.5, adaptive=False, scale=5.0
    )
    assert loss.item() == pytest.approx(4.6875, rel=1e-6)
    assert metrics["nft_positive"] == pytest.approx(0.15625) and metrics["nft_negative"] == pytest.approx(1.40625)


def test_two_rows_are_independent_and_the_gap_is_per_row():
    # row 0 as above (beta 1, r 0: 5/3); row 1: v = v_old = 0 at t = 0.5 with x0 = [1, 0], x_t = [0.5, 1]:
    #   v+ = v- = 0, x0+- = x_t, error [-0.5, 1]: mean square 0.625, mean |.| 0.75, e = 0.625 / 0.75 = 5/6 both;
    #   r = 0.25: loss = 0.25 * 5/6 + 0.75 * 5/6 = 5/6
    velocity = torch.cat([PERFECT, ZERO])
    loss, _ = diffusion_nft_loss(
        velocity,
        torch.zeros(2, 2),
        NOISED.repeat(2, 1),
        CLEAN.repeat(2, 1),
        T.repeat(2),
        torch.tensor([0.0, 0.25]),
        1.0,
    )
    assert torch.allclose(loss, torch.tensor([5.0 / 3.0, 5.0 / 6.0]))
    # the KL term: mean over elements of (v - v_ref)^2: row 0 (1 + 4) / 2 = 2.5, row 1 0
    assert torch.allclose(velocity_gap(velocity, torch.zeros(2, 2)), torch.tensor([2.5, 0.0]))


@pytest.mark.parametrize("adaptive", [True, False])
def test_gradient_matches_the_closed_form(adaptive):
    """d loss / d v, worked out by hand: x0+ = x_t - t (beta v + (1 - beta) v_old) has d x0+/dv = -t beta and
    x0- = x_t - t ((1 + beta) v_old - beta v) has d x0-/dv = +t beta, so with D elements per row and the adaptive
    weights w+-, constants,
        dL/dv = scale * (-2 r t (x0+ - x0) / w+ + 2 (1 - r) t (x0- - x0) / w-) / D."""
    generator = torch.Generator().manual_seed(0)
    shape = (3, 2, 2, 2)  # [R, C, h, w]
    velocity = torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_(True)
    old, clean, noise = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    noised = (1 - t.view(-1, 1, 1, 1)) * clean + t.view(-1, 1, 1, 1) * noise
    r = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    beta, scale = 0.3, 5.0
    loss, _ = diffusion_nft_loss(velocity, old, noised, clean, t, r, beta, adaptive=adaptive, scale=scale)
    loss.sum().backward()
    with torch.no_grad():
        tt = t.view(-1, 1, 1, 1)
        plus = noised - tt * (beta * velocity + (1 - beta) * old) - clean  # [R, C, h, w]
        minus = noised - tt * ((1 + beta) * old - beta * velocity) - clean  # [R, C, h, w]
        weight = lambda e: e.abs().mean(dim=(1, 2, 3), keepdim=True) if adaptive else 1.0
        rr, elements = r.view(-1, 1, 1, 1), 8
        expected = scale * (-2 * rr * tt * plus / weight(plus) + 2 * (1 - rr) * tt * minus / weight(minus)) / elements
    assert torch.allclose(velocity.grad, expected, rtol=1e-10, atol=1e-12)


def test_beta_one_positive_policy_is_the_trained_one_and_no_gradient_reaches_the_old():
    # beta = 1: v+ = v, so with r = 1 the loss is the flow-matching x0 error of v alone: v = v_target gives 0
    old = torch.tensor([[3.0, -7.0]], requires_grad=True)
    loss, _ = diffusion_nft_loss(PERFECT, old, NOISED, CLEAN, T, torch.tensor([1.0]), beta=1.0, adaptive=False)
    assert loss.item() == 0.0
    assert not loss.requires_grad  # v_old is detached: the only input needing a gradient was it


def test_old_policy_decay_schedules_by_hand():
    # decay_type 1 (0.001, 0.5, 0): 0 steps -> 0, 1 -> 0.001, 300 -> 0.3, 500 -> 0.5, 900 -> min(0.9, 0.5) = 0.5
    assert [old_policy_decay(s, 0.001, 0.5) for s in (0, 1, 300, 500, 900)] == pytest.approx([0, 0.001, 0.3, 0.5, 0.5])
    # decay_type 2 (0.0075, 0.999, 75): 74 -> 0 (before start), 75 -> 0, 175 -> 0.75, 300 -> min(1.6875, .999)
    assert [old_policy_decay(s, 0.0075, 0.999, 75) for s in (74, 75, 175, 300)] == pytest.approx([0, 0, 0.75, 0.999])


# ------------------------------------------------------------------------------------------ the flow recipe
NFT = ["algorithm.name=diffusion_nft", "algorithm.kl_beta=1e-3", "algorithm.train_fraction=0.5"]  # 2 of 4 levels


def test_bad_nft_fields_are_one_line_config_errors(tmp_path):
    for override, field in (
        ("algorithm.nft_beta=0", "algorithm.nft_beta"),
        ("algorithm.nft_beta=1.5", "algorithm.nft_beta"),
        ("algorithm.nft_old_decay_max=1.0", "algorithm.nft_old_decay_max"),
        ("algorithm.nft_old_decay_rate=-0.1", "algorithm.nft_old_decay_rate"),
        ("algorithm.noise_aware_weighting=true", "algorithm.noise_aware_weighting"),
    ):
        with pytest.raises(ConfigError, match=field) as error:
            load_config(FlowGRPOConfig, None, ["algorithm.name=diffusion_nft", override])
        assert "\n" not in str(error.value)
    # the SDE noise level is not used: 0 is accepted for diffusion_nft, refused for flow_grpo
    load_config(FlowGRPOConfig, None, ["algorithm.name=diffusion_nft", "sampling.noise_level=0"])
    with pytest.raises(ConfigError, match="sampling.noise_level"):
        load_config(FlowGRPOConfig, None, ["sampling.noise_level=0"])


def test_two_iterations_change_the_lora_log_finite_losses_and_soft_update_the_old_policy(tiny_pipeline_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    # decay d = min(0.3 x optimizer steps, 0.9): after iteration 1 (2 steps) d = 0.6, after iteration 2 d = 0.9
    decay = ["algorithm.nft_old_decay_rate=0.3", "algorithm.nft_old_decay_max=0.9"]
    train(tiny_config(tiny_pipeline_dir, out, *NFT, *decay))
    first, second = (out / "checkpoints" / f"step-00000{i}" for i in (1, 2))
    w1, w2 = load_state(first, "trainable"), load_state(second, "trainable")
    assert w1 and all(not torch.equal(w1[name], w2[name]) for name in w1)  # every tensor moved
    assert all(w2[name].abs().sum() > 0 for name in w2 if "lora_B" in name)  # from peft's zero init
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        assert all(math.isfinite(record[k]) for k in ("train/loss", "train/kl", "train/nft_positive"))
        # 2 prompts x 2 samples x 2 noise levels = 8 rows, each one trained forward + one reference forward
        assert record["nfe/update_backward"] == 8 and record["nfe/update_forward"] == 16
    # LoRA B starts at 0 in both copies, so after iteration 1 the old copy's B is (1 - 0.6) x the trained B, and
    # after iteration 2 it is 0.9 x that + 0.1 x the trained B of iteration 2
    names = list(w1)  # the trainable parameters in model order, as the old copy lists them
    old1, old2 = (dict(zip(names, load_state(c, "old_policy"))) for c in (first, second))
    for name in (n for n in names if "lora_B" in n):
        assert old1[name].abs().sum() > 0 and torch.allclose(old1[name], 0.4 * w1[name], atol=1e-7)
        assert torch.allclose(old2[name], 0.9 * old1[name] + 0.1 * w2[name], atol=1e-7)


@pytest.mark.timeout(240)
def test_two_processes_train_like_one(tmp_path):
    """1 process == 2 processes (gloo): per-iteration reward statistics and losses, the final LoRA and the old
    policy, on tests/test_flow_distributed.py's tiny config (3 iterations)."""
    from flowalign import toy

    digits = Path(toy.ensure_digits_pipeline())
    for processes in (1, 2):
        flow_run(processes, digits, tmp_path / f"p{processes}", *NFT)
    one, two = records(tmp_path / "p1"), records(tmp_path / "p2")
    assert [r["world_size"] for r in one[1:]] == [1, 1, 1] and [r["world_size"] for r in two[1:]] == [2, 2, 2]
    for a, b in zip(one, two, strict=True):
        means = lambda r: {k: v for k, v in r.items() if k.startswith(("reward/", "eval/")) and "/std" not in k}
        assert means(a)
        # float32 sums in other shapes and orders (DDP's all-reduce) compound over the optimizer steps: measured
        # 2.8e-5 relative on the final evaluation's mean (2026-12-06), 1e-6 on the first iteration's rewards
        assert_relatively_close(means(a), means(b), rtol=1e-4)
        for key in ("train/loss", "train/kl", "train/nft_positive", "train/nft_negative"):
            assert a.get(key) is None or abs(a[key] - b[key]) <= 1e-5 * max(abs(a[key]), 1.0), key
    flat = lambda w: torch.cat([w[name].flatten() for name in sorted(w)])
    w1, w2 = final_weights(tmp_path / "p1"), final_weights(tmp_path / "p2")
    assert w1.keys() == w2.keys() and (flat(w1) - flat(w2)).norm() <= 1e-5 * flat(w1).norm()
    old = [
        torch.cat([x.flatten() for x in load_state(latest_checkpoint(tmp_path / p / "checkpoints"), "old_policy")])
        for p in ("p1", "p2")
    ]
    assert (old[0] - old[1]).norm() <= 1e-5 * old[0].norm()


@pytest.mark.timeout(240)
def test_sigkill_then_resume_is_bit_identical(tiny_pipeline_dir, tmp_path):  # noqa: F811
    """Killed after checkpoint 1 of 3 and resumed: the LoRA, the old policy and the optimizer state equal those of
    an uninterrupted run, bit for bit."""
    extra = [*NFT, "train.iterations=3", "log.eval_every=0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(tiny_config(tiny_pipeline_dir, straight, *extra))
    kill_at_checkpoint(
        1, ["flowalign/train.py", *tiny_overrides(tiny_pipeline_dir, killed, *extra)], killed / "checkpoints"
    )
    train(tiny_config(tiny_pipeline_dir, killed, *extra), resume=True)
    for name in ("trainable", "old_policy", "optimizer"):
        a, b = (load_state(latest_checkpoint(out / "checkpoints"), name) for out in (straight, killed))
        flat_a, flat_b = _tensors(a), _tensors(b)
        assert len(flat_a) == len(flat_b) > 0 and all(torch.equal(x, y) for x, y in zip(flat_a, flat_b)), name
    assert latest_checkpoint(killed / "checkpoints").name == "step-000003"


def _tensors(state) -> list[torch.Tensor]:
    """Every tensor of a loaded state (nested dicts and lists), in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in _tensors(item)]
    return []

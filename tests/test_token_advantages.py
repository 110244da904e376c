"""Per-token advantages [B, T], the interface between the advantage stage and the update (issue 22 item 2).

A [B, T] advantage equal along T must give exactly the loss and gradient of the [B] advantage it repeats, for each
clipped objective (grpo, dr_grpo, dapo), alone and with the k3 KL term (`llmalign.grpo.micro_batch_loss`); a
non-constant one gives the per-token loss worked out by hand below; the SSR buffer keeps per-token rows and saves
a constant one exactly as a buffer of scalars does.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from llmalign.config import GRPOConfig
from llmalign.grpo import micro_batch_loss
from llmalign.objectives import OBJECTIVES
from llmalign.rollout import REPLAY_CONSTANT, REPLAY_SCALARS, REPLAY_SEQUENCES
from shared.advantages import sequence_to_tokens
from shared.config import load_config
from shared.losses import clipped_policy_loss
from shared.replay import ReplayBuffer

AGGREGATIONS = ("grpo", "dr_grpo", "dapo")


def batch(seed: int = 0, B: int = 5, T: int = 7):
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=generator, dtype=torch.float64) * 3  # [B, T]
    logp = (old + 0.4 * torch.randn(B, T, generator=generator, dtype=torch.float64)).requires_grad_()  # [B, T]
    ref = old + 0.1 * torch.randn(B, T, generator=generator, dtype=torch.float64)  # [B, T]
    mask = (torch.rand(B, T, generator=generator) < 0.8).double()  # [B, T]
    mask[-1] = 0.0  # a dropped sample
    advantages = torch.randn(B, generator=generator, dtype=torch.float64)  # [B]
    return logp, old, ref, mask, advantages


def loss_and_grad(fn, logp):
    logp.grad = None
    loss, _ = fn()
    loss.backward()
    return loss.detach().clone(), logp.grad.clone()


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_constant_token_advantages_give_exactly_the_sequence_loss_and_gradient(aggregation):
    logp, old, _, mask, advantages = batch()
    per_token = sequence_to_tokens(advantages, logp.shape[1])  # [B, T]
    kwargs = dict(eps_low=0.2, eps_high=0.28, aggregation=aggregation, max_length=9)
    loss_b, grad_b = loss_and_grad(lambda: clipped_policy_loss(logp, old, advantages, mask, **kwargs), logp)
    loss_bt, grad_bt = loss_and_grad(lambda: clipped_policy_loss(logp, old, per_token, mask, **kwargs), logp)
    assert torch.equal(loss_b, loss_bt) and torch.equal(grad_b, grad_bt)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_beta", [0.0, 0.04])
def test_constant_token_advantages_give_exactly_the_micro_batch_share(aggregation, kl_beta):
    config = load_config(
        GRPOConfig, None, [f"algorithm.loss={aggregation}", f"algorithm.kl_beta={kl_beta}", "sampling.max_new_tokens=9"]
    )
    logp, old, ref, mask, advantages = batch(1)
    B = logp.shape[0]
    objective = OBJECTIVES[aggregation]
    step = {"denominator": 2.0 * objective.normalisers(Single(), mask, list(range(B)), 1, None)["denominator"]}
    correct, group_ids = torch.zeros(B, dtype=torch.bool), torch.arange(B)
    reference = ref if kl_beta else None

    def share(adv):
        return lambda: micro_batch_loss(config, logp, old, reference, adv, mask, correct, group_ids, step)

    loss_b, grad_b = loss_and_grad(share(advantages), logp)
    loss_bt, grad_bt = loss_and_grad(share(sequence_to_tokens(advantages, logp.shape[1])), logp)
    assert torch.equal(loss_b, loss_bt) and torch.equal(grad_b, grad_bt)


class Single:
    """The one-process `Run.sum`."""

    def sum(self, value):
        return value


@pytest.mark.parametrize(
    "aggregation, loss, grad",
    [
        # logp = old (ratio 1): the element loss is -A on kept tokens, its gradient -A.
        # grpo: row means -(1 + 3)/2 = -2 and -2/1 = -2, mean over the 2 rows -2; gradient -A / (len_i * 2)
        ("grpo", -2.0, [[-0.25, -0.75], [-1.0, 0.0]]),
        # dapo: -(1 + 3 + 2) / 3 kept tokens = -2; gradient -A / 3
        ("dapo", -2.0, [[-1 / 3, -1.0], [-2 / 3, 0.0]]),
        # dr_grpo with L_max 2: -(1 + 3 + 2) / (2 rows * 2) = -1.5; gradient -A / 4
        ("dr_grpo", -1.5, [[-0.25, -0.75], [-0.5, 0.0]]),
    ],
)
def test_per_token_advantages_give_the_hand_computed_loss(aggregation, loss, grad):
    old = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=torch.float64)
    logp = old.clone().requires_grad_()
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 3.0], [2.0, 5.0]], dtype=torch.float64)  # [B, T]; 5 is on padding
    value, gradient = loss_and_grad(
        lambda: clipped_policy_loss(logp, old, advantages, mask, aggregation=aggregation, max_length=2), logp
    )
    assert_close(value, torch.tensor(loss, dtype=torch.float64), rtol=0, atol=1e-15)
    assert_close(gradient, torch.tensor(grad, dtype=torch.float64), rtol=0, atol=1e-15)


def test_a_token_past_the_clip_range_loses_only_its_own_gradient():
    """Per-token clipping: token (0, 1) has ratio e^0.5 > 1 + 0.2 with A = 2 > 0, so its loss is -1.2 * 2 with no
    gradient; token (0, 0) has ratio 1 and A = -1. dapo: (1 - 2.4) / 2 = -0.7, gradient [1/2, 0]."""
    old = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    logp = torch.tensor([[-1.0, -1.5]], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([[-1.0, 2.0]], dtype=torch.float64)
    value, gradient = loss_and_grad(
        lambda: clipped_policy_loss(logp, old, advantages, None, eps_low=0.2, aggregation="dapo"), logp
    )
    assert_close(value, torch.tensor(-0.7, dtype=torch.float64), rtol=0, atol=1e-15)
    assert_close(gradient, torch.tensor([[0.5, 0.0]], dtype=torch.float64), rtol=0, atol=1e-15)


def entry(advantage: float, tokens: list[float]) -> dict:
    return {
        "advantage": torch.tensor(advantage, dtype=torch.float32),
        "truncated": torch.tensor(False),
        "index": torch.tensor(3),
        "prompt": torch.tensor([5, 6]),
        "completion": torch.arange(len(tokens)),
        "token_advantage": torch.tensor(tokens, dtype=torch.float32),
    }


def buffer() -> ReplayBuffer:
    return ReplayBuffer(8, REPLAY_SCALARS, REPLAY_SEQUENCES, "advantage", constant_fields=REPLAY_CONSTANT)


def test_replay_saves_constant_token_advantages_as_its_scalars_and_rebuilds_them():
    full, plain = buffer(), ReplayBuffer(8, REPLAY_SCALARS, {"prompt": torch.int64, "completion": torch.int64})
    full.add([entry(0.5, [0.5, 0.5, 0.5]), entry(-1.0, [-1.0])])
    plain.add([{k: v for k, v in e.items() if k != "token_advantage"} for e in full.entries])
    state = full.state_dict()
    assert state.keys() == plain.state_dict().keys()  # what a buffer of scalars saves, bit for bit
    assert all(torch.equal(state[k], plain.state_dict()[k]) for k in state)
    restored = buffer()
    restored.load_state_dict(state)
    for a, b in zip(full.entries, restored.entries):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_replay_keeps_non_constant_token_advantages_through_a_save():
    full = buffer()
    full.add([entry(0.5, [0.5, 0.5]), entry(0.25, [1.0, -0.5])])
    state = full.state_dict()
    assert "sequence/token_advantage/values" in state
    restored = buffer()
    restored.load_state_dict(state)
    drawn = restored.sample(2, torch.Generator().manual_seed(0))
    assert sorted(d["token_advantage"].tolist() for d in drawn) == [[0.5, 0.5], [1.0, -0.5]]

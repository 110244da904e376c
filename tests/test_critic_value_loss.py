"""The critic's clipped value loss and the advantages' whitening (shared/gae.py), worked by hand."""

import torch
from torch.testing import assert_close

from shared.gae import clipped_value_loss, whitened


def test_clipped_value_loss_by_hand():
    # eps 0.2, returns 1 everywhere, old values 0.5:
    # token 0: V 0.6 (inside the clip): (0.6 - 1)^2 = 0.16 both ways -> 0.08
    # token 1: V 1.0 (moved +0.5, clipped to 0.7): plain 0, clipped (0.7 - 1)^2 = 0.09 -> 0.045, the clipped larger
    # token 2: V 0.0 (moved -0.5, clipped to 0.3): plain 1, clipped 0.49 -> max 1 -> 0.5
    # token 3: masked -> 0
    values = torch.tensor([[0.6, 1.0, 0.0, 7.0]], requires_grad=True)
    old = torch.full((1, 4), 0.5)
    returns = torch.ones(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    losses, metrics = clipped_value_loss(values, old, returns, mask, clip=0.2)
    assert_close(losses, torch.tensor([[0.08, 0.045, 0.5, 0.0]]))
    assert metrics["value_clipfrac"] == 1 / 3
    losses.sum().backward()
    # d/dV: token 0: V - R = -0.4; token 1: the clipped term is flat in V -> 0; token 2: V - R = -1; masked 0
    assert_close(values.grad, torch.tensor([[-0.4, 0.0, -1.0, 0.0]]))


def test_value_loss_without_clip_is_half_the_squared_error():
    values = torch.tensor([[0.0, 2.0]])
    losses, metrics = clipped_value_loss(values, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), None)
    assert_close(losses, torch.tensor([[0.5, 0.5]]))
    assert metrics["value_clipfrac"] == 0.0


def test_whitened_by_hand():
    # kept (1, 3): mean 2, var 1 -> (-1, 1); padding 0
    advantages = torch.tensor([[1.0, 3.0, 9.0]])
    out = whitened(advantages, torch.tensor([[1, 1, 0]]), mean=2.0, var=1.0, eps=0.0)
    assert_close(out, torch.tensor([[-1.0, 1.0, 0.0]]))

import math

import torch
from torch.testing import assert_close

from shared.kl import KL_ESTIMATORS, gaussian_mean_kl


def test_estimators_by_hand():
    logp, ref = torch.tensor([0.0, -1.0]), torch.tensor([-0.5, -1.0])
    assert_close(KL_ESTIMATORS["k1"](logp, ref), torch.tensor([0.5, 0.0]))
    assert_close(KL_ESTIMATORS["k2"](logp, ref), torch.tensor([0.125, 0.0]))
    # k3 with d = ref - logp = -0.5: exp(-0.5) + 0.5 - 1
    assert_close(KL_ESTIMATORS["k3"](logp, ref), torch.tensor([math.exp(-0.5) - 0.5, 0.0]))


def test_k3_is_unbiased_for_the_true_kl():
    p, q = torch.distributions.Normal(0.0, 1.0), torch.distributions.Normal(0.3, 1.0)
    x = p.sample((200000,), )
    estimate = KL_ESTIMATORS["k3"](p.log_prob(x), q.log_prob(x)).mean()
    assert abs(estimate.item() - 0.045) < 0.003  # KL(N(0,1) || N(0.3,1)) = 0.3^2 / 2


def test_gaussian_mean_kl_by_hand():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    # (1/8, 4/8) -> 0.3125; (0, 1/8) -> 0.0625 with std 2
    assert_close(gaussian_mean_kl(mean, ref, 2.0), torch.tensor([0.3125, 0.0625]))
    assert_close(gaussian_mean_kl(mean, ref, torch.tensor([[2.0], [1.0]])), torch.tensor([0.3125, 0.25]))

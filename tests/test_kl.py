"""KL estimators and the Gaussian mean KL: numbers by hand and independent references."""

import pytest
import torch
from torch.testing import assert_close

from shared.kl import KL_ESTIMATORS, gaussian_mean_kl, kl_k1, kl_k2, kl_k3

LOGP = torch.tensor([0.0, -1.0, -2.0])
REF = torch.tensor([-1.0, 0.0, -2.0])
# d = ref - logp = (-1, 1, 0)


def test_k1_by_hand():
    assert_close(kl_k1(LOGP, REF), torch.tensor([1.0, -1.0, 0.0]))  # logp - ref = -d


def test_k2_by_hand():
    assert_close(kl_k2(LOGP, REF), torch.tensor([0.5, 0.5, 0.0]))  # 0.5 * d^2


def test_k3_by_hand():
    # exp(d) - d - 1: d = -1: 0.367879 + 1 - 1 = 0.367879; d = 1: 2.718282 - 1 - 1 = 0.718282; d = 0: 0
    assert_close(kl_k3(LOGP, REF), torch.tensor([0.367879, 0.718282, 0.0]))


def test_k3_small_differences_keep_precision():
    # d = 1e-3 in float32: exp(d) - 1 - d = d^2/2 + d^3/6 = 5.001667e-7; computing exp(d) - 1 - d
    # directly in float32 loses most digits, expm1 does not.
    out = kl_k3(torch.tensor([0.0]), torch.tensor([1e-3]))
    assert_close(out, torch.tensor([5.001667e-7]), rtol=1e-4, atol=0.0)


def test_dict_and_shape_check():
    assert KL_ESTIMATORS == {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
    x = torch.zeros(2, 5)
    for fn in KL_ESTIMATORS.values():
        assert fn(x, x).shape == (2, 5)
        with pytest.raises(ValueError, match="logp_ref has"):
            fn(x, torch.zeros(5))


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    # x ~ N(0, 1), reference N(0.3, 1): KL = 0.3^2 / 2 = 0.045
    torch.manual_seed(0)
    p, q = torch.distributions.Normal(0.0, 1.0), torch.distributions.Normal(0.3, 1.0)
    x = p.sample((200_000,))
    for name in ("k1", "k3"):
        estimate = KL_ESTIMATORS[name](p.log_prob(x), q.log_prob(x)).mean().item()
        assert abs(estimate - 0.045) < 0.003, name


def test_gaussian_mean_kl_by_hand():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])  # [B=2, 2]
    ref = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    # std 2 (2 std^2 = 8): row 0 (1/8 + 4/8) / 2 = 0.3125; row 1 (0 + 1/8) / 2 = 0.0625
    assert_close(gaussian_mean_kl(mean, ref, 2.0), torch.tensor([0.3125, 0.0625]))
    assert_close(gaussian_mean_kl(mean, ref, torch.tensor(2.0)), torch.tensor([0.3125, 0.0625]))
    # std per sample (2, 1): row 1 now (0 + 1/2) / 2 = 0.25
    assert_close(gaussian_mean_kl(mean, ref, torch.tensor([2.0, 1.0])), torch.tensor([0.3125, 0.25]))
    assert_close(gaussian_mean_kl(mean, ref, torch.tensor([[2.0], [1.0]])), torch.tensor([0.3125, 0.25]))
    # full-shape std: row 0 stds (1, 2): (1/2 + 4/8) / 2 = 0.5
    std = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    assert_close(gaussian_mean_kl(mean, ref, std), torch.tensor([0.5, 0.25]))


def test_gaussian_mean_kl_matches_torch_distributions_on_latents():
    torch.manual_seed(0)
    mean, ref = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)  # [B, C, H, W]
    std = torch.tensor([0.5, 1.0, 2.0])  # [B]
    full_std = std.view(3, 1, 1, 1).expand_as(mean)
    reference = (
        torch.distributions.kl_divergence(
            torch.distributions.Normal(mean, full_std), torch.distributions.Normal(ref, full_std)
        )
        .flatten(1)
        .mean(1)
    )
    assert_close(gaussian_mean_kl(mean, ref, std), reference)
    assert_close(gaussian_mean_kl(mean, ref, std.view(3, 1, 1, 1)), reference)


def test_gaussian_mean_kl_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="std must be > 0"):
        gaussian_mean_kl(x, x, 0.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        gaussian_mean_kl(x, x, torch.ones(4))
    with pytest.raises(ValueError, match="mean_ref has"):
        gaussian_mean_kl(x, torch.zeros(3), 1.0)

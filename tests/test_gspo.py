"""GSPO (docs/extending.md's worked example): the sequence-ratio loss on hand-worked numbers, its equality with
the token clip when every sequence has one token, and a two-iteration `llmalign grpo algorithm.loss=gspo` run
on the embedded model that trains every weight."""

import json
import math

import torch

from shared.losses import clipped_policy_loss, sequence_ratio_policy_loss
from tests.golden.cases import GRPO_SHRINK, REPO


def test_hand_worked_loss_and_gradient():
    # row 0: log-ratios 0.1, 0.3 -> s = e^0.2 = 1.22140, A = 1, inside [0.8, 1.25]: l = -1.22140
    # row 1: log-ratio -0.4 (its second token masked) -> s = e^-0.4 = 0.67032, A = -2: clipped to 0.8, l = 1.6
    old = torch.zeros(2, 2, dtype=torch.float64)
    new = torch.tensor([[0.1, 0.3], [-0.4, -math.inf]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages = torch.tensor([[1.0, 1.0], [-2.0, -2.0]], dtype=torch.float64)  # [B, T], constant along T
    loss, metrics = sequence_ratio_policy_loss(new, old, advantages, mask, eps_low=0.2, eps_high=0.25)
    assert math.isclose(loss.item(), (-math.exp(0.2) + 1.6) / 2, rel_tol=1e-12)
    loss.backward()
    # d/dlogp_t of -s * A / 2 rows, with ds/dlogp_t = s / |y| = s / 2; the clipped row has no gradient
    expected = torch.tensor([[-math.exp(0.2) / 4, -math.exp(0.2) / 4], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(new.grad, expected, rtol=1e-12, atol=0)
    assert metrics["clip_frac_low"] == 0.5 and metrics["clip_frac_high"] == 0.0


def test_one_token_per_sequence_equals_the_token_clip():
    generator = torch.Generator().manual_seed(0)
    old = torch.randn(6, 1, dtype=torch.float64, generator=generator)
    new = (old + 0.3 * torch.randn(6, 1, dtype=torch.float64, generator=generator)).requires_grad_()
    advantages = torch.randn(6, dtype=torch.float64, generator=generator)  # [B]
    sequence, _ = sequence_ratio_policy_loss(new, old, advantages, eps_low=0.1, eps_high=0.2)
    (sequence_grad,) = torch.autograd.grad(sequence, new)
    token, _ = clipped_policy_loss(new, old, advantages, eps_low=0.1, eps_high=0.2, aggregation="grpo")
    (token_grad,) = torch.autograd.grad(token, new)
    assert torch.equal(sequence, token) and torch.equal(sequence_grad, token_grad)


def test_grpo_with_gspo_trains_the_embedded_model(tmp_path, monkeypatch):
    from llmalign.cli import main
    from llmalign.toy import resolve_embedded
    from shared.checkpoint import latest_checkpoint, load_state

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    main(
        [
            "train",
            str(REPO / "configs/llm/arith.yaml"),
            *GRPO_SHRINK,
            "algorithm.loss=gspo",
            "algorithm.clip_range=3e-4",
            "algorithm.clip_range_high=4e-4",
            f"log.output_dir={out}",
        ]
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/grad_norm"] > 0 for r in records[1:])
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(resolve_embedded("embedded:arith")).state_dict()
    trained = load_state(latest_checkpoint(out / "checkpoints"), "trainable")
    changed = [name for name, value in trained.items() if name in before and not torch.equal(value, before[name])]
    assert len(changed) == len([name for name in trained if name in before]) > 0

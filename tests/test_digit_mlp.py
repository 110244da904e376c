"""The held-out digit judge (flowalign/digit_mlp.py, flowalign.rewards:digit_mlp_reward): a real classifier of the
toy's digit images, not a copy of the trained reward's CNN, shipped with its digest and rebuilt to the same bytes."""

from __future__ import annotations

import torch

from flowalign import digit_mlp, toy
from flowalign.rewards import digit_classifier_reward, digit_mlp_reward
from shared.embedded import directory_digest


def heldout_images():
    images, labels = toy.load_digit_images()  # [N, 1, 16, 16], [N]
    _, heldout = toy.digit_split(len(labels))
    return images[heldout], labels[heldout]  # 359 images no classifier trained on


def test_the_shipped_mlp_is_accurate_on_held_out_digits():
    """Measured 2026-12-06: 0.9721 held-out accuracy (the toy's CNN: 0.9916); the bar leaves room for a rebuild."""
    model = digit_mlp.load_digit_mlp()
    assert directory_digest(digit_mlp.SHIPPED_DIR) == digit_mlp.SHIPPED_DIGEST
    assert digit_mlp.heldout_accuracy(model) > 0.95


def test_it_is_not_the_trained_reward():
    """Another architecture with its own weights: on the held-out digits both are right most of the time, yet the
    probabilities they give differ, and on off-manifold images (noise) they disagree about the digit."""
    images, labels = heldout_images()
    prompts = [f"the digit {toy.DIGIT_WORDS[d]}" for d in labels.tolist()]
    rgb = images.expand(-1, 3, -1, -1)  # [N, 3, 16, 16] as decoded samples
    cnn = digit_classifier_reward(str(toy.SHIPPED_DIR))(rgb, prompts)  # [N]
    mlp = digit_mlp_reward()(rgb, prompts)  # [N]
    assert cnn.mean() > 0.9 and mlp.mean() > 0.9
    assert (cnn - mlp).abs().mean() > 0.01  # measured 0.045 (mean probability 0.970 CNN, 0.952 MLP)
    noise = torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(0))  # [200, 1, 16, 16]
    with torch.no_grad():
        a = toy.load_digit_classifier(toy.SHIPPED_DIR / "digit_classifier")(noise).argmax(-1)
        b = digit_mlp.load_digit_mlp()(noise).argmax(-1)
    assert (a != b).float().mean() > 0.3  # measured 1.0: they never agree on noise


def test_a_rebuild_gives_the_shipped_bytes(tmp_path):
    """The build is deterministic on one thread: the shipped digest again (about 10 s)."""
    accuracy = digit_mlp.build_digit_mlp(tmp_path / "mlp")
    assert directory_digest(tmp_path / "mlp") == digit_mlp.SHIPPED_DIGEST
    assert accuracy == digit_mlp.heldout_accuracy(digit_mlp.load_digit_mlp(tmp_path / "mlp"))


def test_the_reward_by_hand(tmp_path):
    """digit_mlp_reward is softmax(model(gray(image)))[digit named]: a model whose last layer only has biases."""
    model = digit_mlp.DigitMLP()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.layers[-1].bias.copy_(torch.log(torch.tensor([1.0, 3.0] + [0.5] * 8)))  # softmax: 1/8, 3/8, 1/16 ...
    from safetensors.torch import save_file
    import json

    (tmp_path / "m").mkdir()
    save_file(model.state_dict(), str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "config.json").write_text(json.dumps({"image_size": 16, "hidden": 128}))
    from shared.embedded import record_digest

    record_digest(tmp_path / "m")
    images = torch.rand(3, 3, 16, 16)
    got = digit_mlp_reward(str(tmp_path / "m"))(images, ["the digit zero", "handwritten 1", "the digit five"])
    # exp(biases) = (1, 3, 0.5 x 8), total 8: zero -> 1/8, one -> 3/8, five -> 0.5/8
    assert torch.allclose(got, torch.tensor([0.125, 0.375, 0.0625]))

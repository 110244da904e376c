"""Image rewards: plain callables made by factories (as in DDPO).

Every reward is `fn(images, prompts, metadata) -> Tensor[B]` (float32, on the images' device):
images [B, 3, H, W] in [0, 1] (decoded samples), one prompt and one metadata dict per image.
Models load on the first call, not when the factory runs, and run under torch.no_grad.

    reward_fn = make_reward("digit_classifier")
    rewards = reward_fn(adapter.decode(latents), prompts, [{}] * len(prompts))   # [B]
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import torch

from shared.reward_calls import ImageRewardFn


def _check_batch(images: torch.Tensor, prompts: list[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images; pass one prompt per image")


def digit_classifier_reward(path: str | None = None) -> ImageRewardFn:
    """Probability the toy's digit classifier gives to the digit the prompt names
    ("the digit seven" or "handwritten 7"): softmax(classifier(gray(image)))[digit], in [0, 1].

    path: the classifier directory (model.safetensors + config.json) or a toy pipeline directory
    holding digit_classifier/; default: the cached toy (built if missing)."""
    from flowalign import toy

    state: dict = {}

    def classifier(device: torch.device) -> toy.DigitClassifier:
        if "model" not in state:
            root = Path(path) if path is not None else Path(toy.ensure_digits_pipeline())
            directory = root / "digit_classifier" if (root / "digit_classifier").is_dir() else root
            state["model"] = toy.load_digit_classifier(directory)
        state["model"] = state["model"].to(device)
        return state["model"]

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        return _named_digit_probability(classifier(images.device), images, prompts)  # [B]

    return reward


def _named_digit_probability(model: torch.nn.Module, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """softmax(model(images))[the digit each prompt names]: [B] in [0, 1]."""
    from flowalign import toy

    _check_batch(images, prompts)
    target = torch.tensor([toy.digit_in_prompt(p) for p in prompts], device=images.device)  # [B]
    probs = model(images).float().softmax(dim=-1)  # [B, 10]
    return probs.gather(1, target[:, None]).squeeze(1)  # [B]


def digit_mlp_reward(path: str | None = None) -> ImageRewardFn:
    """A held-out judge of the toy's digits: the probability a second, differently built classifier (a two-layer MLP,
    seed 1, no augmentation: flowalign/digit_mlp.py) gives to the digit the prompt names, in [0, 1]. Meant for
    `eval.rewards` next to a run trained on digit_classifier_reward, to see over-optimisation of the trained one.

    path: a directory with its model.safetensors + config.json; default: the shipped copy (built if missing)."""
    from flowalign import digit_mlp

    state: dict = {}

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        if "model" not in state:  # loaded on the first call, not when the factory runs
            state["model"] = digit_mlp.load_digit_mlp(path)
        state["model"] = state["model"].to(images.device)
        return _named_digit_probability(state["model"], images, prompts)  # [B]

    return reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB (1000 bytes) of each image saved as JPEG at `quality`: [B] float32.
    Pixels are quantised as round(255 * x), as an 8-bit image file would hold them."""
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # [B, 3, H, W]
    sizes = []
    for array in pixels.permute(0, 2, 3, 1).cpu().numpy():  # [H, W, 3] each
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_compressibility(quality: int = 95) -> ImageRewardFn:
    """DDPO's compressibility: r = -(JPEG size in kB); smaller files score higher."""

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        _check_batch(images, prompts)
        return -jpeg_size_kb(images, quality)  # [B]

    return reward


def jpeg_incompressibility(quality: int = 95) -> ImageRewardFn:
    """DDPO's incompressibility: r = +(JPEG size in kB); detailed, noisy images score higher."""

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        _check_batch(images, prompts)
        return jpeg_size_kb(images, quality)  # [B]

    return reward


REWARDS: dict[str, Callable[..., ImageRewardFn]] = {
    "digit_classifier": digit_classifier_reward,
    "digit_mlp": digit_mlp_reward,
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
}


def make_reward(name: str, **kwargs) -> ImageRewardFn:
    """The reward `name` from REWARDS, built with `kwargs` (e.g. quality=80)."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
    return REWARDS[name](**kwargs)

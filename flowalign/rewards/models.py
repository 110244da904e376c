"""Rewards backed by learned models: CLIP score, HPS-v2-style score, LAION-style aesthetic predictor, PickScore.

Factories return `fn(images [B, 3, H, W] in [0, 1], prompts, metadata) -> Tensor[B]`. Models load on the
first call (not when the factory runs), run under torch.no_grad in batches of `batch_size`, and are loaded
with weights-only readers (open_clip `weights_only=True`, safetensors, transformers `from_pretrained`).
Name them in a config like any reward, e.g. `flowalign.rewards.models:clip_score` with
`reward.kwargs: {flowalign.rewards.models:clip_score: {model_name: ViT-B-32, pretrained: openai}}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.reward_calls import ImageRewardFn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images: torch.Tensor, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> CLIP input: bicubic resize of the short side to `size`, centre crop, normalise."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    resized = F.interpolate(
        images.float(),
        size=(max(size, round(height * scale)), max(size, round(width * scale))),
        mode="bicubic",
        align_corners=False,
        antialias=scale < 1,
    )  # [B, 3, h, w]
    top, left = (resized.shape[-2] - size) // 2, (resized.shape[-1] - size) // 2
    cropped = resized[..., top : top + size, left : left + size].clamp(0, 1)  # [B, 3, size, size]
    return (cropped - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _batched(fn, images: torch.Tensor, prompts: list[str], batch_size: int) -> torch.Tensor:
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images; pass one prompt per image")
    return torch.cat(
        [fn(images[i : i + batch_size], prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    )


class _OpenClip:
    """Lazily created open_clip model + tokenizer (a model name with a pretrained tag or a checkpoint path)."""

    def __init__(self, model_name: str, pretrained: str | None, device: str | None):
        self.model_name, self.pretrained, self.device = model_name, pretrained, device
        self.model = self.tokenizer = None

    def load(self, device: torch.device):
        if self.model is None:
            import open_clip

            self.model, _, _ = open_clip.create_model_and_transforms(
                self.model_name, pretrained=self.pretrained, device=self.device or device
            )
            self.model.eval().requires_grad_(False)
            self.tokenizer = open_clip.get_tokenizer(self.model_name)
        return self.model

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        model = self.load(images.device)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = getattr(model.visual, "image_mean", None) or OPENAI_MEAN
        std = getattr(model.visual, "image_std", None) or OPENAI_STD
        pixels = clip_pixels(images.cpu(), size, mean, std).to(next(model.parameters()).device)
        return F.normalize(model.encode_image(pixels).float(), dim=-1)  # [B, D]

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        model = self.model
        tokens = self.tokenizer(prompts).to(next(model.parameters()).device)
        return F.normalize(model.encode_text(tokens).float(), dim=-1)  # [B, D]


def clip_score(
    model_name: str = "ViT-B-32", pretrained: str | None = "openai", batch_size: int = 32, device: str | None = None
) -> ImageRewardFn:
    """Cosine similarity between the CLIP embeddings of each image and its prompt, in [-1, 1].
    pretrained: an open_clip tag (e.g. "openai", "laion2b_s34b_b79k") or a local checkpoint file."""
    clip = _OpenClip(model_name, pretrained, device)

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        def score(chunk, texts):
            return (clip.image_features(chunk) * clip.text_features(texts)).sum(-1)  # [b]

        return _batched(score, images, prompts, batch_size).to(images.device)

    return reward


def hps_v2_score(
    checkpoint: str, model_name: str = "ViT-H-14", batch_size: int = 16, device: str | None = None
) -> ImageRewardFn:
    """HPS-v2-style human preference score: an open_clip model (ViT-H-14 for HPS v2 / v2.1) with the
    fine-tuned checkpoint file, scored as the image-prompt cosine similarity."""
    return clip_score(model_name=model_name, pretrained=checkpoint, batch_size=batch_size, device=device)


def load_aesthetic_mlp(path: str) -> torch.nn.Sequential:
    """An MLP from safetensors with keys `layers.{i}.weight/bias` for its Linear layers (ReLU between them,
    none after the last), sizes read from the weights."""
    from safetensors.torch import load_file

    state = load_file(path)
    indices = sorted({int(key.split(".")[1]) for key in state if key.startswith("layers.")})
    if not indices:
        raise ValueError(f"{path}: no 'layers.N.weight' tensors; save the MLP's Linear layers under layers.N")
    modules = []
    for position, index in enumerate(indices):
        weight = state[f"layers.{index}.weight"]
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": state[f"layers.{index}.bias"]})
        modules += [linear] + ([torch.nn.ReLU()] if position < len(indices) - 1 else [])
    return torch.nn.Sequential(*modules).eval().requires_grad_(False)


def aesthetic_score(
    mlp_path: str,
    model_name: str = "ViT-L-14",
    pretrained: str | None = "openai",
    batch_size: int = 32,
    device: str | None = None,
) -> ImageRewardFn:
    """LAION-style aesthetic predictor: MLP(normalised CLIP image embedding); the prompt is not used."""
    clip = _OpenClip(model_name, pretrained, device)
    state: dict = {}

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        if "mlp" not in state:
            state["mlp"] = load_aesthetic_mlp(mlp_path)

        def score(chunk, texts):
            return state["mlp"](clip.image_features(chunk).cpu()).squeeze(-1)  # [b]

        return _batched(score, images, prompts, batch_size).to(images.device)

    return reward


def _projected(output) -> torch.Tensor:
    """transformers 4 returns the projected embedding; 5 returns an output whose pooler_output is it."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def pickscore(
    model: str, processor: str | None = None, batch_size: int = 32, device: str | None = None
) -> ImageRewardFn:
    """PickScore: logit_scale * cosine(image, prompt) of a transformers CLIPModel (hub id or local directory;
    the processor defaults to the same place)."""
    state: dict = {}

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        if "model" not in state:
            from transformers import AutoProcessor, CLIPModel

            state["model"] = CLIPModel.from_pretrained(model).eval().requires_grad_(False).to(device or images.device)
            state["processor"] = AutoProcessor.from_pretrained(processor or model)
        clip_model, proc = state["model"], state["processor"]

        def score(chunk, texts):
            image_proc = proc.image_processor
            size = (
                image_proc.crop_size["height"]
                if getattr(image_proc, "crop_size", None)
                else clip_model.config.vision_config.image_size
            )
            pixels = clip_pixels(chunk.cpu(), size, image_proc.image_mean, image_proc.image_std)
            text = proc.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
            device_ = clip_model.device
            image_embeds = F.normalize(
                _projected(clip_model.get_image_features(pixel_values=pixels.to(device_))), dim=-1
            )
            text_embeds = F.normalize(
                _projected(clip_model.get_text_features(**{k: v.to(device_) for k, v in text.items()})), dim=-1
            )
            return (clip_model.logit_scale.exp() * (image_embeds * text_embeds).sum(-1)).float().cpu()  # [b]

        return _batched(score, images, prompts, batch_size).to(images.device)

    return reward

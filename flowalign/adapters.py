"""Pipeline adapters: the only view of a diffusers pipeline that samplers and trainers use.

An adapter turns a pipeline into the few operations flow-matching RL needs:

    embeds = adapter.encode_prompts(prompts)            # text -> PromptEmbeds (no grad)
    x = adapter.initial_noise(B, generator)             # [B, C, h, w] at sigma = 1
    sigmas = adapter.sigmas(T)                          # [T + 1], from 1 down to 0
    for i in range(T):                                  # Euler ODE: x' = x + v * (s_{i+1} - s_i)
        v = adapter.velocity(x, sigmas[i], embeds, guidance_scale)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    images = adapter.decode(x)                          # [B, 3, H, W] in [0, 1]

Conventions (DESIGN.md): x_sigma = (1 - sigma) * x0 + sigma * noise and the model predicts
v = noise - x0. With that loop `SD3Adapter` reproduces `StableDiffusion3Pipeline.__call__`
(tests/test_adapters.py checks it). Model-specific code (SD3 now, FLUX later) stays inside the
adapter class; the trainer sees only `FlowPipelineAdapter`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

SD3_DEFAULT_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s default T5 length
SETTINGS_FILE = "flowalign.json"  # optional sidecar in a pipeline directory (the toy writes one)

try:  # newer diffusers take `dtype=` and deprecate `torch_dtype=`; older ones know only the latter
    from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

    _DTYPE_KWARG = "dtype"
except ImportError:
    _DTYPE_KWARG = "torch_dtype"


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch, with the empty-prompt ("") conditioning CFG needs."""

    prompt_embeds: torch.Tensor  # [B, L, D] token embeddings
    pooled_prompt_embeds: torch.Tensor  # [B, P]
    negative_prompt_embeds: torch.Tensor  # [B, L, D] of the empty prompt
    negative_pooled_prompt_embeds: torch.Tensor  # [B, P]

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> PromptEmbeds:
        return PromptEmbeds(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def __getitem__(self, index) -> PromptEmbeds:
        """Rows `index` (int, slice, list or index tensor) of every field; an int keeps the batch dim."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda t: t[index])

    def repeat_interleave(self, repeats: int) -> PromptEmbeds:
        """Each row `repeats` times in a row: prompts [p0, p1] -> [p0, p0, .., p1, p1, ..] (groups)."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def to(self, *args, **kwargs) -> PromptEmbeds:
        return self._map(lambda t: t.to(*args, **kwargs))


@runtime_checkable
class FlowPipelineAdapter(Protocol):
    """What samplers and trainers may use of a flow-matching text-to-image pipeline."""

    transformer: nn.Module  # the velocity model; train it or wrap it with LoRA
    pipeline: Any  # the diffusers pipeline (for saving, or calling it directly)
    scheduler: Any  # the pipeline's scheduler (sigma schedule, shift)

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds: ...

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]: ...

    def initial_noise(
        self, batch: int, generator: torch.Generator | None = None, height: int | None = None, width: int | None = None
    ) -> torch.Tensor: ...

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor: ...

    def velocity(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, embeds: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def _read_settings(path_or_hub_id: str) -> tuple[dict, dict]:
    """(model_index.json, flowalign.json) of a local pipeline directory; empty dicts otherwise."""
    local = Path(path_or_hub_id).expanduser()
    if not local.is_dir():
        return {}, {}
    index = json.loads((local / "model_index.json").read_text()) if (local / "model_index.json").is_file() else {}
    settings = json.loads((local / SETTINGS_FILE).read_text()) if (local / SETTINGS_FILE).is_file() else {}
    return index, settings


class SD3Adapter:
    """`FlowPipelineAdapter` for `StableDiffusion3Pipeline` (SD3, SD3.5): CLIP x2 (+ T5) text
    conditioning, CFG as one batched forward of [uncond, cond], timestep = sigma * 1000."""

    def __init__(self, pipeline, max_sequence_length: int = SD3_DEFAULT_MAX_SEQUENCE_LENGTH):
        self.pipeline = pipeline
        self.transformer = pipeline.transformer  # replace with a wrapped (e.g. LoRA) module if needed
        self.scheduler = pipeline.scheduler
        self.max_sequence_length = max_sequence_length  # T5 tokens (zeros when T5 is absent)
        # Only the transformer is trained: text encoders and VAE are frozen, in eval mode.
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
            module = getattr(pipeline, name, None)
            if module is not None:
                module.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_sequence_length: int | None = None,
        **pipeline_kwargs,
    ) -> SD3Adapter:
        """Load with `StableDiffusion3Pipeline.from_pretrained` (local directory or hub id).

        For a local directory, components saved as null (e.g. no T5) are passed as None, and
        `max_sequence_length` defaults to the value in its flowalign.json if there is one (the
        digits toy: 0), else to the pipeline's 256. `pipeline_kwargs` go to from_pretrained
        (e.g. text_encoder_3=None to drop T5 from a hub model)."""
        from diffusers import StableDiffusion3Pipeline

        index, settings = _read_settings(str(path_or_hub_id))
        for name, value in index.items():
            if isinstance(value, list) and value == [None, None]:
                pipeline_kwargs.setdefault(name, None)
        if max_sequence_length is None:
            max_sequence_length = settings.get("max_sequence_length", SD3_DEFAULT_MAX_SEQUENCE_LENGTH)
        pipeline_kwargs[_DTYPE_KWARG] = dtype
        pipeline = StableDiffusion3Pipeline.from_pretrained(str(path_or_hub_id), **pipeline_kwargs)
        pipeline = pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, max_sequence_length=max_sequence_length)

    @property
    def device(self) -> torch.device:
        return self.pipeline.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.transformer.dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """The pipeline's own `encode_prompt` for `prompts` and for "" (CFG's unconditional)."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of str, got {prompts!r}; wrap one prompt in a list")
        embeds, negative, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=True,
            negative_prompt="",
            max_sequence_length=self.max_sequence_length,
        )  # [B, L, D], [B, L, D], [B, P], [B, P]
        return PromptEmbeds(embeds, pooled, negative, negative_pooled)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents for a height x width image (default: the pipeline's default
        size, transformer sample_size * VAE factor)."""
        factor = self.pipeline.vae_scale_factor
        multiple = factor * self.pipeline.patch_size
        height = height or self.pipeline.default_sample_size * factor
        width = width or self.pipeline.default_sample_size * factor
        if height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple} (VAE factor {factor} x patch size "
                f"{self.pipeline.patch_size}); got height={height}, width={width}"
            )
        return (self.pipeline.transformer.config.in_channels, height // factor, width // factor)

    def initial_noise(
        self, batch: int, generator: torch.Generator | None = None, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Standard normal latents [B, C, h, w], drawn as the pipeline draws them (same generator
        -> same noise as `pipeline(..., generator=generator)`)."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch, *self.latent_shape(height, width))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)  # [B, C, h, w]

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The scheduler's noise levels for `num_steps` steps, shift applied, ending with 0: [T + 1].
        (Sets the scheduler's timesteps, as the pipeline does before sampling.)"""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", False):
            # Resolution-dependent shift, computed from the image token count as the pipeline does.
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            _, h, w = self.latent_shape(height, width)
            patch = self.pipeline.patch_size
            config = self.scheduler.config
            kwargs["mu"] = calculate_shift(
                (h // patch) * (w // patch),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        self.scheduler.set_timesteps(num_steps, device=self.device, **kwargs)
        return self.scheduler.sigmas.clone()  # [T + 1]

    def velocity(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, embeds: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Predicted v = noise - x0 at noise level sigma: [B, C, h, w], in the transformer's dtype.

        The transformer is called at timestep = sigma * num_train_timesteps (1000), as the SD3
        pipeline does. If guidance_scale > 1: v = v_u + g * (v_c - v_u), with v_u (empty prompt)
        and v_c from one batched forward of [uncond, cond]. Differentiable outside no_grad."""
        batch = latents.shape[0]
        if len(embeds) != batch:
            raise ValueError(
                f"embeds has {len(embeds)} rows but latents has batch {batch}; "
                "encode one prompt per latent (e.g. embeds.repeat_interleave(group_size))"
            )
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        if sigma.shape != (batch,):
            raise ValueError(f"sigma must be a float or a [B] = [{batch}] tensor, got shape {tuple(sigma.shape)}")
        timestep = sigma * self.scheduler.config.num_train_timesteps  # [B]
        x = latents.to(self.dtype)
        if guidance_scale > 1:
            v = self.transformer(
                hidden_states=torch.cat([x, x]),  # [2B, C, h, w]
                timestep=torch.cat([timestep, timestep]),
                encoder_hidden_states=torch.cat([embeds.negative_prompt_embeds, embeds.prompt_embeds]),
                pooled_projections=torch.cat([embeds.negative_pooled_prompt_embeds, embeds.pooled_prompt_embeds]),
                return_dict=False,
            )[0]
            v_uncond, v_cond = v.chunk(2)  # [B, C, h, w] each
            return v_uncond + guidance_scale * (v_cond - v_uncond)
        return self.transformer(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=embeds.prompt_embeds,
            pooled_projections=embeds.pooled_prompt_embeds,
            return_dict=False,
        )[0]  # [B, C, h, w]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] (float32): VAE decode of latents / scaling + shift, then
        x / 2 + 1/2 clamped, as the pipeline's output_type="pt". Differentiable outside no_grad
        (wrap in torch.no_grad() when only rewards are needed)."""
        vae = self.pipeline.vae
        z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)  # undo the SD3 latent scaling
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0]  # [B, 3, H, W] in ~[-1, 1]
        return (images * 0.5 + 0.5).clamp(0, 1).float()

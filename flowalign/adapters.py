"""Pipeline adapters: the only view of a diffusers pipeline that samplers and trainers use.

An adapter turns a pipeline into the few operations flow-matching RL needs:

    embeds = adapter.encode_prompts(prompts)            # text -> PromptEmbeds (no grad)
    x = adapter.initial_noise(B, generator)             # [B, C, h, w] at sigma = 1
    sigmas = adapter.sigmas(T)                          # [T + 1], from 1 down to 0
    for i in range(T):                                  # Euler ODE: x' = x + v * (s_{i+1} - s_i)
        v = adapter.velocity(x, sigmas[i], embeds, guidance_scale)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    images = adapter.decode(x)                          # [B, 3, H, W] in [0, 1]

Conventions (those of diffusers' flow-matching schedulers): x_sigma = (1 - sigma) * x0 + sigma * noise and
the model predicts v = noise - x0. With that loop each adapter reproduces its pipeline's `__call__`:
`SD3Adapter` (tests/test_adapters.py), `FluxAdapter` (tests/test_flux_adapter.py), `QwenImageAdapter`
(tests/test_qwen_image_adapter.py) and `WanAdapter` (tests/test_wan_adapter.py), whose latents carry a frame axis
([B, C, F, h, w]) and whose decode gives videos [B, F, 3, H, W]. Model-specific code stays inside the adapter
class; the trainer sees only `FlowPipelineAdapter`. docs/extending.md "Add a model" says how to add a family.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from shared.config import ConfigError, local_path_problem

SD3_DEFAULT_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s default T5 length
SETTINGS_FILE = "flowalign.json"  # optional sidecar in a pipeline directory (the toy writes one)
PIPELINE_FAMILIES = {  # model_index.json class-name prefix -> model.pipeline
    "StableDiffusion3": "sd3",
    "Flux": "flux",
    "QwenImage": "qwenimage",
    "Wan": "wan",
}

try:  # newer diffusers take `dtype=` and deprecate `torch_dtype=`; older ones know only the latter
    from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

    _DTYPE_KWARG = "dtype"
except ImportError:
    _DTYPE_KWARG = "torch_dtype"


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch, with the empty-prompt ("") conditioning CFG needs. Pooled fields are None for
    the families without a pooled embedding (Qwen-Image, Wan); masks are None for the families whose token
    embeddings have a fixed length (SD3, FLUX, Wan) and [B, L] (1 = a real token, 0 = padding) for Qwen-Image,
    whose embeddings are as long as the batch's longest prompt."""

    prompt_embeds: torch.Tensor  # [B, L, D] token embeddings
    pooled_prompt_embeds: torch.Tensor | None  # [B, P]
    negative_prompt_embeds: torch.Tensor  # [B, L, D] of the empty prompt
    negative_pooled_prompt_embeds: torch.Tensor | None  # [B, P]
    prompt_mask: torch.Tensor | None = None  # [B, L]
    negative_prompt_mask: torch.Tensor | None = None  # [B, L]

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> PromptEmbeds:
        return PromptEmbeds(
            **{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name)) for f in _FIELDS}
        )

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

    def padded(self, length: int) -> PromptEmbeds:
        """Token fields zero-padded to `length` tokens, the masks with 0 (masked embeddings only: padding an
        unmasked field would change what the transformer attends to)."""
        if self.prompt_mask is None:
            raise ValueError("only masked embeddings (Qwen-Image) can be padded")
        pad = lambda t, name: torch.nn.functional.pad(
            t, (0, 0, 0, length - t.shape[1]) if name in _TOKEN_FIELDS else (0, length - t.shape[1])
        )
        return dataclasses.replace(
            self, **{name: pad(getattr(self, name), name) for name in _TOKEN_FIELDS + _MASK_FIELDS}
        )

    @classmethod
    def cat(cls, parts: list[PromptEmbeds]) -> PromptEmbeds:
        """Rows of `parts` in order; masked parts of different lengths are padded to the longest first."""
        if parts[0].prompt_mask is not None:
            length = max(part.prompt_embeds.shape[1] for part in parts)
            parts = [part.padded(length) for part in parts]
        return cls(
            **{
                f.name: None if getattr(parts[0], f.name) is None else torch.cat([getattr(p, f.name) for p in parts])
                for f in _FIELDS
            }
        )


_FIELDS = dataclasses.fields(PromptEmbeds)
_TOKEN_FIELDS = ("prompt_embeds", "negative_prompt_embeds")  # [B, L, D]
_MASK_FIELDS = ("prompt_mask", "negative_prompt_mask")  # [B, L]


@runtime_checkable
class FlowPipelineAdapter(Protocol):
    """What samplers and trainers may use of a flow-matching text-to-image (or text-to-video) pipeline. Shapes for
    images; a video adapter adds a frame axis: latents [B, C, F, h, w], decode -> [B, F, 3, H, W]."""

    transformer: nn.Module  # the velocity model; train it or wrap it with LoRA
    pipeline: Any  # the diffusers pipeline (for saving, or calling it directly)
    scheduler: Any  # the pipeline's scheduler (sigma schedule, shift)

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds: ...

    def prompts_over_context(self, prompts: list[str]) -> list[str]: ...

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]: ...

    def initial_noise(
        self, batch: int, generator: torch.Generator | None = None, height: int | None = None, width: int | None = None
    ) -> torch.Tensor: ...

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor: ...

    def velocity(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, embeds: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class CachedPromptEncoder:
    """`encode_prompts` from a cache computed once per distinct prompt, after which the text encoders leave the
    device (moved to the CPU): SD3.5 and FLUX carry a 4.7B T5 that would otherwise sit next to the transformer
    for the whole run. The cache lives on the CPU and rows move to the device when asked for; it holds every
    prompt of the run, so it suits prompt sets whose embeddings fit in host memory."""

    def __init__(self, adapter, prompts: list[str], batch_size: int = 32):
        distinct = list(dict.fromkeys(prompts))
        parts = [
            adapter.encode_prompts(distinct[i : i + batch_size]).to("cpu") for i in range(0, len(distinct), batch_size)
        ]
        self.embeds = PromptEmbeds.cat(parts)  # one row per distinct prompt, on the CPU
        self.row = {prompt: i for i, prompt in enumerate(distinct)}
        self.device = adapter.device
        for name in TEXT_ENCODERS:
            module = getattr(adapter.pipeline, name, None)
            if module is not None:
                module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __call__(self, prompts: list[str]) -> PromptEmbeds:
        unknown = [p for p in prompts if p not in self.row]
        if unknown:
            raise KeyError(
                f"prompt {unknown[0]!r} was not encoded before the text encoders were offloaded; "
                "pass every training and evaluation prompt to CachedPromptEncoder"
            )
        return self.embeds[[self.row[p] for p in prompts]].to(self.device)


def _check_prompts(prompts) -> None:
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of str, got {prompts!r}; wrap one prompt in a list")


def _sigma_per_sample(sigma: float | torch.Tensor, embeds: PromptEmbeds, latents: torch.Tensor) -> torch.Tensor:
    """sigma as a float32 [B] tensor for latents [B, ...], after checking that embeds has B rows."""
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
    return sigma  # [B]


def _freeze_all_but_transformer(pipeline) -> None:
    """Only the transformer is trained: text encoders and VAE are frozen, in eval mode."""
    for name in (*TEXT_ENCODERS, "vae"):
        module = getattr(pipeline, name, None)
        if module is not None:
            module.requires_grad_(False).eval()


def _dynamic_shift_sigmas(scheduler, device, num_steps: int, image_tokens: int) -> torch.Tensor:
    """The noise levels FluxPipeline and QwenImagePipeline use, ending with 0: [T + 1]. Base sigmas linspace(1, 1/T,
    T); the scheduler shifts them with mu linear in the image token count N: mu = base_shift + (N - base_seq_len) *
    (max_shift - base_shift) / (max_seq_len - base_seq_len) (both pipelines' calculate_shift, defaults 256, 4096,
    0.5, 1.15 where the scheduler config has none). Sets the scheduler's timesteps, as the pipelines do."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    config = scheduler.config
    mu = calculate_shift(
        image_tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),  # FLUX's default (SD3's is 1.16)
    )
    # As the pipelines: their own base sigmas, unless the scheduler makes flow sigmas itself.
    base = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
    scheduler.set_timesteps(num_steps, device=device, sigmas=base, mu=mu)
    return scheduler.sigmas.clone()  # [T + 1]


def _read_settings(path_or_hub_id: str) -> tuple[dict, dict]:
    """(model_index.json, flowalign.json) of a local pipeline directory; empty dicts otherwise."""
    local = Path(path_or_hub_id).expanduser()
    if not local.is_dir():
        return {}, {}
    index = json.loads((local / "model_index.json").read_text()) if (local / "model_index.json").is_file() else {}
    settings = json.loads((local / SETTINGS_FILE).read_text()) if (local / SETTINGS_FILE).is_file() else {}
    return index, settings


def _prompts_over_context(pipeline, prompts: list[str], long_text_encoder: str, long_length: int) -> list[str]:
    """Prompts that some tokenizer of the pipeline cuts: CLIP ones at model_max_length, the long (T5) one at
    the adapter's max_sequence_length."""
    over, prompts = [], list(dict.fromkeys(prompts))  # each prompt once
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipeline, name, None)
        if tokenizer is None or (name == long_text_encoder and long_length <= 0):
            continue
        limit = long_length if name == long_text_encoder else tokenizer.model_max_length
        over += [p for p in prompts if len(tokenizer(p).input_ids) > limit and p not in over]
    return over


def _pipeline_family(class_name: str) -> str | None:
    """model.pipeline's name for a diffusers pipeline class name (StableDiffusion3Pipeline -> sd3, FluxPipeline ->
    flux, QwenImagePipeline -> qwenimage, WanPipeline -> wan), None for another family."""
    return next((family for prefix, family in PIPELINE_FAMILIES.items() if class_name.startswith(prefix)), None)


def _load_pipeline(pipeline_class, path_or_hub_id, dtype, device, max_sequence_length, default_length, kwargs):
    """`pipeline_class.from_pretrained` with components saved as null passed as None, and the text length from
    the directory's flowalign.json when it has one; returns (pipeline, max_sequence_length). A missing local
    directory, or one that holds another pipeline family, is a ConfigError (model.path, model.pipeline) raised
    before anything loads."""
    problem = local_path_problem(str(path_or_hub_id))
    if problem is not None:
        raise ConfigError(f"config field 'model.path': {problem}")
    index, settings = _read_settings(str(path_or_hub_id))
    if Path(path_or_hub_id).expanduser().is_dir() and not index:
        raise ConfigError(
            f"config field 'model.path': {str(path_or_hub_id)!r} has no model_index.json; give a "
            f"diffusers pipeline directory (one written by save_pretrained)"
        )
    wanted = _pipeline_family(pipeline_class.__name__)
    found = _pipeline_family(index.get("_class_name", ""))
    if wanted and found and wanted != found:  # the wrong family fails late and obscurely inside diffusers
        raise ConfigError(
            f"config field 'model.pipeline': {wanted}, but {str(path_or_hub_id)!r} holds a "
            f"{index['_class_name']}; set model.pipeline={found}"
        )
    kwargs = dict(kwargs)
    for name, value in index.items():
        if isinstance(value, list) and value == [None, None]:
            kwargs.setdefault(name, None)
    if max_sequence_length is None:
        max_sequence_length = settings.get("max_sequence_length", default_length)
    kwargs[_DTYPE_KWARG] = dtype
    try:
        pipeline = pipeline_class.from_pretrained(str(path_or_hub_id), **kwargs).to(device)
    except OSError as error:
        if Path(path_or_hub_id).expanduser().exists():  # a local directory that fails to read: not a config error
            raise
        reason = " ".join(str(error).split())[:300]  # a hub id that is not there, or not cached and offline
        raise ConfigError(
            f"config field 'model.path': cannot load {str(path_or_hub_id)!r} ({reason}); give a "
            f"pipeline directory or a hub id"
        ) from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, max_sequence_length


class SD3Adapter:
    """`FlowPipelineAdapter` for `StableDiffusion3Pipeline` (SD3, SD3.5): CLIP x2 (+ T5) text
    conditioning, CFG as one batched forward of [uncond, cond], timestep = sigma * 1000."""

    def __init__(self, pipeline, max_sequence_length: int = SD3_DEFAULT_MAX_SEQUENCE_LENGTH):
        self.pipeline = pipeline
        # what velocity() calls: a trainer may put its DDP/FSDP wrapper here, so config lookups go through
        # pipeline.transformer (the module itself)
        self.transformer = pipeline.transformer
        self.scheduler = pipeline.scheduler
        self.max_sequence_length = max_sequence_length  # T5 tokens (zeros when T5 is absent)
        _freeze_all_but_transformer(pipeline)

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

        pipeline, length = _load_pipeline(
            StableDiffusion3Pipeline,
            path_or_hub_id,
            dtype,
            device,
            max_sequence_length,
            SD3_DEFAULT_MAX_SEQUENCE_LENGTH,
            pipeline_kwargs,
        )
        return cls(pipeline, max_sequence_length=length)

    @property
    def device(self) -> torch.device:
        return self.pipeline.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.transformer.dtype

    def prompts_over_context(self, prompts: list[str]) -> list[str]:
        """Prompts the CLIP tokenizers (or T5 at max_sequence_length) would truncate."""
        return _prompts_over_context(self.pipeline, prompts, "tokenizer_3", self.max_sequence_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """The pipeline's own `encode_prompt` for `prompts` and for "" (CFG's unconditional)."""
        _check_prompts(prompts)
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
        p = self.pipeline
        default = p.default_sample_size * p.vae_scale_factor
        h, w = _latent_size(height, width, default, default, p.vae_scale_factor, p.patch_size)
        return (p.transformer.config.in_channels, h, w)

    def initial_noise(
        self, batch: int, generator: torch.Generator | None = None, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Standard normal latents [B, C, h, w], drawn as the pipeline draws them (same generator
        -> same noise as `pipeline(..., generator=generator)`)."""
        return _pipeline_noise(self, batch, generator, height, width)  # [B, C, h, w]

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
        sigma = _sigma_per_sample(sigma, embeds, latents)  # [B]
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


# ----------------------------------------------------------------------------- FLUX

FLUX_DEFAULT_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.__call__'s default T5 length (also its maximum)
FLUX_PATCH = 2  # FLUX packs each 2x2 patch of latent pixels into one image token


def _pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] -> image tokens [B, (h/2)*(w/2), 4C]: token (i, j) holds the 2x2 patch
    at rows 2i..2i+1, columns 2j..2j+1, features ordered (channel, patch row, patch column)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // FLUX_PATCH, FLUX_PATCH, w // FLUX_PATCH, FLUX_PATCH)  # [B, C, i, di, j, dj]
    patches = patches.permute(0, 2, 4, 1, 3, 5)  # [B, i, j, C, di, dj]
    return patches.reshape(b, (h // FLUX_PATCH) * (w // FLUX_PATCH), c * FLUX_PATCH * FLUX_PATCH)  # [B, N, 4C]


def _unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `_pack_latents`: tokens [B, (h/2)*(w/2), 4C] -> latents [B, C, h, w] (h, w unpacked)."""
    b, _, features = tokens.shape
    c = features // (FLUX_PATCH * FLUX_PATCH)
    patches = tokens.reshape(b, height // FLUX_PATCH, width // FLUX_PATCH, c, FLUX_PATCH, FLUX_PATCH)
    # patches: [B, i, j, C, di, dj]
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)  # [B, C, h, w]


def _latent_size(height, width, default_height: int, default_width: int, factor: int, patch: int) -> tuple[int, int]:
    """(h, w) of the latents of a height x width image (None: the pipeline's default size). The pipelines round a
    size that is not a multiple of VAE factor x patch size down; we refuse it, so sizes mean what they say."""
    height, width = height or default_height, width or default_width
    if height % (factor * patch) or width % (factor * patch):
        raise ValueError(
            f"height and width must be multiples of {factor * patch} (VAE factor {factor} x patch size "
            f"{patch}); got height={height}, width={width}"
        )
    return height // factor, width // factor


def _packed_latent_shape(pipeline, height, width) -> tuple[int, int, int]:
    """(C, h, w) of FLUX's and Qwen-Image's unpacked latents: C = in_channels / 4 (the transformer sees 2x2 patches),
    h = height / VAE factor; default size default_sample_size (128) * VAE factor."""
    default = pipeline.default_sample_size * pipeline.vae_scale_factor
    h, w = _latent_size(height, width, default, default, pipeline.vae_scale_factor, FLUX_PATCH)
    return (pipeline.transformer.config.in_channels // (FLUX_PATCH * FLUX_PATCH), h, w)


def _pipeline_noise(adapter, batch: int, generator, height, width, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal latents of `adapter.latent_shape`, drawn by diffusers' randn_tensor as the pipelines draw
    them (the same generator gives the same noise), in `dtype` (default: the transformer's)."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (batch, *adapter.latent_shape(height, width))
    return randn_tensor(shape, generator=generator, device=adapter.device, dtype=dtype or adapter.dtype)


def _packed_input(latents: torch.Tensor, sigma, embeds: PromptEmbeds, dtype: torch.dtype):
    """(image tokens [B, N, 4C], sigma [B], (h, w)) of latents [B, C, h, w] for FLUX's and Qwen-Image's transformers."""
    h, w = latents.shape[-2:]
    if h % FLUX_PATCH or w % FLUX_PATCH:
        raise ValueError(f"latents height and width must be even (2x2 patches), got shape {tuple(latents.shape)}")
    return _pack_latents(latents.to(dtype)), _sigma_per_sample(sigma, embeds, latents), (h, w)


def _image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """RoPE position ids of the packed image tokens [(h/2)*(w/2), 3]: (0, token row i, token column j),
    rows in the order `_pack_latents` emits tokens (row-major over (i, j))."""
    rows = torch.arange(height // FLUX_PATCH, device=device).repeat_interleave(width // FLUX_PATCH)  # [N]
    cols = torch.arange(width // FLUX_PATCH, device=device).repeat(height // FLUX_PATCH)  # [N]
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)  # [N, 3]


class FluxAdapter:
    """`FlowPipelineAdapter` for `FluxPipeline` (FLUX.1 dev / schnell): CLIP pooled + T5 token
    conditioning, latents packed into 2x2-patch tokens, transformer called at timestep = sigma.

    Guidance: a guidance-distilled transformer (config.guidance_embeds, FLUX.1-dev) gets
    guidance_scale as its `guidance` input and one forward, as the pipeline's guidance_scale.
    A transformer without guidance embeddings (schnell, de-distilled models) gets true CFG when
    guidance_scale > 1: v = v_u + g * (v_c - v_u), v_u from the empty prompt "", both from one
    batched forward of [uncond, cond]; this equals `pipeline(..., true_cfg_scale=g,
    negative_prompt="")`, which runs the two forwards separately."""

    def __init__(self, pipeline, max_sequence_length: int = FLUX_DEFAULT_MAX_SEQUENCE_LENGTH):
        if not 1 <= max_sequence_length <= FLUX_DEFAULT_MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"max_sequence_length must be in [1, {FLUX_DEFAULT_MAX_SEQUENCE_LENGTH}] (T5 tokens), "
                f"got {max_sequence_length}; FluxPipeline uses 512 by default"
            )
        self.pipeline = pipeline
        # what velocity() calls: a trainer may put its DDP/FSDP wrapper here, so config lookups go through
        # pipeline.transformer (the module itself)
        self.transformer = pipeline.transformer
        self.scheduler = pipeline.scheduler
        self.max_sequence_length = max_sequence_length
        _freeze_all_but_transformer(pipeline)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_sequence_length: int | None = None,
        **pipeline_kwargs,
    ) -> FluxAdapter:
        """Load with `FluxPipeline.from_pretrained` (local directory or hub id). For a local
        directory, components saved as null are passed as None and `max_sequence_length` defaults
        to the value in its flowalign.json if there is one, else to the pipeline's 512.
        `pipeline_kwargs` go to from_pretrained."""
        from diffusers import FluxPipeline

        pipeline, length = _load_pipeline(
            FluxPipeline,
            path_or_hub_id,
            dtype,
            device,
            max_sequence_length,
            FLUX_DEFAULT_MAX_SEQUENCE_LENGTH,
            pipeline_kwargs,
        )
        return cls(pipeline, max_sequence_length=length)

    @property
    def device(self) -> torch.device:
        return self.pipeline.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.transformer.dtype

    def prompts_over_context(self, prompts: list[str]) -> list[str]:
        """Prompts the CLIP tokenizers (or T5 at max_sequence_length) would truncate."""
        return _prompts_over_context(self.pipeline, prompts, "tokenizer_2", self.max_sequence_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """The pipeline's own `encode_prompt` (T5 tokens [B, L, D], CLIP pooled [B, P]) for `prompts`,
        and for "" as the negative fields (read only by true CFG; "" is encoded once and repeated)."""
        _check_prompts(prompts)
        common = dict(prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)
        embeds, pooled, _ = self.pipeline.encode_prompt(prompt=list(prompts), **common)  # [B, L, D], [B, P]
        empty, empty_pooled, _ = self.pipeline.encode_prompt(prompt=[""], **common)  # [1, L, D], [1, P]
        batch = len(prompts)
        return PromptEmbeds(embeds, pooled, empty.expand(batch, -1, -1).clone(), empty_pooled.expand(batch, -1).clone())

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the unpacked latents for a height x width image: C = in_channels / 4 (the
        transformer sees 2x2 patches), h = height / VAE factor. Default size: the pipeline's
        default_sample_size (128) * VAE factor."""
        return _packed_latent_shape(self.pipeline, height, width)

    def initial_noise(
        self, batch: int, generator: torch.Generator | None = None, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Standard normal latents [B, C, h, w], drawn unpacked as the pipeline draws them before
        packing (same generator -> same noise as `pipeline(..., generator=generator)`)."""
        return _pipeline_noise(self, batch, generator, height, width)  # [B, C, h, w]

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """FluxPipeline's noise levels, ending with 0: [T + 1]. Base sigmas linspace(1, 1/T, T); with
        dynamic shifting, sigma' = e^mu / (e^mu + 1/sigma - 1) with mu linear in the image token count
        N = (h/2)(w/2): mu = base_shift + (N - base_seq_len) * (max_shift - base_shift) /
        (max_seq_len - base_seq_len); otherwise the scheduler's fixed shift. (Sets the scheduler's
        timesteps, as the pipeline does before sampling.)"""
        _, h, w = self.latent_shape(height, width)
        return _dynamic_shift_sigmas(self.scheduler, self.device, num_steps, (h // FLUX_PATCH) * (w // FLUX_PATCH))

    def velocity(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, embeds: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Predicted v = noise - x0 at noise level sigma: [B, C, h, w], in the transformer's dtype.

        Latents are packed into 2x2-patch tokens with position ids (0, i, j) (text ids are zeros),
        the transformer is called at timestep = sigma (FluxPipeline passes t / 1000; the model scales
        by 1000 inside) and its output is unpacked. Guidance as in the class docstring.
        Differentiable outside no_grad."""
        tokens, sigma, (h, w) = _packed_input(latents, sigma, embeds, self.dtype)  # [B, N, 4C], [B]
        img_ids = _image_ids(h, w, latents.device, self.dtype)  # [N, 3]
        txt_ids = torch.zeros(embeds.prompt_embeds.shape[1], 3, device=latents.device, dtype=self.dtype)  # [L, 3]
        distilled = bool(self.pipeline.transformer.config.guidance_embeds)  # self.transformer may be a DDP wrapper
        true_cfg = guidance_scale > 1 and not distilled
        if true_cfg:  # one batched forward of [uncond, cond]
            tokens = torch.cat([tokens, tokens])  # [2B, N, 4C]
            sigma = torch.cat([sigma, sigma])  # [2B]
            text = torch.cat([embeds.negative_prompt_embeds, embeds.prompt_embeds])  # [2B, L, D]
            pooled = torch.cat([embeds.negative_pooled_prompt_embeds, embeds.pooled_prompt_embeds])  # [2B, P]
        else:
            text, pooled = embeds.prompt_embeds, embeds.pooled_prompt_embeds  # [B, L, D], [B, P]
        # FLUX.1-dev was distilled to take the guidance scale as an input (embedded like the timestep).
        guidance = torch.full((tokens.shape[0],), float(guidance_scale), device=latents.device) if distilled else None
        v = self.transformer(
            hidden_states=tokens,
            timestep=sigma,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]  # [B or 2B, N, 4C]
        v = _unpack_latents(v, h, w)  # [B or 2B, C, h, w]
        if true_cfg:
            v_uncond, v_cond = v.chunk(2)  # [B, C, h, w] each
            return v_uncond + guidance_scale * (v_cond - v_uncond)
        return v

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] (float32): VAE decode of latents / scaling + shift, then
        x / 2 + 1/2 clamped, as the pipeline's output_type="pt". Differentiable outside no_grad."""
        vae = self.pipeline.vae
        z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)  # undo the FLUX latent scaling
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0]  # [B, 3, H, W] in ~[-1, 1]
        return (images * 0.5 + 0.5).clamp(0, 1).float()


def _unit_range(images: torch.Tensor) -> torch.Tensor:
    """VAE output in ~[-1, 1] -> [0, 1] float32, clamped: the pipelines' output_type="pt"."""
    return (images * 0.5 + 0.5).clamp(0, 1).float()


def _denormalized_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """Wan-style VAE latents [B, C, F, h, w] as the VAE decodes them: x * latents_std + latents_mean per channel (the
    Qwen-Image and Wan pipelines write it as x / (1 / std) + mean)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=vae.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=vae.dtype).view(shape)
    return latents.to(vae.dtype) * std + mean  # [B, C, F, h, w]


# ----------------------------------------------------------------------------- Qwen-Image

QWEN_IMAGE_DEFAULT_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default (its maximum is 1024)


class QwenImageAdapter:
    """`FlowPipelineAdapter` for `QwenImagePipeline` (Qwen-Image): Qwen2.5-VL token conditioning (the last hidden
    state of a chat template around the prompt, its first 34 tokens dropped, as long as the batch's longest prompt
    with a mask), latents packed into 2x2-patch tokens as FLUX's, the transformer called at timestep = sigma.

    Guidance (guidance_scale > 1) is the pipeline's true CFG with its norm rescale: v_cfg = v_u + g (v_c - v_u),
    then v = v_cfg * ||v_c|| / ||v_cfg||, norms over each image token's features (the last dim of the packed
    [B, N, 4C] velocity); v_u from the empty prompt "", v_u and v_c from one batched forward of [uncond, cond]. This
    equals `pipeline(..., true_cfg_scale=g, negative_prompt="")`, which runs the two forwards separately."""

    def __init__(self, pipeline, max_sequence_length: int = QWEN_IMAGE_DEFAULT_MAX_SEQUENCE_LENGTH):
        if not 1 <= max_sequence_length <= 1024:
            raise ValueError(
                f"max_sequence_length must be in [1, 1024] (text tokens), got {max_sequence_length}; "
                "QwenImagePipeline uses 512 by default"
            )
        if pipeline.transformer.config.guidance_embeds:  # diffusers' QwenImage transformer cannot embed it either
            raise ValueError("a guidance-distilled Qwen-Image transformer (guidance_embeds) is not supported")
        self.pipeline = pipeline
        # what velocity() calls: a trainer may put its DDP/FSDP wrapper here
        self.transformer = pipeline.transformer
        self.scheduler = pipeline.scheduler
        self.max_sequence_length = max_sequence_length
        _freeze_all_but_transformer(pipeline)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_sequence_length: int | None = None,
        **pipeline_kwargs,
    ) -> QwenImageAdapter:
        """Load with `QwenImagePipeline.from_pretrained` (local directory or hub id); as FluxAdapter.from_pretrained,
        with the pipeline's 512 text tokens as the default length."""
        from diffusers import QwenImagePipeline

        pipeline, length = _load_pipeline(
            QwenImagePipeline,
            path_or_hub_id,
            dtype,
            device,
            max_sequence_length,
            QWEN_IMAGE_DEFAULT_MAX_SEQUENCE_LENGTH,
            pipeline_kwargs,
        )
        return cls(pipeline, max_sequence_length=length)

    @property
    def device(self) -> torch.device:
        return self.pipeline.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.transformer.dtype

    def prompts_over_context(self, prompts: list[str]) -> list[str]:
        """Prompts whose tokens, after the template's dropped prefix, pass max_sequence_length (the pipeline cuts
        them there)."""
        p = self.pipeline
        drop = p.prompt_template_encode_start_idx
        count = lambda text: len(p.tokenizer(p.prompt_template_encode.format(text)).input_ids) - drop
        return [text for text in dict.fromkeys(prompts) if count(text) > self.max_sequence_length]

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's encode_prompt: ([B, L, D], mask [B, L]), L the longest prompt's length (the pipeline
        returns no mask when no row is padded: then all ones)."""
        embeds, mask = self.pipeline.encode_prompt(
            prompt=list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )  # [B, L, D], [B, L] or None
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Token embeddings and masks of `prompts` and of "" (the negative fields, read by CFG; encoded once and
        repeated), both padded to one length so that [uncond, cond] batch together. No pooled embedding."""
        _check_prompts(prompts)
        embeds, mask = self._encode(prompts)  # [B, L, D], [B, L]
        empty, empty_mask = self._encode([""])  # [1, L0, D], [1, L0]
        batch = len(prompts)
        length = max(embeds.shape[1], empty.shape[1])
        return PromptEmbeds(
            embeds,
            None,
            empty.expand(batch, -1, -1).clone(),
            None,
            prompt_mask=mask,
            negative_prompt_mask=empty_mask.expand(batch, -1).clone(),
        ).padded(length)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the unpacked latents of a height x width image: C = in_channels / 4 (2x2 patches), h = height
        / VAE factor (8). Default size: default_sample_size (128) * VAE factor = 1024."""
        return _packed_latent_shape(self.pipeline, height, width)

    def initial_noise(
        self, batch: int, generator: torch.Generator | None = None, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Standard normal latents [B, C, h, w]: the pipeline draws [B, 1, C, h, w] (a frame axis of 1) before
        packing, the same numbers in the same order, so the same generator gives the same noise."""
        return _pipeline_noise(self, batch, generator, height, width)  # [B, C, h, w]

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """QwenImagePipeline's noise levels, ending with 0: [T + 1]; the FLUX form (`_dynamic_shift_sigmas`) on the
        image token count N = (h/2)(w/2), with Qwen-Image's scheduler config (max_shift 0.9, max_image_seq_len 8192,
        exponential time shift, shift_terminal 0.02)."""
        _, h, w = self.latent_shape(height, width)
        return _dynamic_shift_sigmas(self.scheduler, self.device, num_steps, (h // FLUX_PATCH) * (w // FLUX_PATCH))

    def velocity(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, embeds: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Predicted v = noise - x0 at noise level sigma: [B, C, h, w], in the transformer's dtype. Latents are packed
        into 2x2-patch tokens with img_shapes (1, h/2, w/2) for the rotary positions, the text mask is passed, the
        transformer is called at timestep = sigma (the pipeline passes t / 1000) and its output unpacked. Guidance as
        in the class docstring. Differentiable outside no_grad."""
        tokens, sigma, (h, w) = _packed_input(latents, sigma, embeds, self.dtype)  # [B, N, 4C], [B]
        cfg = guidance_scale > 1
        if cfg:  # one batched forward of [uncond, cond]
            tokens, sigma = torch.cat([tokens, tokens]), torch.cat([sigma, sigma])  # [2B, N, 4C], [2B]
            text = torch.cat([embeds.negative_prompt_embeds, embeds.prompt_embeds])  # [2B, L, D]
            mask = torch.cat([embeds.negative_prompt_mask, embeds.prompt_mask])  # [2B, L]
        else:
            text, mask = embeds.prompt_embeds, embeds.prompt_mask  # [B, L, D], [B, L]
        v = self.transformer(
            hidden_states=tokens,
            timestep=sigma.to(self.dtype),
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, h // FLUX_PATCH, w // FLUX_PATCH)]] * tokens.shape[0],
            return_dict=False,
        )[0]  # [B or 2B, N, 4C]
        if cfg:
            v_uncond, v_cond = v.chunk(2)  # [B, N, 4C] each
            combined = v_uncond + guidance_scale * (v_cond - v_uncond)
            # the pipeline's rescale: each token's velocity keeps the conditional prediction's norm
            v = combined * (v_cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        return _unpack_latents(v, h, w)  # [B, C, h, w]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] (float32): the latents get a frame axis of 1, are de-normalised per channel
        (x * latents_std + latents_mean) and decoded by the video VAE, whose single frame is taken; then x / 2 + 1/2
        clamped, as the pipeline's output_type="pt". Differentiable outside no_grad."""
        vae = self.pipeline.vae
        z = _denormalized_latents(latents[:, :, None], vae)  # [B, C, 1, h, w]
        return _unit_range(vae.decode(z, return_dict=False)[0][:, :, 0])  # [B, 3, H, W]


# ----------------------------------------------------------------------------- Wan (text-to-video)

WAN_DEFAULT_MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default UMT5 length
WAN_DEFAULT_NUM_FRAMES = 81  # WanPipeline.__call__'s default (5 s at 16 fps)


class WanAdapter:
    """`FlowPipelineAdapter` for `WanPipeline` (Wan 2.1 text-to-video; a Wan 2.2 pipeline with one transformer):
    UMT5 token conditioning zero-padded to max_sequence_length, video latents [B, C, F, h, w] with a frame axis
    (F = (num_frames - 1) / 4 + 1 latent frames for the VAE's temporal factor 4), transformer called at
    timestep = sigma * 1000, CFG v = v_u + g (v_c - v_u) against "" from one batched forward of [uncond, cond]
    (the pipeline runs the two forwards separately). decode returns videos [B, F', 3, H, W]: frame-major, so a
    frame is an image (rewards score frames; flowalign.rewards.plugins.call_reward averages them).

    The frame count is fixed per adapter (num_frames): the protocol's height/width arguments stay as they are.
    Departure from the pipeline: Wan ships UniPCMultistepScheduler, whose timesteps are int(sigma * 1000); the
    samplers here step in continuous sigma and call the transformer at sigma * 1000 unrounded (the same as the
    pipeline with FlowMatchEulerDiscreteScheduler, which tests/test_wan_adapter.py checks)."""

    def __init__(
        self,
        pipeline,
        max_sequence_length: int = WAN_DEFAULT_MAX_SEQUENCE_LENGTH,
        num_frames: int = WAN_DEFAULT_NUM_FRAMES,
    ):
        if getattr(pipeline, "transformer_2", None) is not None or pipeline.config.get("expand_timesteps", False):
            raise ValueError(
                "Wan 2.2's two-transformer (A14B) and expand_timesteps (TI2V-5B) pipelines are not supported; "
                "load a one-transformer text-to-video pipeline such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
            )
        temporal = pipeline.vae_scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise ValueError(
                f"num_frames must be {temporal}k + 1 (the VAE compresses {temporal} frames into one after the "
                f"first), got {num_frames}; e.g. {(max(num_frames, 1) - 1) // temporal * temporal + 1} or 81"
            )
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1 (UMT5 tokens), got {max_sequence_length}")
        self.pipeline = pipeline
        # what velocity() calls: a trainer may put its DDP/FSDP wrapper here
        self.transformer = pipeline.transformer
        self.scheduler = pipeline.scheduler
        self.max_sequence_length = max_sequence_length
        self.num_frames = num_frames
        _freeze_all_but_transformer(pipeline)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_sequence_length: int | None = None,
        num_frames: int | None = None,
        **pipeline_kwargs,
    ) -> WanAdapter:
        """Load with `WanPipeline.from_pretrained` (local directory or hub id); as FluxAdapter.from_pretrained, with
        the pipeline's 512 text tokens and 81 frames as defaults. The VAE loads in `dtype` too (diffusers' Wan
        example keeps it float32; pass vae=... in pipeline_kwargs for that)."""
        from diffusers import WanPipeline

        pipeline, length = _load_pipeline(
            WanPipeline,
            path_or_hub_id,
            dtype,
            device,
            max_sequence_length,
            WAN_DEFAULT_MAX_SEQUENCE_LENGTH,
            pipeline_kwargs,
        )
        return cls(pipeline, max_sequence_length=length, num_frames=num_frames or WAN_DEFAULT_NUM_FRAMES)

    @property
    def device(self) -> torch.device:
        return self.pipeline.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.transformer.dtype

    def prompts_over_context(self, prompts: list[str]) -> list[str]:
        """Prompts the UMT5 tokenizer cuts at max_sequence_length."""
        return _prompts_over_context(self.pipeline, prompts, "tokenizer", self.max_sequence_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """The pipeline's own `encode_prompt` for `prompts` and for "" (the negative fields): [B, L, D] each, L =
        max_sequence_length (the pipeline zero-pads every prompt to it). No pooled embedding, no mask."""
        _check_prompts(prompts)
        embeds, negative = self.pipeline.encode_prompt(
            prompt=list(prompts),
            negative_prompt="",
            do_classifier_free_guidance=True,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )  # [B, L, D], [B, L, D]
        return PromptEmbeds(embeds.to(self.dtype), None, negative.to(self.dtype), None)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int, int]:
        """(C, F, h, w) of the latents of a num_frames x height x width video: F = (num_frames - 1) / 4 + 1, h =
        height / VAE factor (8). Default size: the pipeline's 480 x 832."""
        p = self.pipeline
        patch = p.transformer.config.patch_size[1]  # (frames, rows, columns): 2x2 patches within a frame
        h, w = _latent_size(height, width, 480, 832, p.vae_scale_factor_spatial, patch)
        frames = (self.num_frames - 1) // p.vae_scale_factor_temporal + 1
        return (p.transformer.config.in_channels, frames, h, w)

    def initial_noise(
        self, batch: int, generator: torch.Generator | None = None, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Standard normal latents [B, C, F, h, w] in float32, as the pipeline draws them whatever the transformer's
        dtype (same generator -> same noise as `pipeline(..., generator=generator)`)."""
        return _pipeline_noise(self, batch, generator, height, width, torch.float32)  # [B, C, F, h, w]

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The scheduler's noise levels for `num_steps` steps, ending with 0: [T + 1] (Wan's flow_shift applied by
        the scheduler; no resolution-dependent shift). Sets the scheduler's timesteps, as the pipeline does."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.scheduler.set_timesteps(num_steps, device=self.device)
        return self.scheduler.sigmas.clone().float()  # [T + 1]

    def velocity(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, embeds: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Predicted v = noise - x0 at noise level sigma: [B, C, F, h, w], in the transformer's dtype. The transformer
        is called at timestep = sigma * num_train_timesteps (1000) on [B, C, F, h, w] (it patches itself). CFG as
        in the class docstring when guidance_scale > 1. Differentiable outside no_grad."""
        if latents.ndim != 5:
            raise ValueError(f"latents must be [B, C, F, h, w] (a frame axis), got shape {tuple(latents.shape)}")
        sigma = _sigma_per_sample(sigma, embeds, latents)  # [B]
        timestep = sigma * self.scheduler.config.num_train_timesteps  # [B]
        x = latents.to(self.dtype)  # [B, C, F, h, w]
        if guidance_scale > 1:
            v = self.transformer(
                hidden_states=torch.cat([x, x]),  # [2B, C, F, h, w]
                timestep=torch.cat([timestep, timestep]),
                encoder_hidden_states=torch.cat([embeds.negative_prompt_embeds, embeds.prompt_embeds]),
                return_dict=False,
            )[0]
            v_uncond, v_cond = v.chunk(2)  # [B, C, F, h, w] each
            return v_uncond + guidance_scale * (v_cond - v_uncond)
        return self.transformer(
            hidden_states=x, timestep=timestep, encoder_hidden_states=embeds.prompt_embeds, return_dict=False
        )[0]  # [B, C, F, h, w]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos [B, F', 3, H, W] in [0, 1] (float32), F' = num_frames: latents de-normalised per channel (x *
        latents_std + latents_mean), decoded by the video VAE ([B, 3, F', H, W]), x / 2 + 1/2 clamped, frames
        first, as the pipeline's output_type="pt". Differentiable outside no_grad."""
        vae = self.pipeline.vae
        video = vae.decode(_denormalized_latents(latents, vae), return_dict=False)[0]  # [B, 3, F', H, W]
        return _unit_range(video.permute(0, 2, 1, 3, 4))  # [B, F', 3, H, W]

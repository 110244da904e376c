"""The model side of the flow recipes: the pipeline adapter, the trainable policy (LoRA or full), the plain
transformer for sampling, the seeded noise streams and the training checkpoint."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from flowalign import adapters, samplers
from flowalign.config import EMBEDDED_MODEL, FlowGRPOConfig
from flowalign.toy import SHIPPED_DIR, default_cache_dir, ensure_digits_pipeline, is_complete
from flowalign.adapters import CachedPromptEncoder
from flowalign.lora import check_lora_targets, make_trainable, save_lora_for_pipeline
from flowalign.rewards.plugins import check_rewards_on_dummy_batch
from shared.config import ConfigError, to_dict
from shared.run import Run
from shared.stats import PromptStatTracker


ADAPTERS = {  # model.pipeline -> adapter class
    "sd3": adapters.SD3Adapter,
    "flux": adapters.FluxAdapter,
    "qwenimage": adapters.QwenImageAdapter,
    "wan": adapters.WanAdapter,
}


def load_adapter(config: FlowGRPOConfig, device: torch.device):
    """The pipeline adapter named by model.pipeline, loaded with from_pretrained (directory or hub id)."""
    path = config.model.path
    if path == EMBEDDED_MODEL:
        path = ensure_digits_pipeline()
    adapter_class = ADAPTERS[config.model.pipeline]
    if config.model.lora:  # on a weightless copy, before the weights load
        check_lora_targets(path, config.model.lora_targets)
    kwargs = {"trust_remote_code": True} if config.model.allow_remote_code else {}  # off unless the config says so
    if config.model.pipeline == "wan":  # the frame count is the video adapter's own (None: the pipeline's 81)
        kwargs["num_frames"] = config.sampling.num_frames
    return adapter_class.from_pretrained(path, dtype=getattr(torch, config.model.dtype), device=device, **kwargs)


def check_image_size(config: FlowGRPOConfig) -> None:
    """sampling.height and sampling.width against the model's position embedding, from the transformer's and the
    VAE's config.json: no weights, no data, nothing built. A hub id not on this machine is checked once loaded
    (load_policy)."""
    directory = Path(config.model.path).expanduser()
    if config.model.path == EMBEDDED_MODEL:  # every copy of the toy has the same architecture
        directory = SHIPPED_DIR if is_complete(SHIPPED_DIR) else default_cache_dir()
    files = [directory / part / "config.json" for part in ("transformer", "vae")]
    if all(file.is_file() for file in files):
        config.sampling.check_against_model(*(json.loads(file.read_text()) for file in files))


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    """The iteration-level choices of iteration i come from (seed, i), alike on every rank: a resumed run draws
    exactly what it would have. On the CPU, so the choices do not depend on the device either."""
    return torch.Generator().manual_seed(seed * 1_000_000 + iteration)


def sample_noise(device: torch.device, *keys: int | str, samples: range | list[int]) -> samplers.SampleNoise:
    """One noise stream per sample, seeded from (keys..., global sample index)."""
    return samplers.SampleNoise.seeded([samplers.stream_seed(*keys, i) for i in samples], device)


def make_policy(config: FlowGRPOConfig, transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """LoRA (or full fine-tuning) with float32 trainable weights, and gradient checkpointing when asked for."""
    m = config.model
    params = make_trainable(transformer, m.lora, m.lora_rank, m.lora_alpha, m.lora_targets)
    if config.memory.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()  # diffusers: recompute each block in the backward pass
    return params


@contextlib.contextmanager
def plain_transformer(run: Run, adapter):
    """Rollouts, evaluation and the KL reference call the transformer itself, not its DDP wrapper: no gradient
    hooks and no buffer broadcast, and peft's disable_adapters is there to call."""
    wrapped = adapter.transformer
    with run.unwrapped_for_generation(wrapped) as plain:
        adapter.transformer = plain
        try:
            yield plain
        finally:
            adapter.transformer = wrapped


def velocity_fn_for(adapter, embeds, guidance_scale: float):
    return lambda latents, sigma: adapter.velocity(latents, sigma, embeds, guidance_scale)


def save_training_checkpoint(
    config,
    run: Run,
    adapter,
    optimizer,
    ema,
    iteration: int,
    trackers: dict[str, PromptStatTracker] | None = None,
    old_policy=None,
) -> None:
    """The trainable weights, optimizer, EMA, per-prompt trackers and (DiffusionNFT) the sampling policy's
    weights `old_policy.shadow`."""
    model = adapter.transformer
    states = {
        "trainable": run.trainable_state(model),
        "optimizer": run.optimizer_state(model, optimizer),
        "trainer": {"iteration": iteration, "config": to_dict(config)},
    }
    if ema is not None:
        states["ema"] = ema.shadow
    if old_policy is not None:
        states["old_policy"] = old_policy.shadow
    if trackers:  # algorithm.advantage_scale=per_prompt: the rewards each prompt's statistics pool (alike on all ranks)
        states["stat_tracker"] = {name: tracker.state_dict() for name, tracker in trackers.items()}
    writer = None
    if config.model.lora:
        writer = lambda tmp: save_lora_for_pipeline(
            type(adapter.pipeline),
            run.unwrap(model),
            tmp / "lora",
            states["trainable"],
        )
    run.save_checkpoint(iteration, states, keep_last=config.log.keep_last, extra_writer=writer)


def load_policy(config, run: Run, load) -> tuple:
    """The pipeline (`load(config, device)`, load_adapter or a test's stand-in) with its trainable policy and
    AdamW, prepared for the processes: (adapter, params, optimizer, latent shape). The embedded pipeline is built
    on first use by the main process alone while the others wait; the LoRA initialisation is seeded alike on every
    rank."""
    t, s = config.train, config.sampling
    if config.model.path == EMBEDDED_MODEL:
        run.main_only(ensure_digits_pipeline)
    torch.manual_seed(t.seed)  # the LoRA initialisation, alike on every rank
    adapter = load(config, run.device)
    try:
        latent_shape = adapter.latent_shape(s.height, s.width)
    except ValueError as error:  # a size the VAE and patching cannot take
        raise ConfigError(f"config fields 'sampling.height', 'sampling.width': {error}") from None
    s.check_against_model(adapter.pipeline.transformer.config, adapter.pipeline.vae.config)  # a hub id, downloaded
    params = make_policy(config, adapter.transformer)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    adapter.transformer, optimizer = run.prepare(adapter.transformer, optimizer)
    return adapter, params, optimizer, latent_shape


def prompt_encoder(config, adapter, prompts: list[str]):
    """prompts -> embeddings: cached once (model.offload_text_encoders, the encoders then leave the device) or
    the adapter's encoder."""
    return CachedPromptEncoder(adapter, prompts) if config.model.offload_text_encoders else adapter.encode_prompts


def restore_policy(run: Run, adapter, optimizer) -> None:
    """The trainable weights and the optimizer state of the checkpoint being resumed (run.checkpoint)."""
    run.load_trainable(adapter.transformer, run.load("trainable"))
    run.load_optimizer(adapter.transformer, optimizer, run.load("optimizer"))


def check_rewards_first(config, adapter, rewards: dict, prompts: list[str]) -> None:
    """Every reward called once on two decoded images before training (a broken reward fails in seconds)."""
    s = config.sampling
    first_images = adapter.decode(
        adapter.initial_noise(2, iteration_generator(config.train.seed, -1), s.height, s.width)
    )
    check_rewards_on_dummy_batch(
        rewards,
        first_images,
        [prompts[i % len(prompts)] for i in range(2)],
        allow_nonfinite=config.reward.on_bad_score == "drop",
    )

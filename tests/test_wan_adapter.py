"""WanAdapter is the pipeline's math on video latents [B, C, F, h, w]: its velocity is the transformer called as
WanPipeline calls it, and its Euler loop reproduces WanPipeline.__call__ (with an Euler scheduler)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from flowalign import toy
from flowalign.adapters import FlowPipelineAdapter, WanAdapter, _pipeline_family
from flowalign.config import FlowGRPOConfig
from flowalign.model import load_adapter

PROMPTS = ["the digit seven", "a photo of the digit 3"]
SEQ = 8  # UMT5 tokens
SIZE = 32  # pixels; VAE factor 4 -> 8x8 latents -> 4x4 patches per latent frame
FRAMES = 5  # temporal factor 4 -> 2 latent frames


def tiny_components(seed: int = 0) -> dict:
    """Untrained tiny Wan components: a 2-layer UMT5 encoder, a 2-block transformer, a video VAE with spatial factor 4
    and Wan's temporal factor 4, and an Euler scheduler with Wan 2.1's flow shift 3 (the released UniPC scheduler
    is checked in test_unipc_sigmas_are_wans_schedule)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = toy.build_clip_tokenizer()  # any tokenizer works for UMT5's embedding table
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
        )
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
        )  # fmt: skip
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.7, 2.0, 1.1], scale_factor_spatial=4,
        )  # fmt: skip
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from diffusers import WanPipeline

    path = tmp_path_factory.mktemp("wan")
    WanPipeline(**tiny_components()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(saved):
    return WanAdapter.from_pretrained(str(saved), max_sequence_length=SEQ, num_frames=FRAMES)


def euler_sample(adapter, noise, prompts, num_steps, guidance_scale):
    embeds = adapter.encode_prompts(prompts)
    sigmas = adapter.sigmas(num_steps, SIZE, SIZE)
    x = noise
    with torch.no_grad():
        for i in range(num_steps):
            x = x + adapter.velocity(x, sigmas[i], embeds, guidance_scale) * (sigmas[i + 1] - sigmas[i])
        return adapter.decode(x)


def test_loads_as_its_family_with_frozen_encoders(adapter, saved):
    assert isinstance(adapter, FlowPipelineAdapter)
    assert _pipeline_family(type(adapter.pipeline).__name__) == "wan"
    for name in ("text_encoder", "vae"):
        module = getattr(adapter.pipeline, name)
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    config = FlowGRPOConfig()
    config.model.path, config.model.pipeline = str(saved), "wan"
    config.sampling.num_frames = 9
    loaded = load_adapter(config, torch.device("cpu"))
    assert isinstance(loaded, WanAdapter) and loaded.num_frames == 9 and loaded.latent_shape(32, 32) == (4, 3, 8, 8)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_euler_loop_reproduces_pipeline_call_with_same_generator(adapter, guidance_scale):
    expected = adapter.pipeline(
        PROMPTS, guidance_scale=guidance_scale, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
        output_type="pt", height=SIZE, width=SIZE, num_frames=FRAMES, max_sequence_length=SEQ,
    ).frames  # fmt: skip
    noise = adapter.initial_noise(2, torch.Generator().manual_seed(7), SIZE, SIZE)
    assert noise.shape == (2, 4, 2, 8, 8) and noise.dtype == torch.float32
    videos = euler_sample(adapter, noise, PROMPTS, 3, guidance_scale)
    assert videos.shape == (2, FRAMES, 3, SIZE, SIZE) == expected.shape
    assert_close(videos, expected, rtol=0, atol=1e-4)


def test_velocity_is_the_transformer_called_as_the_pipeline(adapter):
    # The pipeline's call: timestep t = sigma * 1000, its own prompt embeddings (zero-padded to SEQ) and "" for CFG.
    p = adapter.pipeline
    cond, uncond = p.encode_prompt(PROMPTS, negative_prompt="", max_sequence_length=SEQ, device="cpu")
    embeds = adapter.encode_prompts(PROMPTS)
    assert embeds.prompt_embeds.shape == (2, SEQ, 16) and embeds.pooled_prompt_embeds is None
    x = adapter.initial_noise(2, torch.Generator().manual_seed(3), SIZE, SIZE)
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        call = lambda text: p.transformer(
            hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False
        )[0]
        v_c, v_u = call(cond), call(uncond)
        assert_close(adapter.velocity(x, sigma, embeds, 1.0), v_c, rtol=0, atol=1e-5)
        assert_close(adapter.velocity(x, sigma, embeds, 5.0), v_u + 5.0 * (v_c - v_u), rtol=0, atol=1e-5)


def test_unipc_sigmas_are_wans_schedule(adapter):
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers ships UniPCMultistepScheduler with flow_shift 3 and flow sigmas: base
    # s = linspace(1, 1/1000, T + 1)[:-1], shifted 3s / (1 + 2s), the first lowered by 1e-6 (so log(1 - s) is finite),
    # then 0. The samplers accept it (decreasing, in [0, 1]).
    from diffusers import UniPCMultistepScheduler

    from flowalign.samplers import _check_sigmas

    unipc = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    wan = WanAdapter(type(adapter.pipeline)(**{**adapter.pipeline.components, "scheduler": unipc}), SEQ, FRAMES)
    s = np.linspace(1, 1 / 1000, 5)[:-1]
    shifted = 3 * s / (1 + 2 * s)
    shifted[0] -= 1e-6
    expected = torch.tensor(list(shifted) + [0.0], dtype=torch.float32)
    sigmas = wan.sigmas(4, SIZE, SIZE)
    assert_close(sigmas, expected, rtol=0, atol=1e-6)
    assert _check_sigmas(sigmas) == 4


def test_velocity_is_differentiable(adapter):
    embeds = adapter.encode_prompts(PROMPTS)
    x = adapter.initial_noise(2, torch.Generator().manual_seed(2), SIZE, SIZE)
    adapter.transformer.zero_grad()
    adapter.velocity(x, torch.tensor([0.7, 0.2]), embeds, 5.0).pow(2).mean().backward()
    grads = [p.grad for p in adapter.transformer.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    adapter.transformer.zero_grad()


def test_latent_shape_decode_and_errors(adapter):
    assert adapter.latent_shape() == (4, 2, 120, 208)  # the pipeline's 480 x 832, VAE factor 4
    with pytest.raises(ValueError, match="multiples of 8"):
        adapter.latent_shape(36, 32)
    with pytest.raises(ValueError, match=r"num_frames must be 4k \+ 1"):
        WanAdapter(adapter.pipeline, SEQ, num_frames=6)
    components = adapter.pipeline.components
    for extra in ({"transformer_2": components["transformer"]}, {"expand_timesteps": True}):  # Wan 2.2 A14B, TI2V
        with pytest.raises(ValueError, match="two-transformer .A14B. and expand_timesteps"):
            WanAdapter(type(adapter.pipeline)(**{**components, **extra}), SEQ, FRAMES)
    with pytest.raises(ValueError, match="frame axis"):
        adapter.velocity(torch.zeros(2, 4, 8, 8), 0.5, adapter.encode_prompts(PROMPTS))
    latents = torch.randn(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    shape = (1, 4, 1, 1, 1)
    with torch.no_grad():
        z = latents * torch.tensor([1.5, 0.7, 2.0, 1.1]).view(shape) + torch.tensor([0.1, -0.2, 0.3, 0.0]).view(shape)
        raw = adapter.pipeline.vae.decode(z).sample  # [2, 3, 5, 32, 32]; the latents config of tiny_components
        videos = adapter.decode(latents)
    assert videos.shape == (2, FRAMES, 3, SIZE, SIZE)
    assert_close(videos, (raw / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4))


def test_trains_through_the_flow_grpo_recipe(saved, tmp_path):
    # Two iterations of flow GRPO on 5-frame videos: the image reward scores frames, the grid shows frame strips.
    from diffusers import WanPipeline

    from flowalign.train import train
    from shared.checkpoint import latest_checkpoint, load_state
    from tests.test_train_smoke import tiny_config

    (saved / "flowalign.json").write_text('{"max_sequence_length": 8}')  # short text: fast
    config = tiny_config(
        saved, tmp_path / "run", "model.pipeline=wan", "sampling.num_frames=5", "sampling.height=32",
        "sampling.width=32", "algorithm.name=mixgrpo", "algorithm.window_size=2",
    )  # fmt: skip
    result = train(config)
    assert set(result["after"]) == {"eval/flowalign.rewards:jpeg_incompressibility"}
    first = load_state(tmp_path / "run" / "checkpoints" / "step-000001", "trainable")
    trained = load_state(latest_checkpoint(tmp_path / "run" / "checkpoints"), "trainable")
    assert trained and all(not torch.equal(first[name], trained[name]) for name in trained)
    fresh = WanPipeline.from_pretrained(saved)
    fresh.load_lora_weights(str(latest_checkpoint(tmp_path / "run" / "checkpoints") / "lora"))
    assert any("lora" in name for name, _ in fresh.transformer.named_parameters())
    grid = Image.open(sorted((tmp_path / "run" / "images").glob("iter-*.png"))[-1])
    # 3 prompts x 1 seed: 3 rows of 32 px, each a strip of 5 frames of 32 px after the labels (8 px a character + 8)
    assert grid.size == (8 * len("the digit three") + 8 + FRAMES * SIZE, 3 * SIZE)
    assert Image.open(sorted((tmp_path / "run" / "images").glob("iter-*.gif"))[-1]).n_frames == FRAMES

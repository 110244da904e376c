"""FluxAdapter is the pipeline's math: its Euler loop reproduces FluxPipeline.__call__."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from flowalign import toy
from flowalign.adapters import FlowPipelineAdapter, FluxAdapter, _image_ids, _pack_latents, _unpack_latents

PROMPTS = ["the digit seven", "a photo of the digit 3"]
SEQ = 8  # T5 tokens
SIZE = 32  # image pixels; VAE factor 2 -> 16x16 latents -> 8x8 = 64 image tokens


def tiny_components(guidance_embeds: bool = True, seed: int = 0) -> dict:
    """Untrained tiny FLUX components: CLIP (pooled) + T5 (tokens), 2-block VAE, 1+1-layer transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = toy.build_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=toy.TOKEN_LENGTH, hidden_act="gelu",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )  # fmt: skip
        t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=24, d_kv=8, d_ff=37, num_layers=2, num_heads=3))
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
            scaling_factor=0.37, shift_factor=0.12, use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=32,
            axes_dims_rope=(4, 4, 8), guidance_embeds=guidance_embeds,
        )  # fmt: skip
    # FLUX.1's scheduler config: resolution-dependent (dynamic) shift.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
        base_shift=0.5, max_shift=1.15,
    )  # fmt: skip
    return dict(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
        text_encoder_2=t5, tokenizer_2=toy.build_clip_tokenizer(),  # any tokenizer with T5's vocab works
    )  # fmt: skip


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from diffusers import FluxPipeline

    path = tmp_path_factory.mktemp("flux")
    FluxPipeline(**tiny_components()).save_pretrained(path)
    return FluxAdapter.from_pretrained(str(path), max_sequence_length=SEQ)


def euler_sample(adapter, noise, prompts, num_steps, guidance_scale):
    embeds = adapter.encode_prompts(prompts)
    sigmas = adapter.sigmas(num_steps, SIZE, SIZE)
    x = noise
    with torch.no_grad():
        for i in range(num_steps):
            x = x + adapter.velocity(x, sigmas[i], embeds, guidance_scale) * (sigmas[i + 1] - sigmas[i])
        return adapter.decode(x)


def test_is_a_flow_pipeline_adapter_with_frozen_encoders(adapter):
    assert isinstance(adapter, FlowPipelineAdapter)
    assert adapter.transformer.config.guidance_embeds and adapter.max_sequence_length == SEQ
    for name in ("text_encoder", "text_encoder_2", "vae"):
        module = getattr(adapter.pipeline, name)
        assert not module.training and not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("guidance_scale", [1.0, 3.5])
def test_euler_loop_reproduces_pipeline_call_with_same_generator(adapter, guidance_scale):
    # The pipeline draws its own noise (no latents=), unpacked then packed: same seed -> same noise.
    expected = adapter.pipeline(
        PROMPTS, num_inference_steps=4, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(7),
        output_type="pt", height=SIZE, width=SIZE, max_sequence_length=SEQ,
    ).images  # fmt: skip
    noise = adapter.initial_noise(2, torch.Generator().manual_seed(7), SIZE, SIZE)
    assert noise.shape == (2, 4, 16, 16)
    images = euler_sample(adapter, noise, PROMPTS, 4, guidance_scale)
    assert images.shape == (2, 3, SIZE, SIZE)
    assert_close(images, expected, rtol=0, atol=1e-4)


def test_distilled_guidance_changes_the_velocity_without_cfg(adapter):
    # guidance_embeds: the scale is a model input, not a CFG mix; 1 and 3.5 must give different v.
    embeds = adapter.encode_prompts(PROMPTS)
    x = adapter.initial_noise(2, torch.Generator().manual_seed(1), SIZE, SIZE)
    with torch.no_grad():
        assert not torch.allclose(adapter.velocity(x, 0.6, embeds, 1.0), adapter.velocity(x, 0.6, embeds, 3.5))


def test_true_cfg_matches_pipeline_true_cfg_scale_with_empty_negative():
    # No guidance embeddings: guidance_scale > 1 is true CFG against "", i.e. the pipeline's
    # true_cfg_scale with negative_prompt "" (its guidance_scale is then unused).
    from diffusers import FluxPipeline

    pipeline = FluxPipeline(**tiny_components(guidance_embeds=False, seed=1)).to("cpu")
    pipeline.set_progress_bar_config(disable=True)
    adapter = FluxAdapter(pipeline, max_sequence_length=SEQ)
    expected = pipeline(
        PROMPTS, negative_prompt=["", ""], true_cfg_scale=4.0, num_inference_steps=3,
        generator=torch.Generator().manual_seed(3), output_type="pt", height=SIZE, width=SIZE,
        max_sequence_length=SEQ,
    ).images  # fmt: skip
    noise = adapter.initial_noise(2, torch.Generator().manual_seed(3), SIZE, SIZE)
    assert_close(euler_sample(adapter, noise, PROMPTS, 3, 4.0), expected, rtol=0, atol=1e-4)
    # And the CFG combination itself: v_u + g (v_c - v_u), with v_u at g = 1 on the "" prompt.
    embeds = adapter.encode_prompts(PROMPTS)
    empty = adapter.encode_prompts(["", ""])
    assert_close(embeds.negative_prompt_embeds, empty.prompt_embeds)
    assert_close(embeds.negative_pooled_prompt_embeds, empty.pooled_prompt_embeds)
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v_c = adapter.velocity(noise, sigma, embeds, 1.0)
        v_u = adapter.velocity(noise, sigma, empty, 1.0)
        assert_close(adapter.velocity(noise, sigma, embeds, 4.0), v_u + 4.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)


def test_sigmas_follow_flux_dynamic_shift(adapter):
    # T = 4, 32x32 image -> 16x16 latents -> N = 8*8 = 64 tokens.
    # mu = 0.5 + (64 - 256) * (1.15 - 0.5) / (4096 - 256) = 0.5 - 192 * 0.65 / 3840 = 0.5 - 0.0325 = 0.4675
    # base t = linspace(1, 1/4, 4) = [1, 0.75, 0.5, 0.25]; shifted e^mu / (e^mu + 1/t - 1); append 0.
    mu, t = 0.4675, np.array([1.0, 0.75, 0.5, 0.25])
    expected = torch.tensor(list(math.exp(mu) / (math.exp(mu) + 1 / t - 1)) + [0.0], dtype=torch.float32)
    sigmas = adapter.sigmas(4, SIZE, SIZE)
    assert sigmas.shape == (5,)
    assert_close(sigmas, expected, rtol=0, atol=1e-6)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0


def test_velocity_is_differentiable(adapter):
    embeds = adapter.encode_prompts(PROMPTS)
    assert not embeds.prompt_embeds.requires_grad  # encoded under no_grad
    assert embeds.prompt_embeds.shape == (2, SEQ, 24) and embeds.pooled_prompt_embeds.shape == (2, 32)
    x = adapter.initial_noise(2, torch.Generator().manual_seed(2), SIZE, SIZE)
    adapter.transformer.zero_grad()
    adapter.velocity(x, torch.tensor([0.7, 0.2]), embeds, 3.5).pow(2).mean().backward()
    grads = [p.grad for p in adapter.transformer.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    adapter.transformer.zero_grad()


def test_packing_matches_the_pipeline_and_inverts(adapter):
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(5))
    packed = _pack_latents(x)  # [2, 3*5, 16]
    assert_close(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 10), rtol=0, atol=0)
    assert_close(_unpack_latents(packed, 6, 10), x, rtol=0, atol=0)
    # Token (i=1, j=2) holds x[:, c, 2..3, 4..5] in (c, row, col) order; its id is (0, 1, 2).
    assert_close(packed[:, 1 * 5 + 2].reshape(2, 4, 2, 2), x[:, :, 2:4, 4:6], rtol=0, atol=0)
    ids = _image_ids(6, 10, "cpu", torch.float32)
    assert ids[1 * 5 + 2].tolist() == [0, 1, 2]
    assert_close(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32), rtol=0, atol=0)


def test_latent_shape_decode_and_errors(adapter):
    assert adapter.latent_shape() == (4, 128, 128)  # pipeline default: 128 * VAE factor 2 = 256 px -> /2
    assert adapter.latent_shape(32, 16) == (4, 16, 8)
    with pytest.raises(ValueError, match="multiples of 4"):
        adapter.latent_shape(34, 32)
    embeds = adapter.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="repeat_interleave"):
        adapter.velocity(torch.zeros(3, 4, 8, 8), 0.5, embeds, 1.0)
    with pytest.raises(ValueError, match="list of str"):
        adapter.encode_prompts("the digit one")
    with pytest.raises(ValueError, match="max_sequence_length"):
        FluxAdapter(adapter.pipeline, max_sequence_length=600)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        raw = adapter.pipeline.vae.decode(latents / 0.37 + 0.12).sample  # config set in tiny_components
        assert_close(adapter.decode(latents), (raw / 2 + 0.5).clamp(0, 1))

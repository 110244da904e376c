"""SD3Adapter is the pipeline's math: its Euler loop reproduces StableDiffusion3Pipeline.__call__."""

import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from flowalign import toy
from flowalign.adapters import FlowPipelineAdapter, PromptEmbeds, SD3Adapter

PROMPTS = ["the digit seven", "a photo of the digit 3"]


@pytest.fixture(scope="module")
def adapter():
    from diffusers import FlowMatchEulerDiscreteScheduler

    components = toy.build_tiny_components(seed=0)
    # A shift != 1 and non-trivial VAE scaling so that both are really exercised.
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=3.0)
    components["vae"].register_to_config(scaling_factor=1.7, shift_factor=0.3)
    return SD3Adapter(toy.build_pipeline(components), max_sequence_length=0)


def euler_sample(adapter, noise, prompts, num_steps, guidance_scale):
    embeds = adapter.encode_prompts(prompts)
    sigmas = adapter.sigmas(num_steps)
    x = noise
    with torch.no_grad():
        for i in range(num_steps):
            x = x + (sigmas[i + 1] - sigmas[i]) * adapter.velocity(x, sigmas[i], embeds, guidance_scale)
        return adapter.decode(x)


def test_is_a_flow_pipeline_adapter(adapter):
    assert isinstance(adapter, FlowPipelineAdapter)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.5])
def test_euler_loop_reproduces_pipeline_call(adapter, guidance_scale):
    noise = adapter.initial_noise(2, torch.Generator().manual_seed(1))
    expected = adapter.pipeline(
        PROMPTS, num_inference_steps=5, guidance_scale=guidance_scale, latents=noise.clone(),
        output_type="pt", max_sequence_length=0,
    ).images  # fmt: skip
    images = euler_sample(adapter, noise, PROMPTS, 5, guidance_scale)
    assert images.shape == (2, 3, 16, 16)
    assert_close(images, expected, rtol=0, atol=1e-5)


def test_initial_noise_is_the_pipelines_noise(adapter):
    # Same generator seed, no latents= passed: the pipeline draws its own noise.
    expected = adapter.pipeline(
        PROMPTS, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(7),
        output_type="pt", max_sequence_length=0,
    ).images  # fmt: skip
    noise = adapter.initial_noise(2, torch.Generator().manual_seed(7))
    assert_close(euler_sample(adapter, noise, PROMPTS, 3, 4.0), expected, rtol=0, atol=1e-5)


def test_sigmas_follow_the_shifted_schedule(adapter):
    # Independent computation of diffusers' FlowMatchEuler schedule with shift s = 3, T = 4:
    # training sigmas k/1000 shifted: sigma_min = s*0.001 / (1 + (s-1)*0.001) = 0.003/1.002;
    # inference: t = linspace(1, sigma_min, T), then shifted again: s*t / (1 + (s-1)*t); append 0.
    s, T = 3.0, 4
    sigma_min = s * 0.001 / (1 + (s - 1) * 0.001)
    t = np.linspace(1.0, sigma_min, T)
    expected = torch.tensor(list(s * t / (1 + (s - 1) * t)) + [0.0], dtype=torch.float32)
    sigmas = adapter.sigmas(T)
    assert sigmas.shape == (T + 1,)
    assert_close(sigmas, expected, rtol=0, atol=1e-6)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0


def test_velocity_cfg_combines_two_separate_forwards(adapter):
    embeds = adapter.encode_prompts(PROMPTS)
    x = adapter.initial_noise(2, torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.8, 0.3])
    transformer = adapter.transformer
    with torch.no_grad():
        common = dict(hidden_states=x, timestep=sigma * 1000, return_dict=False)
        v_c = transformer(
            encoder_hidden_states=embeds.prompt_embeds, pooled_projections=embeds.pooled_prompt_embeds, **common
        )[0]
        v_u = transformer(
            encoder_hidden_states=embeds.negative_prompt_embeds,
            pooled_projections=embeds.negative_pooled_prompt_embeds,
            **common,
        )[0]
        assert_close(adapter.velocity(x, sigma, embeds, 1.0), v_c, rtol=0, atol=1e-6)
        assert_close(adapter.velocity(x, sigma, embeds, 4.0), v_u + 4.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
        # A float sigma means the same sigma for the whole batch.
        assert_close(adapter.velocity(x, 0.5, embeds, 2.0), adapter.velocity(x, torch.tensor([0.5, 0.5]), embeds, 2.0))


def test_velocity_is_differentiable_and_frozen_parts_stay_frozen(adapter):
    embeds = adapter.encode_prompts(PROMPTS)
    assert not embeds.prompt_embeds.requires_grad  # encoded under no_grad
    x = adapter.initial_noise(2, torch.Generator().manual_seed(3))
    adapter.transformer.zero_grad()
    adapter.velocity(x, 0.7, embeds, 3.0).pow(2).mean().backward()
    grads = [p.grad for p in adapter.transformer.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    for name in ("text_encoder", "text_encoder_2", "vae"):
        module = getattr(adapter.pipeline, name)
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    adapter.transformer.zero_grad()


def test_encode_prompts_matches_pipeline_and_empty_prompt(adapter):
    embeds = adapter.encode_prompts(PROMPTS)
    # 2 CLIPs of width 32 concatenated -> D = 64; 16 CLIP tokens + 0 T5 tokens -> L = 16.
    assert embeds.prompt_embeds.shape == (2, 16, 64) and embeds.pooled_prompt_embeds.shape == (2, 64)
    pe, npe, pp, npp = adapter.pipeline.encode_prompt(PROMPTS, None, None, max_sequence_length=0)
    assert_close(embeds.prompt_embeds, pe)
    assert_close(embeds.pooled_prompt_embeds, pp)
    empty = adapter.encode_prompts(["", ""])
    assert_close(embeds.negative_prompt_embeds, empty.prompt_embeds)
    assert_close(embeds.negative_pooled_prompt_embeds, empty.pooled_prompt_embeds)
    assert not torch.allclose(embeds.prompt_embeds[0], embeds.prompt_embeds[1])  # prompts differ


def test_prompt_embeds_indexing_and_repeat():
    e = PromptEmbeds(*(torch.arange(2.0)[:, None] + torch.zeros(2, 3) for _ in range(4)))
    r = e.repeat_interleave(3)
    assert len(r) == 6
    assert r.prompt_embeds[:, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert e[1].negative_pooled_prompt_embeds.shape == (1, 3) and e[1].prompt_embeds[0, 0] == 1


def test_latent_shape_and_errors(adapter):
    assert adapter.latent_shape() == (4, 8, 8)  # default 16x16 image, VAE factor 2
    assert adapter.latent_shape(32, 16) == (4, 16, 8)
    assert adapter.initial_noise(3).shape == (3, 4, 8, 8)
    with pytest.raises(ValueError, match="multiples of 4"):
        adapter.latent_shape(18, 16)
    embeds = adapter.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="repeat_interleave"):
        adapter.velocity(torch.zeros(3, 4, 8, 8), 0.5, embeds, 1.0)
    with pytest.raises(ValueError, match="list of str"):
        adapter.encode_prompts("the digit one")


def test_decode_undoes_scaling_and_shift(adapter):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    vae = adapter.pipeline.vae
    with torch.no_grad():
        raw = vae.decode(latents / 1.7 + 0.3).sample  # config set in the fixture
        assert_close(adapter.decode(latents), (raw / 2 + 0.5).clamp(0, 1))


def test_from_pretrained_local_dir_reads_null_components_and_settings(tmp_path):
    pipeline = toy.build_pipeline(toy.build_tiny_components(seed=0))
    pipeline.save_pretrained(tmp_path)
    (tmp_path / "flowalign.json").write_text(json.dumps({"max_sequence_length": 0}))
    loaded = SD3Adapter.from_pretrained(str(tmp_path))
    assert loaded.pipeline.text_encoder_3 is None and loaded.max_sequence_length == 0
    assert SD3Adapter.from_pretrained(str(tmp_path), max_sequence_length=2).max_sequence_length == 2
    original = SD3Adapter(pipeline, max_sequence_length=0)
    noise = original.initial_noise(2, torch.Generator().manual_seed(5))
    assert_close(euler_sample(loaded, noise, PROMPTS, 3, 3.0), euler_sample(original, noise, PROMPTS, 3, 3.0))

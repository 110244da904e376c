"""QwenImageAdapter is the pipeline's math: its velocity is the transformer called as QwenImagePipeline calls it, and
its Euler loop reproduces QwenImagePipeline.__call__ (true CFG with the norm rescale included)."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from flowalign import toy
from flowalign.config import FlowGRPOConfig
from flowalign.model import load_adapter
from shared.config import ConfigError
from flowalign.adapters import (
    CachedPromptEncoder,
    FlowPipelineAdapter,
    PromptEmbeds,
    QwenImageAdapter,
    _pack_latents,
    _pipeline_family,
    _unpack_latents,
)

PROMPTS = ["a red cat", "the digit seven on a wall"]
SIZE = 16  # image pixels; VAE factor 2 -> 8x8 latents -> 4x4 = 16 image tokens
TEMPLATE_WORDS = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
    "of the objects and background:\nuser\nassistant\n"
)


def qwen_tokenizer(text: str = TEMPLATE_WORDS + "\n".join(PROMPTS)):
    """A byte-level BPE Qwen2Tokenizer built offline: the 256 byte symbols, the chat specials, and merges that make each
    pre-token of `text` (a word with its leading space, a comma, a newline) one token, as Qwen's vocabulary does, so
    the pipeline's template prefix is 34 tokens here as with the real tokenizer."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(toy._byte_alphabet())}
    bare = Qwen2Tokenizer(vocab=dict(vocab), merges=[], unk_token="<|endoftext|>")
    merges, ranks = [], {}
    for piece, _ in bare.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text):
        pieces = toy._apply_merges(list(piece), ranks)  # how the merges so far split it
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def tiny_components(seed: int = 0) -> dict:
    """Untrained tiny Qwen-Image components: a 2-layer Qwen2.5-VL (text path used), a 2-block transformer, a one-level
    video VAE (spatial factor 2), and Qwen-Image's scheduler config."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_config = dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},  # sums to head_dim / 2 = 4
            bos_token_id=None, eos_token_id=None,
        )  # fmt: skip
        vision_config = dict(
            depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0]
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config)
        )
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(2, 2, 4),
        )  # fmt: skip
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.7, 2.0, 1.1],
        )  # fmt: skip
    # Qwen/Qwen-Image's scheduler/scheduler_config.json (as copied in several public repositories; not fetched here)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
        shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )  # fmt: skip
    return dict(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from diffusers import QwenImagePipeline

    path = tmp_path_factory.mktemp("qwenimage")
    QwenImagePipeline(**tiny_components()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(saved):
    return QwenImageAdapter.from_pretrained(str(saved), max_sequence_length=64)


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
    assert _pipeline_family(type(adapter.pipeline).__name__) == "qwenimage"
    config = FlowGRPOConfig()
    config.model.path, config.model.pipeline = str(saved), "qwenimage"
    assert isinstance(load_adapter(config, torch.device("cpu")), QwenImageAdapter)
    config.model.pipeline = "flux"  # the directory's model_index.json names a QwenImagePipeline
    with pytest.raises(ConfigError, match="set model.pipeline=qwenimage"):
        load_adapter(config, torch.device("cpu"))
    for name in ("text_encoder", "vae"):
        module = getattr(adapter.pipeline, name)
        assert not module.training and not any(p.requires_grad for p in module.parameters())


def test_tiny_tokenizer_drops_exactly_the_template(adapter):
    # The pipeline drops 34 tokens (prompt_template_encode_start_idx): the template up to the prompt.
    p = adapter.pipeline
    prefix = p.prompt_template_encode.split("{}")[0]
    assert p.prompt_template_encode_start_idx == 34 and len(p.tokenizer(prefix).input_ids) == 34
    assert len(p.tokenizer(prefix + "the digit seven").input_ids) == 34 + 3


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_euler_loop_reproduces_pipeline_call_with_same_generator(adapter, guidance_scale):
    # The pipeline draws its own noise ([B, 1, C, h, w], then packed); true CFG only with a negative prompt.
    negative = {"negative_prompt": ""} if guidance_scale > 1 else {}
    expected = adapter.pipeline(
        PROMPTS, true_cfg_scale=guidance_scale, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
        output_type="pt", height=SIZE, width=SIZE, max_sequence_length=64, **negative,
    ).images  # fmt: skip
    noise = adapter.initial_noise(2, torch.Generator().manual_seed(7), SIZE, SIZE)
    assert noise.shape == (2, 4, 8, 8)
    images = euler_sample(adapter, noise, PROMPTS, 3, guidance_scale)
    assert images.shape == (2, 3, SIZE, SIZE)
    assert_close(images, expected, rtol=0, atol=1e-4)


def test_velocity_is_the_transformer_called_as_the_pipeline(adapter):
    # The pipeline's call: packed latents, timestep t / 1000 = sigma, its own (unpadded) embeddings and mask.
    p = adapter.pipeline
    embeds = adapter.encode_prompts(PROMPTS)
    cond, cond_mask = p.encode_prompt(PROMPTS, device="cpu", max_sequence_length=64)
    empty, empty_mask = p.encode_prompt(["", ""], device="cpu", max_sequence_length=64)
    assert cond_mask is not None and empty_mask is None  # the two prompts differ in length; "" twice does not
    x = adapter.initial_noise(2, torch.Generator().manual_seed(3), SIZE, SIZE)
    sigma = torch.tensor([0.9, 0.4])
    shapes = [[(1, 4, 4)]] * 2
    with torch.no_grad():
        call = lambda text, mask: _unpack_latents(
            p.transformer(
                hidden_states=_pack_latents(x), timestep=sigma, encoder_hidden_states=text,
                encoder_hidden_states_mask=mask, img_shapes=shapes, return_dict=False,
            )[0], 8, 8,
        )  # fmt: skip
        v_c, v_u = call(cond, cond_mask), call(empty, None)
        assert_close(adapter.velocity(x, sigma, embeds, 1.0), v_c, rtol=0, atol=1e-5)
        # True CFG, then each image token's velocity scaled back to the conditional one's norm (by hand).
        combined = _pack_latents(v_u + 4.0 * (v_c - v_u))  # [2, 16, 16]
        rescaled = combined * _pack_latents(v_c).norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
        assert_close(adapter.velocity(x, sigma, embeds, 4.0), _unpack_latents(rescaled, 8, 8), rtol=0, atol=1e-5)


def test_embeddings_drop_the_template_and_pad_with_a_mask(adapter):
    embeds = adapter.encode_prompts(PROMPTS)
    # "a red cat" is 3 tokens, the other 6, each followed by the template's "<|im_end|>\n<|im_start|>assistant\n"
    # (5 tokens); "" leaves those 5. Rows are padded to the longest, 11.
    assert embeds.prompt_embeds.shape == (2, 11, 32) and embeds.negative_prompt_embeds.shape == (2, 11, 32)
    assert embeds.pooled_prompt_embeds is None and embeds.negative_pooled_prompt_embeds is None
    assert embeds.prompt_mask.sum(1).tolist() == [8, 11] and embeds.negative_prompt_mask.sum(1).tolist() == [5, 5]
    assert float(embeds.prompt_embeds[0, 8:].abs().sum()) == 0.0
    # The cache of CachedPromptEncoder joins batches of different lengths: padded to the longest, same velocity.
    alone = adapter.encode_prompts(PROMPTS[:1])  # 8 tokens
    joined = PromptEmbeds.cat([alone, adapter.encode_prompts(PROMPTS[1:])])
    assert joined.prompt_embeds.shape[1] == 11
    assert_close(joined.prompt_embeds, embeds.prompt_embeds)
    x = adapter.initial_noise(1, torch.Generator().manual_seed(4), SIZE, SIZE)
    with torch.no_grad():
        assert_close(adapter.velocity(x, 0.5, joined[0], 4.0), adapter.velocity(x, 0.5, alone, 4.0), atol=1e-5, rtol=0)
    # CachedPromptEncoder (model.offload_text_encoders) encodes one prompt a batch here: rows of 8 and 11 tokens.
    cached = CachedPromptEncoder(adapter, PROMPTS, batch_size=1)(list(reversed(PROMPTS)))
    assert cached.prompt_embeds.shape[1] == 11 and cached.prompt_mask.sum(1).tolist() == [11, 8]
    x2 = adapter.initial_noise(2, torch.Generator().manual_seed(5), SIZE, SIZE)
    with torch.no_grad():
        expected = adapter.velocity(x2, 0.5, embeds[[1, 0]], 4.0)
        assert_close(adapter.velocity(x2, 0.5, cached, 4.0), expected, atol=1e-5, rtol=0)
    assert adapter.prompts_over_context(PROMPTS + ["a red cat"]) == []
    # counted after the dropped prefix, the template suffix included (what the pipeline cuts): 8 and 11 tokens
    assert QwenImageAdapter(adapter.pipeline, max_sequence_length=9).prompts_over_context(PROMPTS) == [PROMPTS[1]]


def test_sigmas_follow_the_exponential_shift_with_terminal(adapter):
    # T = 3, 8x8 latents -> N = 16 tokens; mu = 0.5 + (16 - 256) * (0.9 - 0.5) / (8192 - 256) = 0.5 - 96 / 7936.
    # base t = [1, 2/3, 1/3]; exponential shift: e^mu / (e^mu + 1/t - 1); shift_terminal 0.02 stretches:
    # 1 - (1 - s) / ((1 - s_last) / (1 - 0.02)); append 0.
    mu, t = 0.5 - 96 / 7936, np.array([1.0, 2 / 3, 1 / 3])
    shifted = math.exp(mu) / (math.exp(mu) + 1 / t - 1)
    stretched = 1 - (1 - shifted) / ((1 - shifted[-1]) / 0.98)
    expected = torch.tensor(list(stretched) + [0.0], dtype=torch.float32)
    sigmas = adapter.sigmas(3, SIZE, SIZE)
    assert_close(sigmas, expected, rtol=0, atol=1e-6)
    assert sigmas[0] == 1.0 and abs(float(sigmas[-2]) - 0.02) < 1e-6


def test_velocity_is_differentiable(adapter):
    embeds = adapter.encode_prompts(PROMPTS)
    assert not embeds.prompt_embeds.requires_grad  # encoded under no_grad
    x = adapter.initial_noise(2, torch.Generator().manual_seed(2), SIZE, SIZE)
    adapter.transformer.zero_grad()
    adapter.velocity(x, torch.tensor([0.7, 0.2]), embeds, 4.0).pow(2).mean().backward()
    grads = [p.grad for p in adapter.transformer.parameters() if p.requires_grad]
    # The last block's text-stream outputs feed nothing (only the image tokens are read out): no gradient there.
    assert sum(g is None for g in grads) < len(grads) / 4 and sum(g.abs().sum() for g in grads if g is not None) > 0
    assert adapter.transformer.transformer_blocks[0].attn.to_q.weight.grad.abs().sum() > 0
    adapter.transformer.zero_grad()


def test_latent_shape_decode_and_errors(adapter):
    assert adapter.latent_shape() == (4, 128, 128)  # pipeline default: 128 * VAE factor 2 = 256 px -> /2
    assert adapter.latent_shape(32, 16) == (4, 16, 8)
    with pytest.raises(ValueError, match="multiples of 4"):
        adapter.latent_shape(18, 16)
    with pytest.raises(ValueError, match="max_sequence_length"):
        QwenImageAdapter(adapter.pipeline, max_sequence_length=2000)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        z = (
            latents * torch.tensor([1.5, 0.7, 2.0, 1.1])[:, None, None]
            + torch.tensor([0.1, -0.2, 0.3, 0.0])[:, None, None]
        )
        raw = adapter.pipeline.vae.decode(z[:, :, None]).sample[:, :, 0]  # the latents config of tiny_components
        assert_close(adapter.decode(latents), (raw / 2 + 0.5).clamp(0, 1))


def test_trains_through_the_flow_grpo_recipe(saved, tmp_path):
    from diffusers import QwenImagePipeline

    from flowalign.train import train
    from shared.checkpoint import latest_checkpoint, load_state
    from tests.test_train_smoke import tiny_config

    (saved / "flowalign.json").write_text('{"max_sequence_length": 64}')
    config = tiny_config(
        saved, tmp_path / "run", "model.pipeline=qwenimage", "sampling.height=16", "sampling.width=16",
        "algorithm.name=flow_grpo",
    )  # fmt: skip
    train(config)
    first = load_state(tmp_path / "run" / "checkpoints" / "step-000001", "trainable")
    trained = load_state(latest_checkpoint(tmp_path / "run" / "checkpoints"), "trainable")
    assert trained and all(not torch.equal(first[name], trained[name]) for name in trained)
    fresh = QwenImagePipeline.from_pretrained(saved)
    fresh.load_lora_weights(str(latest_checkpoint(tmp_path / "run" / "checkpoints") / "lora"))
    assert any("lora" in name for name, _ in fresh.transformer.named_parameters())

"""Model-backed rewards on tiny models built in the test: a tiny open_clip CLIP fitted to tell red from blue
squares, a tiny aesthetic MLP in safetensors, a tiny transformers CLIPModel for PickScore."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flowalign.rewards.models import aesthetic_score, clip_pixels, clip_score, load_aesthetic_mlp, pickscore

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def colour_batch(colours, size=24):
    """Solid squares on a grey background: [B, 3, size, size] in [0, 1]."""
    images = torch.full((len(colours), 3, size, size), 0.5)
    for i, colour in enumerate(colours):
        images[i, :, 4:-4, 4:-4] = torch.tensor({"red": [0.9, 0.1, 0.1], "blue": [0.1, 0.1, 0.9]}[colour]).view(3, 1, 1)
    return images


@pytest.fixture(scope="module")
def fitted_clip(tmp_path_factory):
    """A tiny open_clip model fitted contrastively on 'a red square' / 'a blue square'; saved as safetensors."""
    import open_clip

    directory = tmp_path_factory.mktemp("open_clip")
    (directory / "tiny-clip.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(directory / "tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip", pretrained=None)
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    colours = ["red", "blue"] * 4
    pixels = clip_pixels(colour_batch(colours), 32)
    tokens = tokenizer([f"a {c} square" for c in colours])
    for _ in range(60):
        image, text = F.normalize(model.encode_image(pixels), dim=-1), F.normalize(model.encode_text(tokens), dim=-1)
        logits = 10 * image @ text.T  # [8, 8]; same-colour pairs are positives
        target = torch.tensor([[float(a == b) for b in colours] for a in colours])
        loss = F.cross_entropy(logits, target / target.sum(1, keepdim=True))
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    path = directory / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_clip_score_ranks_matching_captions_higher(fitted_clip):
    reward = clip_score(model_name="tiny-clip", pretrained=fitted_clip, batch_size=3)
    images = colour_batch(["red", "blue", "red", "blue"])
    matched = reward(images, ["a red square", "a blue square", "a red square", "a blue square"], [{}] * 4)
    swapped = reward(images, ["a blue square", "a red square", "a blue square", "a red square"], [{}] * 4)
    assert matched.shape == (4,) and (matched > swapped).all()
    assert ((matched >= -1) & (matched <= 1)).all()


def test_aesthetic_score_is_the_mlp_of_the_clip_embedding(fitted_clip, tmp_path):
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    save_file(
        {
            "layers.0.weight": mlp[0].weight,
            "layers.0.bias": mlp[0].bias,
            "layers.2.weight": mlp[2].weight,
            "layers.2.bias": mlp[2].bias,
        },
        str(tmp_path / "mlp.safetensors"),
    )
    reward = aesthetic_score(str(tmp_path / "mlp.safetensors"), model_name="tiny-clip", pretrained=fitted_clip)
    images = colour_batch(["red", "blue"])
    scores = reward(images, ["x", "y"], [{}, {}])
    import open_clip

    model = open_clip.create_model("tiny-clip", pretrained=fitted_clip).eval()
    with torch.no_grad():
        expected = mlp(F.normalize(model.encode_image(clip_pixels(images, 32)), dim=-1)).squeeze(-1)
    torch.testing.assert_close(scores, expected)
    with pytest.raises(ValueError, match="no 'layers.N.weight'"):
        save_file({"w": torch.ones(1)}, str(tmp_path / "bad.safetensors"))
        load_aesthetic_mlp(str(tmp_path / "bad.safetensors"))


def test_pickscore_equals_the_models_own_logits(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    from flowalign.toy import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8))
    model.save_pretrained(tmp_path / "pick")
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(tmp_path / "pick")
    reward = pickscore(str(tmp_path / "pick"))
    images, prompts = colour_batch(["red", "blue"]), ["the digit one", "the digit two"]
    scores = reward(images, prompts, [{}, {}])
    with torch.no_grad():  # independent path: the model's forward, whose logits_per_image = scale * cos
        inputs = tokenizer(prompts, padding=True, return_tensors="pt")
        pixels = clip_pixels(images, 16, processor.image_processor.image_mean, processor.image_processor.image_std)
        logits = model(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, pixel_values=pixels
        ).logits_per_image
    torch.testing.assert_close(scores, logits.diagonal())

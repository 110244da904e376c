"""Default rewards: digit-classifier probability and DDPO's JPEG (in)compressibility."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from flowalign import toy
from flowalign.rewards import (
    digit_classifier_reward,
    jpeg_compressibility,
    jpeg_incompressibility,
    jpeg_size_kb,
    make_reward,
)


def random_images(b, seed=0, size=16):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def classifier_dir(tmp_path):
    torch.manual_seed(0)
    model = toy.DigitClassifier().eval()
    toy.save_digit_classifier(model, tmp_path / "digit_classifier")
    return tmp_path, model


def test_digit_reward_is_softmax_probability_of_named_digit(classifier_dir):
    root, model = classifier_dir
    images = random_images(3)
    prompts = ["the digit seven", "handwritten 2", "a photo of the digit zero"]
    with torch.no_grad():
        probs = torch.softmax(model(images.mean(dim=1, keepdim=True)), dim=-1)  # [3, 10], gray by hand
    expected = torch.stack([probs[0, 7], probs[1, 2], probs[2, 0]])
    # The pipeline dir (holding digit_classifier/) and the classifier dir itself both work.
    assert_close(digit_classifier_reward(str(root))(images, prompts, [{}] * 3), expected)
    assert_close(digit_classifier_reward(str(root / "digit_classifier"))(images, prompts, [{}] * 3), expected)


def test_digit_reward_sums_to_one_over_digits(classifier_dir):
    # The 10 rewards of one image, prompted with each digit in turn, are its softmax: sum 1.
    reward = digit_classifier_reward(str(classifier_dir[0]))
    image = random_images(1, seed=1).expand(10, -1, -1, -1)
    total = reward(image, [f"the digit {w}" for w in toy.DIGIT_WORDS], [{}] * 10).sum()
    assert_close(total, torch.tensor(1.0))


def test_digit_reward_errors_and_lazy_loading(classifier_dir):
    reward = digit_classifier_reward("/nonexistent/flowalign-classifier")  # nothing loaded yet
    with pytest.raises(ValueError, match="no digit classifier"):
        reward(random_images(1), ["the digit one"], [{}])
    reward = digit_classifier_reward(str(classifier_dir[0]))
    with pytest.raises(ValueError, match="'a cat on a mat'"):
        reward(random_images(1), ["a cat on a mat"], [{}])
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(random_images(2), ["the digit one"], [{}])


def test_digit_in_prompt():
    assert toy.digit_in_prompt("the digit seven") == 7
    assert toy.digit_in_prompt("Handwritten 3") == 3
    assert toy.digit_in_prompt("seven, i.e. 7") == 7  # the same digit twice is fine
    with pytest.raises(ValueError, match="several digits"):
        toy.digit_in_prompt("the digit 1 or two")
    with pytest.raises(ValueError, match="no digit"):
        toy.digit_in_prompt("someone")  # "one" inside a word is not a digit


def reference_jpeg_kb(image: torch.Tensor, quality: int) -> float:
    """Independent path: numpy uint8 HWC -> PIL -> JPEG bytes -> kB."""
    array = np.clip(np.rint(image.permute(1, 2, 0).numpy() * 255), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


def test_jpeg_rewards_match_pil_sizes():
    images = torch.cat([torch.full((1, 3, 32, 32), 0.5), random_images(1, seed=2, size=32)])
    expected = torch.tensor([reference_jpeg_kb(img, 80) for img in images])
    assert_close(jpeg_size_kb(images, 80), expected)
    assert_close(jpeg_incompressibility(80)(images, ["a", "b"], [{}, {}]), expected)
    assert_close(jpeg_compressibility(80)(images, ["a", "b"], [{}, {}]), -expected)
    # Uniform gray compresses far better than noise.
    compress = make_reward("jpeg_compressibility")(images, ["a", "b"], [{}, {}])
    assert compress[0] > compress[1]


def test_make_reward_rejects_unknown_names():
    with pytest.raises(ValueError, match="jpeg_compressibility"):
        make_reward("aesthetic")


def test_shipped_classifier_is_accurate_on_heldout_digits():
    model = toy.load_digit_classifier(toy.SHIPPED_DIR / "digit_classifier")
    images, labels = toy.load_digit_images()
    _, heldout = toy.digit_split(len(images))
    assert toy.classifier_accuracy(model, images[heldout], labels[heldout]) > 0.95

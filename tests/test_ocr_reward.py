"""The OCR reward (flowalign.rewards.ocr): target extraction, the Flow-GRPO similarity on hand-worked strings,
and RapidOCR on 512-pixel images rendered with PIL (offline: the wheel ships its ONNX models)."""

import numpy as np
import pytest
import torch

from flowalign.rewards import ocr
from flowalign.rewards.plugins import RewardError, call_reward, load_reward

NO_EXTRA = "the ocr extra is not installed: pip install -c constraints.txt -e '.[ocr]'"


def render(text: str, size: int = 512) -> torch.Tensor:
    """Black text centred on a white size x size image: [3, H, W] in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text(
        (size // 2, size // 2), text, fill="black", anchor="mm", font=ImageFont.load_default(size=64)
    )  # Pillow's bundled font: no system fonts needed
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def reward():
    pytest.importorskip("rapidocr_onnxruntime", exc_type=ImportError, reason=NO_EXTRA)  # also: cv2 without libGL
    return ocr.ocr_reward(num_threads=1)  # one thread: the test machine's cores are shared


def test_quoted_text_is_the_first_quoted_span():
    assert ocr.quoted_text('a sign that says "Hello World" in red') == "Hello World"
    assert ocr.quoted_text('a mug with "tea" and "cake"') == "tea"
    assert ocr.quoted_text("a poster that reads “OPEN”") == "OPEN"
    assert ocr.quoted_text("a plain sign") is None


def test_similarity_on_hand_worked_strings():
    pytest.importorskip("rapidfuzz", reason=NO_EXTRA)
    assert ocr.text_similarity("Hello World", "helloworld") == 1.0  # spaces removed, lower-cased
    assert ocr.text_similarity("helo", "hello") == pytest.approx(1 - 1 / 5)  # one deletion over 5 characters
    assert ocr.text_similarity("sitting", "kitten") == pytest.approx(1 - 3 / 6)  # 2 substitutions + 1 insertion
    assert ocr.text_similarity("xyzw", "ab") == 0.0  # distance 4 > len 2: clipped at 0
    assert ocr.text_similarity("", "abc") == 0.0  # nothing read
    assert ocr.text_similarity("SALE today only", "sale") == 1.0  # target inside the read text: Flow-GRPO's rule
    with pytest.raises(ValueError, match="empty"):
        ocr.text_similarity("abc", "  ")


def test_rendered_text_scores(reward):
    images = torch.stack([render("harbor"), render("pizza"), render("")])  # [3, 3, 512, 512]
    prompt = 'a neon sign that says "harbor"'
    scores = reward(images, [prompt] * 3, [{}] * 3)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert scores[0] >= 0.9, scores  # the exact text
    assert scores[1] < scores[0] and scores[1] < 0.5, scores  # other text
    assert scores[2] == 0.0  # a blank image: nothing read


def test_batch_equals_one_image_at_a_time(reward):
    images = torch.stack([render("Hello World"), render("coffee"), render("tiger")])  # [3, 3, 512, 512]
    prompts = ['a sign that says "hello world"', 'a mug with "coffee" printed on it', 'a shirt with "tigers"']
    batch = reward(images, prompts, [{}] * 3)
    alone = torch.cat([reward(images[i : i + 1], prompts[i : i + 1], [{}]) for i in range(3)])
    assert torch.equal(batch, alone)
    assert batch[2] == pytest.approx(1 - 1 / 6)  # "tiger" read for the target "tigers": one character missing


def test_a_prompt_without_quotes_stops_naming_the_reward(reward):
    with pytest.raises(RewardError) as info:
        call_reward("flowalign.rewards.ocr:ocr_reward", reward, torch.ones(1, 3, 64, 64), ["a sign"], [{}])
    assert "reward 'flowalign.rewards.ocr:ocr_reward' raised ValueError: prompt 'a sign' quotes no text" in str(
        info.value
    )


def test_loads_by_import_path_and_names_a_missing_extra(monkeypatch):
    pytest.importorskip("rapidocr_onnxruntime", exc_type=ImportError, reason=NO_EXTRA)  # also: cv2 without libGL
    assert callable(load_reward("flowalign.rewards.ocr:ocr_reward", {"num_threads": 1}))
    monkeypatch.setitem(ocr.EXTRA_PACKAGES, "no_such_module_for_ocr", "no-such-package")
    with pytest.raises(RewardError, match=r"needs \['no-such-package'\]: install the ocr extra"):
        load_reward("flowalign.rewards.ocr:ocr_reward")

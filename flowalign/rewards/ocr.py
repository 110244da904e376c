"""OCR reward: how closely the text read from each image matches the text its prompt quotes.

    reward.weights: {flowalign.rewards.ocr:ocr_reward: 1.0}
    prompts such as: a neon sign that says "harbor"       (python -m flowalign.prompts ocr --n 1000)

The scoring follows Flow-GRPO's OCR task (Liu et al., 2025, "Flow-GRPO: Training Flow Matching Models via
Online RL", arXiv:2505.05470, its visual text rendering task; the official flow_grpo/ocr.py):
  target      = the text between the first pair of double quotes of the prompt
  t, r        = target and recognised text (all detected lines joined), spaces removed, lower-cased
  reward      = 1                                          if t is a substring of r
              = 1 - min(Levenshtein(r, t), len(t)) / len(t)  otherwise     (in [0, 1]: clipped at 0)
Departures from the official code, and why:
  - the OCR model is RapidOCR (PP-OCRv4 detection and recognition as ONNX models, shipped inside the
    `rapidocr-onnxruntime` wheel, so it runs offline on the CPU) instead of PaddleOCR (Paddle framework,
    models downloaded at first use). Like PaddleOCR's default, lines read with confidence < min_confidence
    (0.5) are dropped;
  - an OCR failure raises (the run stops naming the reward) instead of scoring 0: a broken reader would
    otherwise look like a policy that writes nothing;
  - a prompt without quoted text raises instead of an IndexError; curly quotes (“...”) count as quotes.

Needs the `ocr` extra: `pip install -c constraints.txt -e ".[ocr]"` (rapidocr-onnxruntime, rapidfuzz).
"""

from __future__ import annotations

import importlib.util
import re
import torch

from shared.reward_calls import ImageRewardFn

QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')  # straight or curly double quotes; the first pair wins
EXTRA_PACKAGES = {"rapidocr_onnxruntime": "rapidocr-onnxruntime", "rapidfuzz": "rapidfuzz"}  # module -> distribution


def quoted_text(prompt: str) -> str | None:
    """The text inside the prompt's first pair of double quotes, or None when there is none."""
    match = QUOTED.search(prompt)
    return None if match is None else next(group for group in match.groups() if group is not None)


def _normalised(text: str) -> str:
    return "".join(text.split()).lower()  # Flow-GRPO removes spaces and lower-cases both sides


def text_similarity(recognised: str, target: str) -> float:
    """1 - (edit distance / target length), clipped at 0; 1 when the target appears inside the recognised
    text (Flow-GRPO's rule: extra text the OCR also reads is not penalised). Both normalised first."""
    from rapidfuzz.distance import Levenshtein

    recognised, target = _normalised(recognised), _normalised(target)
    if not target:
        raise ValueError("the quoted target text is empty; quote at least one non-space character")
    if target in recognised:
        return 1.0
    return 1.0 - min(Levenshtein.distance(recognised, target), len(target)) / len(target)


def to_bgr_uint8(images: torch.Tensor) -> list:
    """[B, 3, H, W] in [0, 1] -> B arrays [H, W, 3] uint8 in BGR order (RapidOCR reads arrays as OpenCV does)."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # [B, 3, H, W]
    return [array[..., ::-1].copy() for array in pixels.permute(0, 2, 3, 1).cpu().numpy()]  # [H, W, 3] each


def ocr_reward(min_confidence: float = 0.5, num_threads: int | None = None) -> ImageRewardFn:
    """The OCR reward (module docstring): one score in [0, 1] per image of the batch.

    min_confidence: lines the recogniser reads with lower confidence are ignored (RapidOCR's text_score).
    num_threads: onnxruntime threads per model (None: onnxruntime's default, every core).
    RapidOCR reads the batch one image at a time; the text lines found in one image are recognised together."""
    missing = [package for module, package in EXTRA_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(
            f'the OCR reward needs {missing}: install the ocr extra, pip install -c constraints.txt -e ".[ocr]"'
        )
    if not 0 <= min_confidence < 1:
        raise ValueError(f"min_confidence {min_confidence} is outside [0, 1); RapidOCR's default is 0.5")
    state: dict = {}

    def engine():
        if "ocr" not in state:
            from rapidocr_onnxruntime import RapidOCR

            threads = -1 if num_threads is None else num_threads  # -1: onnxruntime picks
            state["ocr"] = RapidOCR(
                text_score=min_confidence, intra_op_num_threads=threads, inter_op_num_threads=threads
            )
        return state["ocr"]

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images; pass one prompt per image")
        targets = [quoted_text(prompt) for prompt in prompts]  # checked before any image is read
        for prompt, target in zip(prompts, targets):
            if target is None:
                raise ValueError(
                    f"prompt {prompt!r} quotes no text; the OCR reward scores the text inside double "
                    f"quotes, e.g. 'a sign that says \"open\"'"
                )
        scores = []
        for array, target in zip(to_bgr_uint8(images), targets):
            lines, _ = engine()(array)  # None when no text is found; else [box, text, confidence] per line
            recognised = "".join(line[1] for line in lines or [])
            scores.append(text_similarity(recognised, target))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)  # [B]

    return reward

"""A vision-language model as the judge: any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API) scores
each image, or says which of two images is better (the comparator of a pairwise win-rate reward).

    reward:
      weights: {flowalign.rewards.judge:vlm_judge: 1.0}
      kwargs:
        flowalign.rewards.judge:vlm_judge:
          model: Qwen/Qwen2.5-VL-7B-Instruct      # the served model's name
          base_url: http://127.0.0.1:8000/v1      # POST {base_url}/chat/completions
          api_key_env: JUDGE_API_KEY              # the environment variable holding the key (optional)

Each request is POST {base_url}/chat/completions with the JSON body {"model": ..., "messages": [{"role": "user",
"content": [{"type": "text", "text": TEMPLATE.format(prompt=...)}, {"type": "image_url", "image_url": {"url":
"data:image/png;base64,..."}}]}], "max_tokens": ..., "temperature": ...}: the image as a lossless PNG of
round(255 * x), in a data URL. The answer's `choices[0].message.content` is read: `vlm_judge` takes the first
number there (`score_pattern`) in [score_min, score_max] and returns (n - score_min) / (score_max - score_min) in
[0, 1]; `vlm_pairwise_judge` shows two images (A first, B second) and takes the first standalone capital A or B,
A: P(a > b) = 1, B: 0, and ranks each group by win rates (shared.pairwise, as flowalign.rewards.pairwise does).

Failures. A request is re-sent (`retries` times, after backoff_s * 2**attempt seconds) when it may succeed on a
second try: the connection failed or dropped, no answer within `timeout_s` (each socket operation: connect, each
read), or the answer is 5xx, 408 or 429. When the tries run out, or the answer is malformed (not JSON, no
`choices[0].message.content`, no number, a number out of range, neither A nor B), that image (or pair) gets no
score, None, and one line on stderr per reward call says how many got none and why. None is the reward's bad score:
the run stops naming the reward (exit 3), or under reward.on_bad_score=drop the samples are dropped and counted
and the run goes on. Another 4xx (a wrong model name, a refused key) cannot be fixed by waiting: it raises, and
the run stops naming the reward, whatever on_bad_score says. Requests run on a fixed pool of `max_concurrent`
threads, so at most that many are in flight per judge. The API key is read from the environment variable named
by `api_key_env` when the judge is built, sent as `Authorization: Bearer ...`, and never printed.

Only the standard library (urllib, json, base64, concurrent.futures) and Pillow (PNG) are used.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import math
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from shared.pairwise import PAIRINGS, check_options, group_win_rates
from shared.reward_calls import ImageRewardFn, groupwise

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"  # vLLM's `vllm serve` default port, OpenAI path prefix
SCORE_TEMPLATE = (
    'How well does this image match the text prompt "{prompt}", and how good is it? '
    "Answer with one number from 0 (not at all) to 10 (perfectly)."
)
PAIR_TEMPLATE = (
    'Two images were generated for the text prompt "{prompt}": image A is shown first, image B second. '
    "Which image matches the prompt better and looks better? Answer with one letter: A or B."
)
RETRIED_STATUS = (408, 429)  # and every 5xx: a busy or restarting server may answer a second try
SHOWN_CHARS = 60  # of a malformed answer, in its one-line message


class JudgeError(RuntimeError):
    """The endpoint refused a request in a way a retry cannot fix (4xx other than 408/429): the run stops."""


class AnswerError(ValueError):
    """An answer the judge cannot read a score from; the message names what was wrong."""


class NoAnswer(RuntimeError):
    """No usable HTTP answer after every try (connection failed, timed out, 5xx); the message says which."""


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    """What one judge sends and how it waits (the factories' keyword arguments; see the module docstring)."""

    model: str
    base_url: str = DEFAULT_BASE_URL
    template: str = SCORE_TEMPLATE
    api_key_env: str | None = None
    score_min: float = 0.0
    score_max: float = 10.0
    score_pattern: str = r"-?\d+(?:\.\d+)?"
    timeout_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.5
    max_concurrent: int = 4
    max_tokens: int = 32
    temperature: float = 0.0

    def __post_init__(self):
        problems = [
            (not isinstance(self.model, str) or not self.model, "model", "give the served model's name"),
            ("{prompt}" not in self.template, "template", "must contain {prompt}, where the text prompt goes"),
            (not self.score_max > self.score_min, "score_max", "must be above score_min"),
            (not self.timeout_s > 0, "timeout_s", "must be > 0 seconds"),
            (not (isinstance(self.retries, int) and self.retries >= 0), "retries", "must be a whole number >= 0"),
            (not self.backoff_s >= 0, "backoff_s", "must be >= 0 seconds"),
            (
                not (isinstance(self.max_concurrent, int) and self.max_concurrent >= 1),
                "max_concurrent",
                "must be a whole number >= 1",
            ),
        ]
        for bad, field, fix in problems:
            if bad:
                raise ValueError(f"{field} {getattr(self, field)!r}: {fix}")
        try:
            re.compile(self.score_pattern)
        except re.error as error:
            raise ValueError(f"score_pattern {self.score_pattern!r} is not a regular expression ({error})") from None
        try:
            self.template.format(prompt="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"template {self.template!r}: only {{prompt}} may stand in braces ({type(error).__name__}: {error}); "
                "write a literal brace as {{ or }}"
            ) from None


def image_data_url(image: torch.Tensor) -> str:
    """One image [3, H, W] in [0, 1] as a PNG data URL of round(255 * x) (lossless: the pixels arrive exactly)."""
    from PIL import Image

    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # [3, H, W]
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _shown(text: str) -> str:
    return repr(text[:SHOWN_CHARS] + "..." if len(text) > SHOWN_CHARS else text)


def answer_text(body: bytes) -> str:
    """The answer's choices[0].message.content; AnswerError naming what is missing or malformed."""
    try:
        answer = json.loads(body)
    except ValueError:
        raise AnswerError(f"answer is not JSON ({_shown(body.decode('utf-8', 'replace'))})") from None
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise AnswerError(f"answer has no choices[0].message.content ({_shown(json.dumps(answer))})") from None
    if not isinstance(content, str):
        raise AnswerError(f"answer's choices[0].message.content is a {type(content).__name__}, not text")
    return content


def parse_score(text: str, pattern: str, low: float, high: float) -> float:
    """The first match of `pattern` in `text` (its first group, if it has one) as a number in [low, high], scaled
    to [0, 1]; AnswerError when there is none or it lies outside."""
    found = re.search(pattern, text)
    if found is None:
        raise AnswerError(f"no score in the answer {_shown(text)}")
    matched = found.group(1) if found.groups() and found.group(1) is not None else found.group(0)
    try:
        number = float(matched)
    except ValueError:
        raise AnswerError(
            f"score_pattern matched {_shown(matched)}, not a number, in the answer {_shown(text)}"
        ) from None
    if not (math.isfinite(number) and low <= number <= high):
        raise AnswerError(f"score {number:g} outside {low:g}-{high:g} in the answer {_shown(text)}")
    return (number - low) / (high - low)


def parse_choice(text: str) -> float:
    """P(a > b) from an answer naming image A or B: the first standalone capital A or B; AnswerError for neither."""
    found = re.search(r"\b([AB])\b", text)
    if found is None:
        raise AnswerError(f"the answer names neither A nor B: {_shown(text)}")
    return 1.0 if found.group(1) == "A" else 0.0


class JudgeClient:
    """Requests to one endpoint, with retries, a timeout per request and a fixed pool of `max_concurrent` threads."""

    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        self.endpoint = settings.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env, "")
            if not key:
                raise ValueError(
                    f"api_key_env: the environment variable {settings.api_key_env!r} is not set or empty; "
                    "export the endpoint's key there, or leave api_key_env out for an endpoint without one"
                )
            self.headers["Authorization"] = f"Bearer {key}"
        self.pool = ThreadPoolExecutor(settings.max_concurrent, thread_name_prefix="vlm-judge")
        self.name = f"judge {settings.model!r} at {self.endpoint}"

    def ask(self, prompt: str, images: list[torch.Tensor]) -> str:
        """The answer text to the template (with `prompt`) and `images`; NoAnswer, AnswerError or JudgeError."""
        s = self.settings
        content = [{"type": "text", "text": s.template.format(prompt=prompt)}]
        content += [{"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in images]
        body = {
            "model": s.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
        }
        request = urllib.request.Request(
            self.endpoint, data=json.dumps(body).encode(), method="POST", headers=self.headers
        )
        return answer_text(self._send(request))

    def _send(self, request: urllib.request.Request) -> bytes:
        """The answer's body, trying up to 1 + retries times; the last failure's reason in NoAnswer."""
        s, reason = self.settings, ""
        for attempt in range(s.retries + 1):
            if attempt:
                time.sleep(s.backoff_s * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=s.timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as error:
                if error.code < 500 and error.code not in RETRIED_STATUS:
                    raise JudgeError(
                        f"{self.name} answered {error.code} {error.reason}: {_shown(_error_body(error))}; "
                        "check model, base_url and the key in api_key_env"
                    ) from None
                reason = f"answered {error.code} {error.reason}"
            except (TimeoutError, socket.timeout):
                reason = f"no answer within timeout_s={s.timeout_s:g} s"
            except urllib.error.URLError as error:  # connecting failed; a timeout while connecting lands here too
                timed_out = isinstance(error.reason, (TimeoutError, socket.timeout))
                reason = (
                    f"no answer within timeout_s={s.timeout_s:g} s" if timed_out else f"unreachable ({error.reason})"
                )
            except (ConnectionError, http.client.HTTPException) as error:  # dropped before a whole answer
                reason = f"connection dropped ({type(error).__name__})"
        raise NoAnswer(f"{reason}, {s.retries + 1} tries")

    def warn(self, failures: list[tuple[str, Exception]], total: int, unit: str) -> None:
        """One line on stderr for a reward call whose items got no score: how many, and the first reasons."""
        shown = "; ".join(f"{where}: {error}" for where, error in failures[:3])
        more = f"; {len(failures) - 3} more" if len(failures) > 3 else ""
        print(
            f"warning: {self.name}: {len(failures)} of {total} {unit} got no score ({shown}{more})",
            file=sys.stderr,
            flush=True,
        )


def _error_body(error: urllib.error.HTTPError) -> str:
    try:
        return error.read().decode("utf-8", "replace")
    except OSError:
        return ""


def vlm_judge(model: str, **settings) -> ImageRewardFn:
    """A reward fn(images [B, 3, H, W], prompts, metadata) -> [B] scores in [0, 1] (None where the judge gave none)
    from an OpenAI-compatible endpoint; keyword arguments as `JudgeSettings` (base_url, template, api_key_env,
    score_min, score_max, score_pattern, timeout_s, retries, backoff_s, max_concurrent, max_tokens, temperature)."""
    client = JudgeClient(JudgeSettings(model, **settings))
    s = client.settings

    def score_one(image: torch.Tensor, prompt: str) -> float:
        return parse_score(client.ask(prompt, [image]), s.score_pattern, s.score_min, s.score_max)

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> list[float | None]:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images; pass one prompt per image")
        futures = [client.pool.submit(score_one, image, prompt) for image, prompt in zip(images, prompts)]
        scores, failures = [], []
        for index, future in enumerate(futures):
            try:
                scores.append(future.result())
            except (NoAnswer, AnswerError) as error:  # a JudgeError (or a bug) raises: the run stops
                scores.append(None)
                failures.append((f"image {index}", error))
        if failures:
            client.warn(failures, len(prompts), "images")
        return scores

    return reward


def vlm_pairwise_judge(
    model: str, pairing: str = "unordered", failed_pair: str = "drop", template: str = PAIR_TEMPLATE, **settings
) -> ImageRewardFn:
    """A groupwise reward fn(images [K, 3, H, W], prompt, metadata) -> each image's win rate in its group, each
    pair judged by the endpoint ("which is better, A or B?": A shown first) and ranked by shared.pairwise's
    `group_win_rates` (pairing, failed_pair as there); the comparisons of a group run on the judge's pool of
    max_concurrent threads. Other keyword arguments as `vlm_judge`; score_* are not used."""
    check_options(pairing, failed_pair)
    client = JudgeClient(JudgeSettings(model, template=template, **settings))

    def reward(images: torch.Tensor, prompt: str, metadata: list[dict]) -> list[float | None]:
        failures: list[tuple[str, Exception]] = []  # appended from the pool's threads (list.append is atomic)

        def compare(i: int, j: int) -> float | None:
            try:
                return parse_choice(client.ask(prompt, [images[i], images[j]]))
            except (NoAnswer, AnswerError) as error:
                failures.append((f"pair ({i}, {j})", error))
                return None

        rates = group_win_rates(compare, len(images), pairing, failed_pair, client.pool)
        if failures:
            client.warn(sorted(failures, key=lambda item: item[0]), len(PAIRINGS[pairing](len(images))), "pairs")
        return rates

    return groupwise(reward)

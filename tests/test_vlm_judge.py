"""The VLM judge (flowalign.rewards.judge) against a stub OpenAI-compatible server on 127.0.0.1 (port 0, a thread)
that returns canned chat answers: scores parsed and scaled, the image really sent, retries on timeouts and 5xx,
one line for each kind of malformed answer, the concurrency bound, the pairwise mode's win rates, the key never
printed, and a flow run under reward.on_bad_score=drop that goes on past the judge's failures."""

import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign.rewards.judge import JudgeError, vlm_judge, vlm_pairwise_judge
from flowalign.rewards.plugins import RewardError, call_reward, load_reward
from tests.test_train_smoke import tiny_config, tiny_pipeline_dir  # noqa: F401  (fixture)

SECRET = "sk-test-never-printed-7f3a"
FAST = {"timeout_s": 0.2, "retries": 1, "backoff_s": 0.01}


def chat(content) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
    }


def decoded_images(body: dict) -> list[np.ndarray]:
    """The PNG images of a request's message, decoded: [H, W, 3] uint8 each."""
    images = []
    for part in body["messages"][0]["content"]:
        if part["type"] == "image_url":
            header, data = part["image_url"]["url"].split(",", 1)
            assert header == "data:image/png;base64"
            images.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")))
    return images


class Stub:
    """An OpenAI-style chat server: `answer(body, n)` -> (status, payload: dict | bytes, delay_s) for request n.
    It records every request (headers, body, decoded images) and the most requests it held at once."""

    def __init__(self, answer):
        self.answer, self.requests, self.active, self.peak = answer, [], 0, 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    n = len(stub.requests)
                    stub.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    stub.active += 1
                    stub.peak = max(stub.peak, stub.active)
                try:
                    status, payload, delay = stub.answer(body, n)
                    time.sleep(delay)
                    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with stub.lock:
                        stub.active -= 1

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that stopped waiting (the timeout tests): nothing to report

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def start(answer):
        servers.append(Stub(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def brightness_score(body, n):
    """Answers 'Score: v/10' with v = round(10 * the image's first pixel / 255)."""
    (image,) = decoded_images(body)
    return 200, chat(f"Score: {round(10 * int(image[0, 0, 0]) / 255)}/10"), 0.0


def flat(values) -> torch.Tensor:
    """Images [B, 3, 4, 6] each of one grey level."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 6).contiguous()


def test_scores_are_parsed_scaled_and_the_request_is_openai_shaped(stub, monkeypatch, capsys):
    server = stub(brightness_score)
    monkeypatch.setenv("JUDGE_KEY", SECRET)
    reward = load_reward(
        "flowalign.rewards.judge:vlm_judge",
        {"model": "tiny-vl", "base_url": server.base_url, "api_key_env": "JUDGE_KEY", "template": "Rate: {prompt}"},
    )
    scores = call_reward("judge", reward, flat([0.0, 0.3, 1.0]), ["a cat", "a dog", "a cow"], [{}] * 3)
    assert scores.tolist() == pytest.approx([0.0, 0.3, 1.0])  # 0/10, 3/10, 10/10
    assert len(server.requests) == 3
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
    body = request["body"]
    assert body["model"] == "tiny-vl" and body["temperature"] == 0.0 and body["max_tokens"] == 32
    assert body["messages"][0]["role"] == "user"
    texts = sorted(
        part["text"] for r in server.requests for part in r["body"]["messages"][0]["content"] if part["type"] == "text"
    )
    assert texts == ["Rate: a cat", "Rate: a cow", "Rate: a dog"]
    assert SECRET not in capsys.readouterr().err + capsys.readouterr().out


def test_the_image_is_sent_pixel_for_pixel(stub):
    server = stub(brightness_score)
    image = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(0))  # H 5, W 7: not square
    vlm_judge("m", base_url=server.base_url)(image, ["p"], [{}])
    (sent,) = decoded_images(server.requests[0]["body"])
    assert sent.shape == (5, 7, 3)
    expected = (image[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # [H, W, 3]
    assert np.array_equal(sent, expected)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_timeout_is_retried_then_the_image_gets_no_score_in_one_line(stub, capsys):
    server = stub(lambda body, n: (200, chat("7"), 0.6))  # answers after the client's 0.2 s
    reward = vlm_judge("m", base_url=server.base_url, **FAST)
    started = time.perf_counter()
    assert reward(flat([0.5]), ["p"], [{}]) == [None]
    assert time.perf_counter() - started < 1.0  # 2 tries of 0.2 s, not the stub's 0.6 s
    assert len(server.requests) == 2  # 1 + retries
    line = _one_line(capsys)
    assert line.startswith("warning: judge 'm' at http://127.0.0.1:")
    assert "1 of 1 images got no score (image 0: no answer within timeout_s=0.2 s, 2 tries)" in line
    # the reward-fault path: None is a bad score, dropped under on_bad_score=drop, else the run stops naming it
    assert call_reward("judge", reward, flat([0.5]), ["p"], [{}], allow_nonfinite=True).isnan().all()
    with pytest.raises(RewardError, match="reward 'judge' returned non-finite scores at positions \\[0\\]"):
        call_reward("judge", reward, flat([0.5]), ["p"], [{}])


def test_5xx_answers_are_retried_until_one_succeeds(stub, capsys):
    statuses = [503, 500]
    server = stub(lambda body, n: (statuses[n], {"error": "busy"}, 0.0) if n < 2 else (200, chat("8 out of 10"), 0.0))
    assert vlm_judge("m", base_url=server.base_url, **{**FAST, "retries": 2})(flat([0.5]), ["p"], [{}]) == [0.8]
    assert len(server.requests) == 3 and capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"<html>bad gateway</html>", "answer is not JSON ('<html>bad gateway</html>')"),
        ({"choices": []}, "answer has no choices[0].message.content"),
        ({"object": "chat.completion"}, "answer has no choices[0].message.content"),
        (chat(None), "answer's choices[0].message.content is a NoneType, not text"),
        (chat("A lovely picture."), "no score in the answer 'A lovely picture.'"),
        (chat("12"), "score 12 outside 0-10 in the answer '12'"),
        (chat("Score: -1"), "score -1 outside 0-10"),
    ],
)
def test_each_malformed_answer_is_one_line_naming_what_was_wrong(stub, capsys, payload, message):
    server = stub(lambda body, n: (200, payload, 0.0))
    assert vlm_judge("m", base_url=server.base_url, **FAST)(flat([0.5]), ["p"], [{}]) == [None]
    assert message in _one_line(capsys)
    assert len(server.requests) == 1  # an answer is not re-asked


def test_a_refused_request_stops_the_run_naming_the_judge_without_the_key(stub, monkeypatch, capsys):
    server = stub(lambda body, n: (404, {"error": {"message": "model 'nope' does not exist"}}, 0.0))
    monkeypatch.setenv("JUDGE_KEY", SECRET)
    reward = vlm_judge("nope", base_url=server.base_url, api_key_env="JUDGE_KEY", **FAST)
    with pytest.raises(JudgeError, match="answered 404 Not Found: .*does not exist.*check model, base_url"):
        reward(flat([0.5]), ["p"], [{}])
    with pytest.raises(RewardError, match="reward 'judge' raised JudgeError: judge 'nope'") as info:
        call_reward("judge", reward, flat([0.5]), ["p"], [{}], allow_nonfinite=True)  # even under drop
    assert len(server.requests) == 2  # never retried
    assert SECRET not in str(info.value) + capsys.readouterr().err


def test_bad_settings_and_a_missing_key_are_one_line_at_load(monkeypatch):
    monkeypatch.delenv("JUDGE_KEY_UNSET", raising=False)
    with pytest.raises(RewardError, match="api_key_env: the environment variable 'JUDGE_KEY_UNSET' is not set"):
        load_reward("flowalign.rewards.judge:vlm_judge", {"model": "m", "api_key_env": "JUDGE_KEY_UNSET"})
    with pytest.raises(RewardError, match="timeout_s 0: must be > 0 seconds"):
        load_reward("flowalign.rewards.judge:vlm_judge", {"model": "m", "timeout_s": 0})
    with pytest.raises(RewardError, match="template 'Rate it': must contain \\{prompt\\}"):
        load_reward("flowalign.rewards.judge:vlm_judge", {"model": "m", "template": "Rate it"})
    with pytest.raises(RewardError, match="template 'Rate \\{prompt\\} on \\{scale\\}': only \\{prompt\\} may stand"):
        load_reward("flowalign.rewards.judge:vlm_judge", {"model": "m", "template": "Rate {prompt} on {scale}"})
    with pytest.raises(RewardError, match="calling it with reward.kwargs .* failed"):
        load_reward("flowalign.rewards.judge:vlm_judge", {"model": "m", "temprature": 0.5})


def test_concurrency_never_exceeds_max_concurrent(stub):
    server = stub(lambda body, n: (200, chat("5"), 0.15))
    reward = vlm_judge("m", base_url=server.base_url, max_concurrent=2, timeout_s=2.0)
    assert reward(flat([0.5] * 6), ["p"] * 6, [{}] * 6) == [0.5] * 6
    assert server.peak == 2  # the pool's two threads were both busy, never a third
    server.peak = 0
    pairwise = vlm_pairwise_judge("m", base_url=server.base_url, max_concurrent=3, timeout_s=2.0)
    stub_answer = server.answer
    server.answer = lambda body, n: (200, chat("A"), 0.15)
    assert len(pairwise(flat([0.1, 0.2, 0.3, 0.4]), "p", [{}] * 4)) == 4  # 6 pairs
    assert server.peak == 3 and len(server.requests) == 12
    server.answer = stub_answer


def brighter_wins(body, n):
    """Answers A when the first image shown is brighter than the second, else B."""
    first, second = decoded_images(body)
    return 200, chat("B" if second.mean() > first.mean() else "A"), 0.0


def test_pairwise_mode_gives_the_hand_computed_win_rates(stub):
    server = stub(brighter_wins)
    images = flat([0.2, 0.8, 0.5])
    # 1 beats 0 and 2 -> 1; 2 beats 0 -> 1/2; 0 -> 0
    reward = vlm_pairwise_judge("m", base_url=server.base_url, **FAST)
    assert reward(images, "p", [{}] * 3) == [0.0, 1.0, 0.5]
    assert len(server.requests) == 3  # K (K - 1) / 2
    both = vlm_pairwise_judge("m", base_url=server.base_url, pairing="both_orders", **FAST)
    assert both(images, "p", [{}] * 3) == [0.0, 1.0, 0.5] and len(server.requests) == 3 + 6


def test_pairwise_position_bias_cancels_with_both_orders(stub):
    server = stub(lambda body, n: (200, chat("Image A is better."), 0.0))  # always the first shown
    images = flat([0.2, 0.8, 0.5])
    # unordered asks (0, 1), (0, 2), (1, 2): 0 wins both, 1 wins once -> 1, 1/2, 0
    assert vlm_pairwise_judge("m", base_url=server.base_url, **FAST)(images, "p", [{}] * 3) == [1.0, 0.5, 0.0]
    # both orders: every pair is (1 + 1 - 1) / 2 = 1/2
    both = vlm_pairwise_judge("m", base_url=server.base_url, pairing="both_orders", **FAST)
    assert both(images, "p", [{}] * 3) == [0.5, 0.5, 0.5]


def test_a_pairwise_answer_naming_neither_drops_that_pair_in_one_line(stub, capsys):
    def answer(body, n):
        first, second = decoded_images(body)
        if {round(first.mean()), round(second.mean())} == {51, 128}:  # the pair of images 0 and 2
            return 200, chat("Both are lovely."), 0.0
        return brighter_wins(body, n)

    server = stub(answer)
    rates = vlm_pairwise_judge("m", base_url=server.base_url, **FAST)(flat([0.2, 0.8, 0.5]), "p", [{}] * 3)
    assert rates == [None, 1.0, None]  # members 0 and 2 have no score; 1 beat both
    assert "1 of 3 pairs got no score (pair (0, 2): the answer names neither A nor B: 'Both are lovely.')" in _one_line(
        capsys
    )
    tie = vlm_pairwise_judge("m", base_url=server.base_url, failed_pair="tie", **FAST)(
        flat([0.2, 0.8, 0.5]), "p", [{}] * 3
    )
    assert tie == [0.25, 1.0, 0.25]  # 0 and 2 tie: (0 + 1/2) / 2 each
    assert len(server.requests) == 6


def test_a_flow_run_goes_on_past_the_judges_failures_under_drop(stub, tiny_pipeline_dir, tmp_path, capsys):  # noqa: F811
    from flowalign.train import train

    def answer(body, n):  # every third request gets an answer with no number
        (image,) = decoded_images(body)
        return 200, chat("no idea" if n % 3 == 2 else f"{10 * image.mean() / 255:.3f}"), 0.0

    server = stub(answer)
    name = "flowalign.rewards.judge:vlm_judge"
    out = tmp_path / "run"
    train(
        tiny_config(
            tiny_pipeline_dir,
            out,
            "reward.on_bad_score=drop",
            f"reward.weights={{{name}: 1.0}}",
            f"reward.kwargs={{{name}: {{model: m, base_url: '{server.base_url}', max_concurrent: 1, timeout_s: 2}}}}",
        )
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert all(r["reward/dropped"] >= 1 for r in records[1:])  # 4 requests per iteration: one at least malformed
    assert all(0 < r[f"reward/{name}/mean"] < 1 for r in records[1:])  # the others scored, in [0, 1]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: judge 'm'" in line]
    assert warnings and all(
        re.search(r"got no score \(image \d+: no score in the answer 'no idea'", w) for w in warnings
    )
    assert (out / "checkpoints" / "step-000002").is_dir()


def test_the_answer_parsers_by_hand():
    from flowalign.rewards.judge import AnswerError, parse_choice, parse_score

    default = r"-?\d+(?:\.\d+)?"
    assert parse_score("7.5", default, 0, 10) == 0.75 and parse_score("Score: 3/10", default, 0, 10) == 0.3
    assert parse_score("4", default, 1, 5) == 0.75  # (4 - 1) / (5 - 1)
    # a pattern with a group reads the group: the final score, not the first number of the reasoning
    assert parse_score("Image 1 shows a 3. Final score: 8", r"score:\s*(\d+)", 0, 10) == 0.8
    assert parse_choice("Image B is better than image A.") == 0.0 and parse_choice("A") == 1.0
    with pytest.raises(AnswerError, match="names neither A nor B: 'a cat'"):
        parse_choice("a cat")  # a lower-case article is not an answer

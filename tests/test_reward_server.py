"""The reward server: remote scores equal local ones; bad requests are refused with the right code."""

import json
import socket
import urllib.error
import urllib.request

import pytest
import torch

from flowalign.rewards.server import remote_reward, serve
from flowalign.rewards import jpeg_compressibility

TOKEN = "test-token"


@pytest.fixture
def server():
    """A jpeg_compressibility server on a free local port; yields its URL and shuts it down."""
    srv, thread = serve(jpeg_compressibility(), "127.0.0.1", 0, token=TOKEN, max_request_bytes=2**20, max_batch=8)
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _batch():
    generator = torch.Generator().manual_seed(0)
    noisy = torch.rand(2, 3, 16, 16, generator=generator)  # [2, 3, 16, 16]
    flat = torch.full((2, 3, 16, 16), 0.5)  # [2, 3, 16, 16]
    images = torch.cat([noisy, flat])  # [4, 3, 16, 16]
    return images, ["a", "b", "c", "d"], [{"i": i} for i in range(4)]


def _post(url, body: bytes, token=TOKEN):
    request = urllib.request.Request(url + "/score", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_remote_scores_equal_local(server):
    images, prompts, metadata = _batch()
    local = jpeg_compressibility()(images, prompts, metadata)  # [4]
    remote = remote_reward(server, TOKEN, timeout=5)(images, prompts, metadata)  # [4]
    assert remote.dtype == torch.float32 and remote.shape == (4,)
    assert torch.equal(remote, local)
    # the noisy images compress worse than the flat ones: the ordering survives the trip
    assert remote[:2].max() < remote[2:].min()


def test_health(server):
    with urllib.request.urlopen(server + "/health", timeout=5) as response:
        assert json.loads(response.read()) == {"ok": True}


def test_wrong_token_is_401(server):
    images, prompts, metadata = _batch()
    with pytest.raises(RuntimeError, match="401.*token"):
        remote_reward(server, "wrong", timeout=5)(images, prompts, metadata)
    status, body = _post(server, b"{}", token="")
    assert status == 401 and "token" in body["error"]


def test_oversized_body_is_413(server):
    # 4 images of 3 x 256 x 256 float32 = 3 MiB raw > max_request_bytes = 1 MiB
    images = torch.zeros(4, 3, 256, 256)  # [4, 3, 256, 256]
    with pytest.raises(RuntimeError, match="413.*max_request_bytes"):
        remote_reward(server, TOKEN, timeout=5)(images, list("abcd"), [{}] * 4)


def test_batch_over_max_batch_is_413(server):
    images = torch.zeros(9, 3, 2, 2)  # [9, 3, 2, 2]; max_batch = 8
    with pytest.raises(RuntimeError, match="413.*max_batch"):
        remote_reward(server, TOKEN, timeout=5)(images, list("abcdefghi"), [{}] * 9)


def test_malformed_requests_are_400(server):
    status, body = _post(server, b"{not json")
    assert status == 400 and "JSON" in body["error"]
    good = {"images": "AAAAAA==", "shape": [1, 3, 1, 1], "prompts": ["a"], "metadata": [{}]}  # wrong byte count
    status, body = _post(server, json.dumps(good).encode())
    assert status == 400 and "'images'" in body["error"]
    status, body = _post(server, json.dumps({**good, "shape": [1, 4, 1, 1]}).encode())
    assert status == 400 and "'shape'" in body["error"]
    status, body = _post(server, json.dumps({**good, "prompts": ["a", "b"]}).encode())
    assert status == 400 and "'prompts'" in body["error"]
    del good["metadata"]
    status, body = _post(server, json.dumps(good).encode())
    assert status == 400 and "'metadata'" in body["error"]


def test_down_server_is_not_reachable():
    with socket.socket() as sock:  # bind a free port, then close it: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    reward = remote_reward(f"http://127.0.0.1:{port}", TOKEN, timeout=1, retries=1, backoff=0.01)
    with pytest.raises(RuntimeError, match="not reachable.*flowalign-reward-serve"):
        reward(torch.zeros(1, 3, 2, 2), ["a"], [{}])

"""Serve a reward over HTTP and call it from training as an ordinary reward callable.

A reward that needs its own process (a large scorer, another GPU, another environment) runs
behind a small JSON server; training uses `remote_reward(url, token)` like any local reward.

    # terminal 1: the scorer (prints the token when none is given)
    python -m flowalign.rewards.server --reward flowalign.rewards:jpeg_compressibility --port 8765
    # training side
    reward_fn = remote_reward("http://127.0.0.1:8765", token="...")
    scores = reward_fn(images, prompts, metadata)  # [B]

Wire format. POST /score with `Authorization: Bearer <token>` and the JSON body
{"images": base64(float32 little-endian bytes of images [B, 3, H, W]), "shape": [B, 3, H, W],
 "prompts": [str] * B, "metadata": [dict] * B} -> 200 {"scores": [float] * B}.
Float32 -> JSON number -> float32 is exact, so remote scores equal local ones bit for bit.
Errors come back as {"error": "..."}: 401 bad token, 413 body or batch too large, 400 malformed
request (the message names the field), 500 the reward raised. GET /health -> {"ok": true}.
Only the standard library and torch/numpy are used.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import os
import secrets
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import numpy as np
import torch

RewardFn = Callable[[torch.Tensor, list, list], torch.Tensor]
DISCARD_LIMIT = 256 * 2**20  # refused bodies up to this size are read and dropped so the client sees the answer
SERVE_HINT = "start it with flowalign-reward-serve (python -m flowalign.rewards.server --reward module:name --port PORT)"


class BadRequest(ValueError):
    """A request the server refuses; `status` is the HTTP code to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def encode_batch(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict:
    """The JSON body for POST /score: images as base64 of float32 little-endian bytes."""
    array = images.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)  # [B, 3, H, W]
    return {"images": base64.b64encode(array.tobytes()).decode("ascii"), "shape": list(array.shape),
            "prompts": list(prompts), "metadata": list(metadata)}


def decode_batch(body: dict, max_batch: int) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Check and decode a /score body; raises BadRequest naming the bad field."""
    if not isinstance(body, dict):
        raise BadRequest(400, f"body must be a JSON object, got {type(body).__name__}")
    for field in ("images", "shape", "prompts", "metadata"):
        if field not in body:
            raise BadRequest(400, f"missing field '{field}'; send images, shape, prompts, metadata")
    shape = body["shape"]
    if (not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(s, int) and s > 0 for s in shape)
            or shape[1] != 3):
        raise BadRequest(400, f"field 'shape' must be [B, 3, H, W] of positive ints, got {shape!r}")
    if shape[0] > max_batch:
        raise BadRequest(413, f"field 'shape': batch {shape[0]} exceeds max_batch {max_batch}; send smaller batches")
    prompts, metadata = body["prompts"], body["metadata"]
    if not isinstance(prompts, list) or len(prompts) != shape[0] or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(400, f"field 'prompts' must be a list of {shape[0]} strings")
    if not isinstance(metadata, list) or len(metadata) != shape[0] or not all(isinstance(m, dict) for m in metadata):
        raise BadRequest(400, f"field 'metadata' must be a list of {shape[0]} objects")
    if not isinstance(body["images"], str):
        raise BadRequest(400, "field 'images' must be a base64 string of float32 little-endian bytes")
    try:
        raw = base64.b64decode(body["images"], validate=True)
    except ValueError as error:
        raise BadRequest(400, f"field 'images' is not valid base64 ({error})") from None
    expected = 4 * int(np.prod(shape))
    if len(raw) != expected:
        raise BadRequest(400, f"field 'images' holds {len(raw)} bytes; shape {shape} needs {expected} (float32)")
    images = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape))  # [B, 3, H, W]
    return images, prompts, metadata


def _make_handler(reward_fn: RewardFn, token: str, max_request_bytes: int, max_batch: int,
                  lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 60  # seconds a stalled client may hold a connection

        def _discard_body(self) -> None:
            """Read and drop a refused body in 64 KiB chunks (never held whole), so the client,
            still sending, gets our answer instead of a broken pipe. Past DISCARD_LIMIT we hang up."""
            self.close_connection = True
            try:
                left = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                return
            if left > DISCARD_LIMIT:
                return
            while left > 0:
                chunk = self.rfile.read(min(left, 2**16))
                if not chunk:
                    return
                left -= len(chunk)

        def log_message(self, format, *args):  # quiet: training logs are the place for progress
            pass

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self._reply(200, {"ok": True})
            else:
                self._reply(404, {"error": f"no route GET {self.path}; use GET /health or POST /score"})

        def do_POST(self):
            if self.path != "/score":
                return self._reply(404, {"error": f"no route POST {self.path}; use POST /score"})
            given = self.headers.get("Authorization", "")
            # compare_digest: the time taken does not reveal how much of the token matched
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                self._discard_body()
                return self._reply(401, {"error": "missing or wrong token; send 'Authorization: Bearer <token>'"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                return self._reply(400, {"error": "header 'Content-Length' is missing or not an integer"})
            if length > max_request_bytes:
                self._discard_body()  # checked before reading: the body is never stored
                return self._reply(413, {"error": f"body of {length} bytes exceeds max_request_bytes "
                                                  f"{max_request_bytes}; send smaller batches"})
            try:
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError as error:
                    raise BadRequest(400, f"body is not valid JSON ({error})") from None
                images, prompts, metadata = decode_batch(body, max_batch)
            except BadRequest as error:
                return self._reply(error.status, {"error": str(error)})
            try:
                with lock:  # one batch at a time: the reward model is not assumed thread-safe
                    scores = torch.as_tensor(reward_fn(images, prompts, metadata), dtype=torch.float32)
                scores = scores.detach().flatten().cpu()  # [B]
            except Exception as error:
                return self._reply(500, {"error": f"reward raised {type(error).__name__}: {error}"})
            self._reply(200, {"scores": scores.tolist()})

    return Handler


def serve(reward_fn: RewardFn, host: str = "127.0.0.1", port: int = 0, *, token: str,
          max_request_bytes: int = 32 * 2**20, max_batch: int = 256) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start the reward server in a background thread; returns (server, thread).
    The bound port is server.server_address[1] (port=0 picks a free one). Stop with
    server.shutdown(); server.server_close()."""
    if not token:
        raise ValueError("token is empty; pass token=secrets.token_urlsafe() and give the same token to remote_reward")
    handler = _make_handler(reward_fn, token, max_request_bytes, max_batch, threading.Lock())
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="reward-server", daemon=True)
    thread.start()
    return server, thread


def remote_reward(url: str, token: str, timeout: float = 30.0, retries: int = 2, backoff: float = 0.5) -> RewardFn:
    """A reward that POSTs each batch to the server at `url` and returns its scores [B].
    Unreachable servers are retried `retries` times, waiting backoff * 2**attempt seconds;
    4xx answers are not retried (resending the same request cannot fix them)."""
    endpoint = url.rstrip("/") + "/score"

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        data = json.dumps(encode_batch(images, prompts, metadata)).encode()
        request = urllib.request.Request(endpoint, data=data, method="POST", headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        last_error: Exception | None = None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    scores = json.loads(response.read())["scores"]
                return torch.tensor(scores, dtype=torch.float32, device=images.device)  # [B]
            except urllib.error.HTTPError as error:
                try:
                    message = json.loads(error.read()).get("error", "")
                except (ValueError, AttributeError, OSError):
                    message = error.reason
                if error.code == 401:
                    raise RuntimeError(f"reward server at {url} answered 401: {message} "
                                       "(check the token given to remote_reward)") from None
                if 400 <= error.code < 500:
                    raise RuntimeError(f"reward server at {url} answered {error.code}: {message}") from None
                if error.code == 500:  # the reward itself raised: retrying the same batch will not help
                    raise RuntimeError(f"reward server at {url} answered 500: {message}") from None
                last_error = error  # 502/503/504: a proxy or a restarting server may recover
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as error:
                last_error = error
        raise RuntimeError(f"reward server at {url} is not reachable ({last_error}) after {retries + 1} tries; "
                           f"{SERVE_HINT}")

    return reward


def main(argv: list[str] | None = None) -> None:
    """CLI: load a reward by import path and serve it until interrupted."""
    parser = argparse.ArgumentParser(prog="flowalign-reward-serve", description=__doc__.split("\n")[0])
    parser.add_argument("--reward", required=True, help="import path 'module:name', e.g. flowalign.rewards:jpeg_compressibility")
    parser.add_argument("--kwargs", default="{}", help="JSON object of factory kwargs, e.g. '{\"quality\": 80}'")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 127.0.0.1 keeps it local")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default=os.environ.get("FLOWALIGN_REWARD_TOKEN"),
                        help="bearer token (default: $FLOWALIGN_REWARD_TOKEN, else a new random one is printed)")
    parser.add_argument("--max-request-bytes", type=int, default=32 * 2**20)
    parser.add_argument("--max-batch", type=int, default=256)
    args = parser.parse_args(argv)

    from flowalign.rewards.plugins import load_reward

    try:
        kwargs = json.loads(args.kwargs)
    except ValueError as error:
        parser.error(f"--kwargs is not valid JSON ({error}); pass e.g. '{{\"quality\": 80}}'")
    reward_fn = load_reward(args.reward, kwargs or None)
    token = args.token or secrets.token_urlsafe(24)
    if not args.token:
        print(f"token (give it to remote_reward or set FLOWALIGN_REWARD_TOKEN): {token}", flush=True)
    server, thread = serve(reward_fn, args.host, args.port, token=token,
                           max_request_bytes=args.max_request_bytes, max_batch=args.max_batch)
    host, port = server.server_address[:2]
    print(f"serving {args.reward} at http://{host}:{port}/score", flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])

"""The embedded toy models' shipped copies: where they are, what they hold, and when to build instead.

Both front ends ship their toy (`flowalign/embedded/digits-sd3-v1`, `llmalign/embedded/arith-qwen2-v3`): a few
MB of safetensors, tokenizers and configs written by the project's own `toy build`, so a first run loads them
instead of pretraining for minutes. `directory_digest` names a build: docs/results.md and each toy module carry the
digest of what is shipped, and a test checks both against the files. A shipped copy whose digest differs (edited
files, a partial checkout) is not used: the toy is built into the cache instead, as before shipping.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch

BUILD_THREADS = 1
"""Toy builds run on one torch thread: a CPU matmul's summation order can follow the thread count, and the
build must give the same bytes (the same digest) on every machine of a kind."""


def directory_digest(path: str | os.PathLike) -> str:
    """sha256 over every file under `path`: its relative POSIX path and the sha256 of its bytes, in sorted
    order. Hidden files and __pycache__ are left out."""
    root = Path(path)
    lines = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        lines.append(f"{rel.as_posix()}\0{hashlib.sha256(file.read_bytes()).hexdigest()}\n")
    return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()


def shipped_or_none(shipped: Path, expected_digest: str, is_complete) -> Path | None:
    """`shipped` when it holds a complete build whose digest is `expected_digest`; else None (with one line
    saying why, when files are there but differ)."""
    if not is_complete(shipped):
        return None
    found = directory_digest(shipped)
    if found != expected_digest:
        print(f"warning: the shipped toy in {shipped} has digest {found}, expected {expected_digest}; building instead")
        return None
    return shipped


@contextlib.contextmanager
def build_threads():
    """Run a toy build on BUILD_THREADS torch threads (see there), restoring the caller's count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)

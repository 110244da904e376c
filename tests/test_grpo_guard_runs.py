"""MixGRPO with GRPO-Guard on the embedded digits pipeline: 1 process trains like 2, a SIGKILLed run resumes
bit-identically, and guard changes the training (the option is live). Tiny config (tests/test_flow_distributed.py)."""

from __future__ import annotations

import time

import pytest
import torch

from tests.multiproc import kill_at_checkpoint
from tests.test_flow_distributed import (  # noqa: F401  (digits is a fixture)
    PROBE,
    TINY,
    assert_same_training,
    digits,
    final_weights,
    flow_run,
    records,
)
from shared.checkpoint import latest_checkpoint

GUARD = ["algorithm.name=mixgrpo", "algorithm.window_size=2", "algorithm.guard=true"]


@pytest.fixture(scope="module")
def guard_runs(digits, tmp_path_factory):  # noqa: F811
    """Guard (before_ratio) on 1 and 2 processes, and the same 1-process run without guard."""
    root = tmp_path_factory.mktemp("guard")
    started = time.perf_counter()
    for processes in (1, 2):
        flow_run(processes, digits, root / f"p{processes}", *GUARD)
    flow_run(1, digits, root / "plain", *GUARD[:-1])
    return {"root": root, "seconds": time.perf_counter() - started}


@pytest.mark.timeout(300)
def test_guard_on_two_processes_trains_like_one(guard_runs):
    assert_same_training(guard_runs["root"] / "p1", guard_runs["root"] / "p2")


@pytest.mark.timeout(300)
def test_guard_changes_the_update(guard_runs):
    """Same rollouts at iteration 1 (same weights), different losses and, after it, different weights."""
    guard, plain = records(guard_runs["root"] / "p1"), records(guard_runs["root"] / "plain")
    assert guard[1]["reward/total/mean"] == plain[1]["reward/total/mean"]  # iteration 1 samples before any update
    assert guard[1]["train/loss"] != pytest.approx(plain[1]["train/loss"], rel=1e-3)
    g, p = final_weights(guard_runs["root"] / "p1"), final_weights(guard_runs["root"] / "plain")
    assert any(not torch.allclose(g[name], p[name], rtol=1e-3, atol=0) for name in g)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("order", ["before_ratio", "after_ratio"])
def test_guard_run_killed_then_resumed_is_bit_identical(digits, guard_runs, tmp_path, order):  # noqa: F811
    """SIGKILL after checkpoint 1 of 3, then --resume: the weights equal an uninterrupted run's bit for bit."""
    extra = [*GUARD, f"algorithm.guard_average={order}"]
    straight = guard_runs["root"] / "p1"
    if order == "after_ratio":
        straight = tmp_path / "straight"
        flow_run(1, digits, straight, *extra)
    out = tmp_path / "killed"
    probe = tmp_path / "killed-probe"
    args = [
        "flowalign/train.py",
        *TINY,
        f"model.path={digits}",
        f"reward.weights={{flowalign.rewards:digit_classifier_reward: 1.0, {PROBE}: 0.0}}",
        f"reward.kwargs={{flowalign.rewards:digit_classifier_reward: {{path: {digits}}}, "
        f"{PROBE}: {{directory: {probe}}}}}",
        f"log.output_dir={out}",
        *extra,
    ]
    kill_at_checkpoint(1, args, out / "checkpoints", at_least=1)
    assert latest_checkpoint(out / "checkpoints").name < "step-000003"
    flow_run(1, digits, out, *extra, resume=True)
    expected, resumed = final_weights(straight), final_weights(out)
    assert latest_checkpoint(out / "checkpoints").name == "step-000003"
    assert resumed.keys() == expected.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name

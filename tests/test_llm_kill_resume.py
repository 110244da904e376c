"""`llmalign grpo` killed with SIGKILL resumes from its last checkpoint with --resume and ends with
weights bit-identical to an uninterrupted run (CPU, one thread on both sides)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmalign.cli import main
from shared.checkpoint import latest_checkpoint, load_state
from tests.test_llm_grpo import overrides, tiny_lm_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
EXTRA = ["train.iterations=5", "train.num_iterations=2", "algorithm.beta=0.05", "log.keep_last=2"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_lm_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("straight")
    torch.set_num_threads(1)
    main(["grpo", *overrides(tiny_lm_dir, out, *EXTRA)])
    return load_state(latest_checkpoint(out / "checkpoints"), "trainable")


@pytest.mark.parametrize("kill_after_checkpoint, extra_wait", [(1, 0.0), (2, 0.05), (3, 0.0)])
def test_sigkill_then_resume_is_bit_identical(tiny_lm_dir, uninterrupted, tmp_path,  # noqa: F811
                                              kill_after_checkpoint, extra_wait):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "llmalign", "grpo", *overrides(tiny_lm_dir, out, *EXTRA)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"step-{kill_after_checkpoint:06d}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        checkpoint = latest_checkpoint(out / "checkpoints")
        if checkpoint is not None and checkpoint.name >= target:
            break
        time.sleep(0.01)
    time.sleep(extra_wait)  # sometimes kill in the middle of the next iteration or checkpoint write
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert latest_checkpoint(out / "checkpoints").name >= target

    torch.set_num_threads(1)
    main(["grpo", *overrides(tiny_lm_dir, out, *EXTRA), "--resume"])
    resumed = load_state(latest_checkpoint(out / "checkpoints"), "trainable")
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name

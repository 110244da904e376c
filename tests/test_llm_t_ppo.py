"""algorithm.name t_ppo (llmalign/t_ppo.py) on a tiny Qwen2 built in the test: responses in flight carry over and
the critic trains on finished ones only; with W = max_new_tokens an iteration is ppo's on the same samples, bit for
bit; 1 process equals 2; SIGKILL with responses in flight then --resume is bit-identical; bad input exits 2."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from llmalign.cli import main
from llmalign.config import GRPOConfig
from llmalign.grpo import ALGORITHMS
from llmalign.rollout import IterationRollout, RefillPlan, RoundSample, score
from shared.checkpoint import latest_checkpoint, load_state
from shared.config import load_config
from shared.run import Run
from tests.multiproc import REPO, run_processes
from tests.test_llm_grpo import overrides as grpo_overrides
from tests.test_llm_grpo import tiny_lm_dir  # noqa: F401  (fixture)

PROMPTS = 4


def overrides(model_dir, out_dir, *extra):
    return grpo_overrides(
        model_dir,
        out_dir,
        "algorithm.name=t_ppo",
        "algorithm.window_tokens=5",  # max_new_tokens 12: up to 3 windows per response
        "algorithm.loss=dapo",
        "algorithm.mask_truncated=false",
        "train.group_size=1",
        f"train.prompts_per_iteration={PROMPTS}",
        "memory.micro_batch_size=2",
        "critic.learning_rate=1e-2",
        *extra,
    )


def records_of(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_responses_carry_over_and_the_critic_trains_on_finished_ones_only(tiny_lm_dir, tmp_path):
    torch.set_num_threads(1)
    main(["grpo", *overrides(tiny_lm_dir, tmp_path / "run", "train.iterations=3", "log.keep_last=5")])
    records = records_of(tmp_path / "run")[1:]
    # the tiny model seldom says EOS: 12 tokens in windows of 5 finish at the 3rd window
    assert [r["train/in_flight"] for r in records[:2]] == [PROMPTS, PROMPTS]
    assert [r["train/carried_in"] for r in records] == [0, PROMPTS, PROMPTS]
    assert records[2]["train/finished"] == PROMPTS and records[2]["train/in_flight"] == 0
    for r in records:  # no finished response, no critic step: its gradient is 0
        assert (r["train/value_grad_norm"] == 0.0) == (r["train/finished"] == 0)
    state = load_state(tmp_path / "run" / "checkpoints" / "step-000001", "t_ppo")
    assert [len(tokens) for _, _, tokens in state["inflight"]] == [5] * PROMPTS and state["drawn"] == PROMPTS


def test_window_of_max_new_tokens_is_ppo_on_the_same_samples(tiny_lm_dir, tmp_path):
    """One iteration of t_ppo with W = max_new_tokens (every response finishes, EGAE = GAE) and one of ppo on the
    rollout t_ppo sampled: the same advantages, and the same policy and critic afterwards, bit for bit."""
    torch.set_num_threads(1)
    recipes, runs = {}, {}
    for name in ("t_ppo", "ppo"):
        window = "algorithm.window_tokens=12" if name == "t_ppo" else "algorithm.window_tokens=null"
        config = load_config(
            GRPOConfig, None, overrides(tiny_lm_dir, tmp_path / name, window, f"algorithm.name={name}")
        )
        recipes[name], runs[name] = ALGORITHMS[name](config), Run(tmp_path / name, resume=False, tag="[test]")
        recipes[name].setup(runs[name])
    t, p = recipes["t_ppo"], recipes["ppo"]
    windows = t.advantage(t.rollout(0))
    assert bool(windows.finished.all()) and windows.carried == 0
    rows = [p.grpo.train_rows[r.row] for r in windows.responses]
    columns = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    scores = score(p.grpo.rewards, [row["_text"] for row in rows], windows.rollout, columns, 1, 0, 12, False)
    plan = RefillPlan([(0, i) for i in range(PROMPTS)], PROMPTS, 0, PROMPTS, 0)
    batch = RoundSample(rows, range(PROMPTS), windows.rollout, scores)
    timings = {"time/rollout": 0.0, "time/reward": 0.0}
    sampled = IterationRollout(0, batch, [1] * PROMPTS, 1, plan, 0, timings, {}, {})
    ppo_batch = p.advantage(sampled)
    assert torch.equal(ppo_batch.trained.advantages, windows.advantages)
    assert float(windows.advantages.abs().max()) > 0
    t.update(windows)
    p.update(ppo_batch)
    for a, b in ((t.grpo.model, p.grpo.model), (t.critic.model, p.critic.model)):
        for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(x, y), name
    assert not t.inflight
    for run in runs.values():
        run.close()


@pytest.mark.timeout(400)
def test_two_processes_equal_one(tiny_lm_dir, tmp_path):
    args = overrides(tiny_lm_dir, tmp_path / "one", "train.iterations=3", "log.eval_every=0", "log.keep_last=5")
    one = run_processes(1, ["-m", "llmalign", "grpo", *args], timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    args = overrides(tiny_lm_dir, tmp_path / "two", "train.iterations=3", "log.eval_every=0", "log.keep_last=5")
    two = run_processes(2, ["-m", "llmalign", "grpo", *args], timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "over 2 process(es)" in two.stdout + two.stderr
    for step in ("step-000001", "step-000003"):
        a = load_state(tmp_path / "one" / "checkpoints" / step, "t_ppo")
        b = load_state(tmp_path / "two" / "checkpoints" / step, "t_ppo")
        assert a == b, step  # the same responses in flight, token for token
    for name in ("trainable", "critic"):
        a = load_state(latest_checkpoint(tmp_path / "one" / "checkpoints"), name)
        b = load_state(latest_checkpoint(tmp_path / "two" / "checkpoints"), name)
        for key in a:
            assert_close(b[key], a[key], atol=1e-5, rtol=1e-5, msg=f"{name}: {key}")
    losses = [[r.get("train/value_loss") for r in records_of(tmp_path / w)] for w in ("one", "two")]
    assert losses[0][1:] == pytest.approx(losses[1][1:], rel=1e-4, abs=1e-6)


def test_sigkill_with_responses_in_flight_then_resume_is_bit_identical(tiny_lm_dir, tmp_path):
    torch.set_num_threads(1)
    extra = ("train.iterations=4", "log.eval_every=0")
    main(["grpo", *overrides(tiny_lm_dir, tmp_path / "straight", *extra)])
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "llmalign", "grpo", *overrides(tiny_lm_dir, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        checkpoint = latest_checkpoint(out / "checkpoints")
        if checkpoint is not None and checkpoint.name >= "step-000001":
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = latest_checkpoint(out / "checkpoints")
    assert load_state(killed_at, "t_ppo")["inflight"], "responses in flight at the kill"
    main(["grpo", *overrides(tiny_lm_dir, out, *extra), "--resume"])
    for name in ("trainable", "critic", "critic_optimizer", "t_ppo"):
        straight = load_state(latest_checkpoint(tmp_path / "straight" / "checkpoints"), name)
        resumed = load_state(latest_checkpoint(out / "checkpoints"), name)
        if name in ("trainable", "critic"):
            assert straight.keys() == resumed.keys()
            for key in straight:
                assert torch.equal(straight[key], resumed[key]), (name, key)
        elif name == "t_ppo":
            assert straight == resumed
    a, b = records_of(tmp_path / "straight"), records_of(out)
    assert [r["iteration"] for r in b] == [0, 1, 2, 3, 4]
    assert [r.get("train/value_loss") for r in a] == [r.get("train/value_loss") for r in b]


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.window_tokens=13", "algorithm.window_tokens"),  # above max_new_tokens=12
        ("train.group_size=2", "train.group_size"),
        ("algorithm.window_tokens=0", "algorithm.window_tokens"),
        ("algorithm.rollout_correction=tis", "algorithm.rollout_correction"),
    ],
)
def test_bad_config_exits_2_with_one_line(tiny_lm_dir, tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", *overrides(tiny_lm_dir, tmp_path, override)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_dry_run_refuses_a_window_above_max_new_tokens(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "llm" / "arith_t_ppo.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", "--config", config, "--dry-run", "algorithm.window_tokens=81"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "config error: config field 'algorithm.window_tokens': 81 is above sampling.max_new_tokens=80; use at most "
        "80 (a window never outgrows a response)\n"
    )

"""Multi-turn environments and `algorithm.name: gigpo | episode_grpo` (llmalign.environments, llmalign.gigpo):

- the step-row advantages of a hand-written set of episodes, worked out by hand (GiGPO Eqs. 3-8 with the penalty);
- the recipe's rollout and advantage stages on a tiny model and a scripted environment: each row's prompt is the
  observation and its completion the action alone (no environment token carries loss weight), and its per-token
  advantages equal an independent loop-by-loop computation of the formula;
- the embedded arith_chain environment by hand; bad environment output is one line, exit 2;
- 1 process == 2 processes; SIGKILL then --resume ends bit-identical.
"""

from __future__ import annotations

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
from shared.checkpoint import latest_checkpoint, load_state
from tests.test_llm_grpo import tiny_lm_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


class Mirror:
    """A scripted environment whose states repeat: the state is the action's length modulo 3, shown as
    "state k|"; two turns; reward 1 at the end when the state is 0; an action with a digit is invalid (the state
    stays). An untrained model's random bytes give every branch."""

    def reset(self, task: int) -> str:
        self.turn = 0
        return f"state {task % 3}|"

    def step(self, action: str):
        if any(ch.isdigit() for ch in action):
            return f"state {self.turn}|", 0.0, False, {"valid": False}
        self.turn += 1
        state = len(action) % 3
        done = self.turn == 2
        return f"state {state}|", float(done and state == 0), done, {"valid": True}


class BadReset:
    def reset(self, task):
        return 7

    def step(self, action):
        return "", 0.0, True


class BadStep:
    """step returns what the test's parameter says."""

    returned = None

    def __init__(self, returned="pair"):
        self.returned = {"pair": ("x", 1.0), "reward": ("x", "1", True), "done": ("x", 1.0, 1), "obs": (3, 1.0, True)}[
            returned
        ]

    def reset(self, task):
        return "start|"

    def step(self, action):
        return self.returned


def overrides(model_dir, out_dir, *extra):
    return [
        f"model.path={model_dir}",
        "algorithm.name=gigpo",
        "environment.name=tests.test_llm_gigpo:Mirror",
        "environment.max_turns=3",
        "environment.eval_tasks=2",
        "sampling.max_new_tokens=6",
        "train.iterations=2",
        "train.prompts_per_iteration=2",
        "train.group_size=3",
        "memory.micro_batch_size=4",
        "train.learning_rate=1e-2",
        f"log.output_dir={out_dir}",
        "log.checkpoint_every=1",
        *extra,
    ]


# ----------------------------------------------------------------------------- advantages by hand


def hand_steps():
    from llmalign.environments import StepRow

    return [  # group 0: trajectory 0 reaches the goal, trajectory 1 first answers invalidly and never does
        StepRow(0, 0, 0, "s0", 0.0, True, False),
        StepRow(0, 0, 1, "s1", 1.0, True, True),
        StepRow(0, 1, 0, "s0", 0.0, False, False),
        StepRow(0, 1, 1, "s0", 0.0, True, False),
        StepRow(0, 1, 2, "s2", 0.0, True, True),
        # group 1: one step each from the same state "s0" as group 0's, which it must not share a step group with
        StepRow(1, 2, 0, "s0", 1.0, True, True),
        StepRow(1, 3, 0, "s0", 0.0, True, True),
    ]


class Env:
    gamma, mode, episode_statistics, invalid_penalty = 0.5, "mean_norm", "rows", 0.1


def test_step_row_advantages_by_hand():
    """Group 0, gamma 0.5, penalty 0.1, omega 1, mean_norm, episode statistics over rows:
    episode scores R - 0.1 invalid: 1, 1, -0.1, 0, 0; mean 1.9 / 5 = 0.38 -> A^E 0.62, 0.62, -0.48, -0.38, -0.38.
    returns: trajectory 0: G_1 = 1, G_0 = 0.5 * 1 = 0.5; trajectory 1: 0, 0, 0, the invalid row -0.1.
    step group s0 (rows 0, 2, 3): mean (0.5 - 0.1 + 0) / 3 = 0.4/3 -> A^S 0.5 - 0.4/3, -0.1 - 0.4/3, -0.4/3;
    s1 and s2 hold one row each -> 0.
    Group 1: scores 1, 0 -> A^E 0.5, -0.5; one step group (same state, same group) of returns 1, 0 -> A^S 0.5, -0.5."""
    from llmalign.gigpo import step_row_advantages

    k = 0.4 / 3
    a_e = [0.62, 0.62, -0.48, -0.38, -0.38, 0.5, -0.5]
    a_s = [0.5 - k, 0.0, -0.1 - k, -k, 0.0, 0.5, -0.5]
    got = step_row_advantages(hand_steps(), Env, step_weight=1.0)
    assert_close(got, torch.tensor([e + s for e, s in zip(a_e, a_s)], dtype=torch.float64), atol=1e-12, rtol=0)
    assert abs(float(got[:5].sum())) < 1e-12  # both terms centre within their groups
    episode_only = step_row_advantages(hand_steps(), Env, step_weight=0.0)  # episode_grpo
    assert_close(episode_only, torch.tensor(a_e, dtype=torch.float64), atol=1e-12, rtol=0)


def reference_advantages(steps, gamma, penalty, omega):
    """The formula written out loop by loop (mean_norm, episode statistics over rows), independent of shared.gigpo."""
    totals = {}
    for s in steps:
        totals[s.traj] = totals.get(s.traj, 0.0) + s.reward
    scores = [totals[s.traj] - penalty * (not s.valid) for s in steps]
    returns = [0.0] * len(steps)
    for traj in totals:
        running = 0.0
        for i in reversed([i for i, s in enumerate(steps) if s.traj == traj]):
            running = steps[i].reward + gamma * running
            returns[i] = running
    returns = [g - penalty * (not s.valid) for g, s in zip(returns, steps)]

    def centred(values, key):
        out = []
        for i, s in enumerate(steps):
            members = [j for j, t in enumerate(steps) if key(t) == key(s)]
            out.append(values[i] - sum(values[j] for j in members) / len(members) if len(members) > 1 else 0.0)
        return out

    episode = centred(scores, lambda s: s.group)
    step = centred(returns, lambda s: (s.group, s.anchor))
    return [e + omega * g for e, g in zip(episode, step)]


def test_recipe_rows_hold_the_action_alone_and_carry_the_gigpo_advantage(tiny_lm_dir, tmp_path):  # noqa: F811
    from llmalign.config import GRPOConfig
    from llmalign.gigpo import gigpo_recipe
    from shared.config import load_config
    from shared.run import Run

    torch.set_num_threads(1)
    config = load_config(GRPOConfig, None, overrides(tiny_lm_dir, tmp_path / "run", "environment.gamma=0.9"))
    recipe = gigpo_recipe(config)
    recipe.setup(Run(tmp_path / "run", resume=False, tag="[test]"))
    trained = recipe.advantage(recipe.rollout(0))
    steps, rollout, tokenizer = trained.episodes.steps, trained.episodes.rollout, recipe.tokenizer
    assert len({s.anchor for s in steps}) < len(steps)  # states repeat: some step groups hold several rows
    assert any(not s.valid for s in steps) and any(s.reward > 0 for s in steps)  # every branch of Mirror taken
    for i, s in enumerate(steps):
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist()
        assert tokenizer.decode(prompt) == s.anchor  # the observation is the prompt: never in the loss
        length = int(rollout.completion_mask[i].sum())
        assert rollout.completion_mask[i, length:].sum() == 0  # the loss mask covers the action's tokens alone
        action = tokenizer.decode(rollout.completion_ids[i, :length].tolist(), skip_special_tokens=True)
        assert action == rollout.texts[i]
    expected = reference_advantages(steps, 0.9, 0.1, 1.0)
    width = rollout.completion_ids.shape[1]
    assert trained.advantages.shape == (len(steps), width)
    assert_close(trained.advantages, torch.tensor(expected)[:, None].expand(-1, width), atol=1e-6, rtol=0)
    assert any(abs(a) > 1e-3 for a in expected)


# ----------------------------------------------------------------------------- the environments


def test_arith_chain_by_hand():
    from llmalign.environments import ArithChain

    env = ArithChain(turns=2)
    first = env.reset(5)
    assert first.startswith("Compute ") and first.endswith(".\n")
    assert env.step("no answer") == (first, 0.0, False, {"valid": False})  # invalid: the state stays
    truth = env.truth
    middle, reward, done, info = env.step(f"<think></think><answer>{truth[0]}</answer>")
    assert (reward, done, info) == (0.0, False, {"valid": True})
    assert middle == f"Compute {truth[0]}{env.pairs[1]}.\n"
    assert eval(middle[len("Compute ") : -2]) == truth[1]  # the pairs compute the truth
    assert env.step(f"<answer>{truth[1]}</answer>")[1:3] == (1.0, True)
    env.reset(5)
    env.step(f"<answer>{truth[0] + 1}</answer>")  # a wrong total is carried on
    assert env.observation() == f"Compute {truth[0] + 1}{env.pairs[1]}.\n"
    assert env.step(f"<answer>{truth[1] + 1}</answer>")[1:3] == (0.0, True)


@pytest.mark.parametrize(
    "name, message",
    [
        ("tests.test_llm_gigpo:BadReset", "environment 'tests.test_llm_gigpo:BadReset': reset returned int 7; "),
        ("tests.test_llm_gigpo:BadStep", "step returned tuple ('x', 1.0); return (observation: str, reward: float"),
        ("tests.test_llm_gigpo:Missing", "config field 'environment.name': 'tests.test_llm_gigpo:Missing' does not"),
    ],
)
def test_bad_environment_is_one_line_exit_2(tiny_lm_dir, tmp_path, capsys, name, message):  # noqa: F811
    with pytest.raises(SystemExit) as stopped:
        main(["grpo", *overrides(tiny_lm_dir, tmp_path / "run", f"environment.name={name}")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after any progress bar of the weights' loading
    assert err.startswith("config error: ") and message in err, err


@pytest.mark.parametrize(
    "returned, problem",
    [
        ("reward", "reward '1', not a finite number"),
        ("done", "done 1, not a bool"),
        ("obs", "an observation of type int 3"),
    ],
)
def test_checked_step_names_what_is_wrong(returned, problem):
    from llmalign.environments import checked_step
    from shared.config import ConfigError

    with pytest.raises(ConfigError, match="^environment 'bad': step returned " + problem):
        checked_step("bad", BadStep(returned), "action")


# ----------------------------------------------------------------------------- runs


def test_one_process_equals_two(tiny_lm_dir, tmp_path):  # noqa: F811
    from tests.multiproc import run_processes

    finals, records = {}, {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        completed = run_processes(world, ["-m", "llmalign", "grpo", *overrides(tiny_lm_dir, out)], timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
        if world == 2:
            assert "over 2 process(es)" in completed.stdout + completed.stderr
        finals[world] = load_state(latest_checkpoint(out / "checkpoints"), "trainable")
        records[world] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for one, two in zip(records[1], records[2], strict=True):  # the same rollouts, statistics and evaluation
        for key in one:
            if key.startswith(("reward/", "env/", "eval/", "completion/")) or key in ("train/rows",):
                assert two[key] == pytest.approx(one[key], abs=1e-6), key
    assert records[1][-1]["train/rows"] > 2 * 3  # several turns per trajectory
    for name in finals[1]:
        assert_close(finals[2][name], finals[1][name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tiny_lm_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("straight")
    torch.set_num_threads(1)
    main(["grpo", *overrides(tiny_lm_dir, out, "train.iterations=4", "algorithm.kl_beta=0.05")])
    return load_state(latest_checkpoint(out / "checkpoints"), "trainable")


@pytest.mark.parametrize("kill_after_checkpoint", [1, 2])
def test_sigkill_then_resume_is_bit_identical(tiny_lm_dir, uninterrupted, tmp_path, kill_after_checkpoint):  # noqa: F811
    out = tmp_path / "killed"
    args = overrides(tiny_lm_dir, out, "train.iterations=4", "algorithm.kl_beta=0.05")
    command = [sys.executable, "-m", "llmalign", "grpo", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"step-{kill_after_checkpoint:06d}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        checkpoint = latest_checkpoint(out / "checkpoints")
        if checkpoint is not None and checkpoint.name >= target:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    torch.set_num_threads(1)
    main(["grpo", *args, "--resume"])
    resumed = load_state(latest_checkpoint(out / "checkpoints"), "trainable")
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_generated_token_budget_stops_the_run_and_resumes_counting(tiny_lm_dir, tmp_path):  # noqa: F811
    torch.set_num_threads(1)
    out = tmp_path / "budget"
    main(["grpo", *overrides(tiny_lm_dir, out, "train.iterations=4", "budget.max_generated_tokens=1")])
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/rows" in r]
    assert [r["iteration"] for r in records] == [1]  # the first iteration's tokens reach the budget of 1
    first = records[0]["train/generated_tokens"]
    assert records[0]["train/generated_tokens_total"] == first >= 1
    assert load_state(latest_checkpoint(out / "checkpoints"), "budget") == {"generated_tokens": first}
    main(
        [
            "grpo",
            *overrides(tiny_lm_dir, out, "train.iterations=4", f"budget.max_generated_tokens={first + 1}"),
            "--resume",
        ]
    )
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/rows" in r]
    assert [r["iteration"] for r in records] == [1, 2]  # one more iteration: the count went on from the checkpoint
    assert records[1]["train/generated_tokens_total"] == first + records[1]["train/generated_tokens"]


def test_the_guess_the_number_example_of_the_docs_trains(tiny_lm_dir, tmp_path, monkeypatch):  # noqa: F811
    """docs/extending.md's environment, taken from the page as it is, two iterations: it resets, steps and trains."""
    text = (ROOT / "docs/extending.md").read_text()
    start = text.index("```python\n", text.index("## Multi-turn environments")) + len("```python\n")
    (tmp_path / "guess_env.py").write_text(text[start : text.index("```", start)])
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    main(
        [
            "grpo",
            *overrides(tiny_lm_dir, out, "environment.name=guess_env:GuessTheNumber", "environment.kwargs={high: 5}"),
        ]
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert all(r["env/turns"] >= 1 and "reward/episode/mean" in r for r in records[1:])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["turns"][0]["observation"] == "Guess a number from 1 to 5.\n"


@pytest.mark.parametrize(
    "override, message",
    [
        (None, None),
        (
            "environment.name=tests.test_llm_gigpo:BadReset",
            "BadReset': the factory with environment.kwargs {'turns': 3}",
        ),
        (
            "environment.name=tests.test_llm_gigpo:BadReset;environment.kwargs={}",
            "environment 'tests.test_llm_gigpo:BadReset': reset returned int 7; return the first observation as a str",
        ),
        ("algorithm.loss=disco", "config field 'algorithm.loss': disco needs correct/wrong labels"),
        ("algorithm.updates_per_pass=2", "config field 'algorithm.updates_per_pass': 2: ranks hold unequal numbers"),
        ("environment.gamma=1.5", "config field 'environment.gamma': 1.5 is outside [0, 1]"),
    ],
)
def test_dry_run_checks_the_environment(override, message, capsys):
    """The shipped GiGPO recipe's dry run builds and resets its environment (no weights load: tests/test_dry_run.py
    runs every shipped recipe under a guard); a bad environment or setting is one line, exit 2."""
    args = ["grpo", "--config", str(ROOT / "configs/llm/arith_env_gigpo.yaml"), "--dry-run"]
    if override is None:
        main(args)
        out = capsys.readouterr().out
        assert "environment     : arith_chain {'turns': 3} (reset checked: 'Compute " in out
        assert "gamma 0.95, omega 1, mean_norm, episode statistics over rows, invalid penalty 0.1" in out
        return
    with pytest.raises(SystemExit) as stopped:
        main([*args, *override.split(";")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_every_algorithm_name_has_a_recipe():
    """algorithm.name's choices and llmalign.grpo.ALGORITHMS name the same recipes, and each one loads."""
    import typing

    from llmalign.config import LMAlgorithmConfig
    from llmalign.grpo import ALGORITHMS, algorithm_recipe

    names = typing.get_args(typing.get_type_hints(LMAlgorithmConfig)["name"])
    assert set(names) == set(ALGORITHMS) and {"gigpo", "episode_grpo"} <= set(names)
    assert all(callable(algorithm_recipe(name)) for name in names)


def test_gigpo_on_vllm_rollouts(tmp_path):
    """rollout.engine=vllm through the same generate call (one call per turn for every active trajectory, a seed per
    completion): two iterations on the embedded model and arith_chain, the engine's log-probs those of the trainer."""
    from tests.test_vllm_engine import LOGPROB_TOLERANCE, needs_vllm

    if needs_vllm.args[0]:
        pytest.skip(needs_vllm.kwargs["reason"])
    out = tmp_path / "run"
    small = ["train.iterations=2", "train.prompts_per_iteration=2", "train.group_size=4", "environment.eval_tasks=2"]
    torch.set_num_threads(1)
    config = str(ROOT / "configs/llm/arith_env_gigpo.yaml")
    main(["grpo", "--config", config, *small, "rollout.engine=vllm", f"log.output_dir={out}"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["train/rows"] >= 2 * 4 * 3  # three turns or more per trajectory
    assert records[1]["mismatch/max_abs_dlogp"] < LOGPROB_TOLERANCE  # iteration 1 checks the ratio: compared

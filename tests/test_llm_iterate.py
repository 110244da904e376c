"""`llmalign iterate` (iterative DPO / APO) on the embedded arithmetic model, in tiny settings (4 prompts x 4
completions, 2 DPO steps per round, 2 rounds):

- the extrapolation by hand, and at momentum 0 the DPO result bit for bit;
- two rounds run; each round's logged held-out accuracy (greedy and sampled) equals an independent evaluation of
  that round's saved policy;
- round 2's reference log-probs equal an unpadded forward of round 1's saved policy on round 2's pairs, and round
  2's DPO starts from it;
- the saved policies equal theta'_t + alpha (theta'_t - theta'_{t-1}) from the saved DPO results, computed here
  in float64;
- resumed after a stop between phases, inside a round's DPO, or a SIGKILL, the run ends with the uninterrupted
  run's final weights and logged accuracies, bit for bit;
- bad input is one line naming the field, exit 2, before any model loads;
- on 2 processes (accelerate launch, gloo) it writes the 1-process run's pairs files, policies and metrics bit for
  bit, and a 2-process run SIGKILLed inside round 1's DPO resumes on 2 processes to those same weights.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from llmalign import dpo, iterate
from llmalign.cli import main
from llmalign.evaluate import held_out_metrics
from llmalign.iterate import extrapolate
from llmalign.policy import load_policy
from llmalign.config import LMModelConfig
from llmalign.toy import resolve_embedded
from shared.checkpoint import latest_checkpoint, load_state
from tests.multiproc import kill_processes, run_processes, start_processes
from tests.test_llm_dpo import direct_token_logps

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
MOMENTUM = 0.3


def overrides(out, *extra):
    return [
        "model.path=embedded:arith",
        "data.prompts_per_round=4",
        "data.eval_size=4",
        "data.eval_samples=2",
        "data.eval_max_new_tokens=48",
        "data.max_completion_length=56",
        "pairs.group_size=4",
        "pairs.max_new_tokens=48",
        "pairs.batch_size=4",
        "algorithm.loss=sigmoid",
        "algorithm.beta=0.3",
        f"iterate.momentum={MOMENTUM}",
        "iterate.rounds=2",
        "train.steps=2",
        "train.batch_size=2",
        "memory.micro_batch_size=2",
        "train.learning_rate=1e-3",
        "log.checkpoint_every=1",
        f"log.output_dir={out}",
        *extra,
    ]


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


def records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def round_evals(out) -> dict[int, dict]:
    return {
        r["round"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in records(out) if "eval/accuracy" in r
    }


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 2-round APO run; both rounds must have pairs for the tests below to mean anything."""
    out = tmp_path_factory.mktemp("iterate") / "straight"
    main(["iterate", *overrides(out)])
    counts = [r["pairs/count"] for r in records(out) if "pairs/count" in r]
    assert len(counts) == 2 and min(counts) > 0, counts
    return out


# ----------------------------------------------------------------------------- the extrapolation


def test_extrapolation_by_hand():
    # 1 + 0.5 (1 - 0) = 1.5; 2 + 0.5 (2 - 4) = 1.0; alpha 0 returns the current weights bit for bit
    current, previous = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.0, 4.0])}
    assert torch.equal(extrapolate(current, previous, 0.5)["w"], torch.tensor([1.5, 1.0]))
    noisy = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(0))}
    assert torch.equal(extrapolate(noisy, previous | {"w": torch.zeros(1000)}, 0.0)["w"], noisy["w"])
    # bfloat16 weights: computed in float32, returned in bfloat16 (1 + 0.3 * 2^-7 would round to 1 in bfloat16 math)
    small = extrapolate({"w": torch.tensor([1.0], dtype=torch.bfloat16)}, {"w": torch.tensor([0.0])}, 0.3)["w"]
    assert small.dtype == torch.bfloat16 and small.item() == torch.tensor(1.3).to(torch.bfloat16).item()


# ----------------------------------------------------------------------------- two rounds


def test_two_rounds_log_each_rounds_held_out_accuracy(straight):
    evals = round_evals(straight)
    assert sorted(evals) == [0, 1, 2]
    tests = [json.loads(line) for line in Path(resolve_embedded("embedded:arith/test.jsonl")).read_text().splitlines()]
    for t in (0, 1, 2):
        path = "embedded:arith" if t == 0 else str(straight / f"round-{t}" / "policy")
        model, tokenizer = load_policy(LMModelConfig(path=path), "cpu")
        expected = held_out_metrics(model.eval(), tokenizer, tests[:4], 48, 1.0, 2, seed=12345)
        assert evals[t] == expected, t  # greedy and sampled accuracy, logged as evaluated here
    assert (straight / "final").resolve() == (straight / "round-2" / "policy").resolve()


def test_round_two_reference_is_round_one_policy(straight):
    config = json.loads((straight / "round-2" / "dpo" / "config.json").read_text())
    assert config["model"]["path"] == str(straight / "round-1" / "policy")  # round 2 starts from pi_1
    cache = load_file(str(straight / "round-2" / "dpo" / "reference_logprobs.safetensors"))
    pairs = [json.loads(line) for line in (straight / "round-2" / "pairs.jsonl").read_text().splitlines()]
    policy, tokenizer = load_policy(LMModelConfig(path=str(straight / "round-1" / "policy")), "cpu")
    initial, _ = load_policy(LMModelConfig(path="embedded:arith"), "cpu")
    for i, row in enumerate(pairs):
        for column in ("chosen", "rejected"):
            expected = direct_token_logps(policy.eval(), tokenizer, row["prompt"], row[column])  # [C] unpadded
            assert_close(cache[f"{column}.{i}"], expected, rtol=1e-5, atol=1e-5)
    other = direct_token_logps(initial.eval(), tokenizer, pairs[0]["prompt"], pairs[0]["chosen"])
    assert (cache["chosen.0"] - other).abs().max() > 1e-3  # the initial model would give other numbers


def test_policies_are_the_extrapolated_dpo_results(straight):
    theta = {0: weights(resolve_embedded("embedded:arith"))}
    for t in (1, 2):
        theta[t] = weights(straight / f"round-{t}" / "dpo" / "final")
        saved = weights(straight / f"round-{t}" / "policy")
        assert saved.keys() == theta[t].keys()
        for name, value in theta[t].items():
            wide, before = value.double(), theta[t - 1][name].double()
            assert_close(saved[name].double(), wide + MOMENTUM * (wide - before), rtol=0, atol=1e-6)
        assert any(not torch.equal(saved[n], theta[t][n]) for n in saved)  # the momentum moved it
    # the round state keeps theta'_2 (the DPO result, not its extrapolation) for a third round's momentum
    kept = load_state(latest_checkpoint(straight / "checkpoints"), "momentum")
    assert kept.keys() == theta[2].keys() and all(torch.equal(kept[name], theta[2][name]) for name in kept)
    assert load_state(latest_checkpoint(straight / "checkpoints"), "trainer")["phase"] == "extrapolate"


def test_momentum_zero_is_iterative_dpo_exactly(tmp_path):
    out = tmp_path / "zero"
    main(["iterate", *overrides(out, "iterate.momentum=0", "iterate.rounds=1")])
    trained, saved = weights(out / "round-1" / "dpo" / "final"), weights(out / "round-1" / "policy")
    assert all(torch.equal(saved[name], trained[name]) for name in trained)
    initial = weights(resolve_embedded("embedded:arith"))
    assert any(not torch.equal(saved[name], initial[name]) for name in saved)  # DPO did train


def test_a_round_without_pairs_trains_nothing(tmp_path):
    # one sampled token: every completion breaks the format (level 0), so no prompt gives a pair
    out = tmp_path / "no_pairs"
    main(["iterate", *overrides(out, "pairs.max_new_tokens=1", "iterate.rounds=1")])
    assert [r["pairs/count"] for r in records(out) if "pairs/count" in r] == [0]
    assert not (out / "round-1" / "dpo").exists()
    saved, initial = weights(out / "round-1" / "policy"), weights(resolve_embedded("embedded:arith"))
    assert all(torch.equal(saved[name], initial[name]) for name in initial)  # theta_0 + 0.3 (theta_0 - theta_0)


# ----------------------------------------------------------------------------- resume


class Stop(Exception):
    pass


def assert_same_run(out, straight):
    final, expected = weights(out / "final"), weights(straight / "final")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[name], expected[name]) for name in expected)
    assert round_evals(out) == round_evals(straight)


@pytest.mark.parametrize("where", ["after round 2's pairs", "after round 1's policy is written"])
def test_stopped_between_phases_resumes_bit_identically(where, straight, tmp_path, monkeypatch):
    out = tmp_path / "stopped"
    if where == "after round 2's pairs":

        def stop_round(config, t, resume, allow):
            if t == 2:
                raise Stop
            return real_train_round(config, t, resume, allow)

        real_train_round = iterate.train_round
        monkeypatch.setattr(iterate, "train_round", stop_round)
    else:  # the policy is on disk but its phase's checkpoint is not: the resume redoes the extrapolation

        def stop_extrapolate(*args):
            real_extrapolate(*args)
            raise Stop

        real_extrapolate = iterate.extrapolate_round
        monkeypatch.setattr(iterate, "extrapolate_round", stop_extrapolate)
    with pytest.raises(Stop):
        main(["iterate", *overrides(out)])
    monkeypatch.undo()
    phase = load_state(latest_checkpoint(out / "checkpoints"), "trainer")["iteration"]
    assert phase == (4 if where == "after round 2's pairs" else 2)
    main(["iterate", *overrides(out), "--resume"])
    assert_same_run(out, straight)


def test_stopped_inside_a_rounds_dpo_resumes_bit_identically(straight, tmp_path, monkeypatch):
    out = tmp_path / "mid_dpo"
    calls = []

    def step_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # round 2's second step: its first is checkpointed (checkpoint_every 1)
            raise Stop
        return real_step(*args, **kwargs)

    real_step = dpo.train_step
    monkeypatch.setattr(dpo, "train_step", step_then_stop)
    with pytest.raises(Stop):
        main(["iterate", *overrides(out)])
    monkeypatch.undo()
    assert latest_checkpoint(out / "round-2" / "dpo" / "checkpoints").name == "step-000001"
    assert load_state(latest_checkpoint(out / "checkpoints"), "trainer")["iteration"] == 4
    main(["iterate", *overrides(out), "--resume"])
    assert_same_run(out, straight)


def test_sigkill_then_resume_is_bit_identical(straight, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "llmalign", "iterate", *overrides(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:  # kill once round 1's DPO has a checkpoint
        if latest_checkpoint(out / "round-1" / "dpo" / "checkpoints") is not None:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    main(["iterate", *overrides(out), "--resume"])
    assert_same_run(out, straight)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "override, field",
    [
        ("iterate.momentum=1.0", "iterate.momentum"),
        ("iterate.momentum=-0.1", "iterate.momentum"),
        ("algorithm.beta=0", "algorithm.beta"),
        ("algorithm.loss=modpo", "algorithm.loss"),
        ("iterate.rounds=0", "iterate.rounds"),
        ("model.lora=true", "model.lora"),
        ("pairs.group_size=1", "pairs.group_size"),
        ("log.eval_every=5", "log.eval_every"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_model_loads(override, field, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded")

    monkeypatch.setattr(iterate, "load_policy", refuse)
    with pytest.raises(SystemExit) as stop:
        main(["iterate", *overrides(tmp_path / "bad", override)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{field}'" in err
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- two processes

# 8 prompts in sampling batches of 4: rank r samples batch r (pairs.batch_size 4), so both ranks sample. One pair per
# micro-batch: each of the 2 processes forwards its one pair of a step alone, as the 1 process does; the gradients
# then agree bit for bit (each pair's gradient is halved, exactly, before DDP's two-term sum), whereas 2 pairs
# padded into one micro-batch would give 1-process log-probs that differ in the last bits.
TWO_PROCESSES = ("data.prompts_per_round=8", "memory.micro_batch_size=1")


def assert_same_rounds(one, two, rounds=2):
    """Two runs wrote the same pairs files, DPO results, policies and metrics.jsonl records."""
    for t in range(1, rounds + 1):
        pairs = (one / f"round-{t}" / "pairs.jsonl").read_bytes()
        assert pairs and pairs == (two / f"round-{t}" / "pairs.jsonl").read_bytes(), t
        for model in ("dpo/final", "policy"):
            expected, got = weights(one / f"round-{t}" / model), weights(two / f"round-{t}" / model)
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[name], expected[name]) for name in expected), (t, model)
    assert records(two) == records(one)
    assert (two / "final").resolve() == (two / f"round-{rounds}" / "policy").resolve()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("iterate_world") / "one"
    main(["iterate", *overrides(out, *TWO_PROCESSES)])
    return out


@pytest.mark.timeout(300)
def test_two_processes_write_the_one_process_pairs_and_weights(one_process, tmp_path):
    out = tmp_path / "two"
    done = run_processes(2, ["-m", "llmalign", "iterate", *overrides(out, *TWO_PROCESSES)], timeout=280)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "over 2 process(es) (1 each" in done.stdout  # each round's DPO ran on both processes
    assert_same_rounds(one_process, out)


@pytest.mark.timeout(300)
def test_two_processes_killed_inside_a_rounds_dpo_resume_to_the_same_weights(one_process, tmp_path):
    out = tmp_path / "killed"
    process = start_processes(2, ["-m", "llmalign", "iterate", *overrides(out, *TWO_PROCESSES)])
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and process.poll() is None:  # kill once round 1's DPO has a checkpoint
        if latest_checkpoint(out / "round-1" / "dpo" / "checkpoints") is not None:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    kill_processes(process)
    assert not (out / "round-2" / "dpo").exists()  # killed in round 1's DPO or the phases right after it
    done = run_processes(2, ["-m", "llmalign", "iterate", *overrides(out, *TWO_PROCESSES), "--resume"], timeout=280)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resumed from" in done.stdout
    assert_same_rounds(one_process, out)

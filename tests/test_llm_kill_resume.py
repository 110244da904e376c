"""`llmalign grpo` (and `llmalign dpo` with the srpo loss) killed with SIGKILL resumes from its last checkpoint
with --resume and ends with weights bit-identical to an uninterrupted run (CPU, one thread on both sides)."""

import json
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
from tests.test_llm_dpo import overrides as dpo_overrides, tiny  # noqa: F401  (fixture)
from tests.test_llm_grpo import overrides, tiny_lm_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
EXTRA = ["train.iterations=5", "algorithm.num_iterations=2", "algorithm.kl_beta=0.05", "log.keep_last=2"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_lm_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("straight")
    torch.set_num_threads(1)
    main(["grpo", *overrides(tiny_lm_dir, out, *EXTRA)])
    return load_state(latest_checkpoint(out / "checkpoints"), "trainable")


def kill_after_checkpoint(args: list[str], out: Path, checkpoint: int, extra_wait: float = 0.0) -> None:
    """Run `python -m llmalign ARGS` (its log.output_dir `out`) and SIGKILL it once checkpoint `checkpoint` is
    written, `extra_wait` seconds later (sometimes in the middle of the next iteration or checkpoint write)."""
    command = [sys.executable, "-m", "llmalign", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"step-{checkpoint:06d}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        latest = latest_checkpoint(out / "checkpoints")
        if latest is not None and latest.name >= target:
            break
        time.sleep(0.01)
    time.sleep(extra_wait)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert latest_checkpoint(out / "checkpoints").name >= target


@pytest.mark.parametrize("kill_after, extra_wait", [(1, 0.0), (2, 0.05), (3, 0.0)])
def test_sigkill_then_resume_is_bit_identical(
    tiny_lm_dir,
    uninterrupted,
    tmp_path,  # noqa: F811
    kill_after,
    extra_wait,
):
    out = tmp_path / "killed"
    kill_after_checkpoint(["grpo", *overrides(tiny_lm_dir, out, *EXTRA)], out, kill_after, extra_wait)

    torch.set_num_threads(1)
    main(["grpo", *overrides(tiny_lm_dir, out, *EXTRA), "--resume"])
    assert not list((out / "checkpoints").glob(".tmp-step-*"))  # a kill mid-write leaves one; the resume removes it
    resumed = load_state(latest_checkpoint(out / "checkpoints"), "trainable")
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_srpo_sigkill_then_resume_is_bit_identical(tiny, tmp_path):  # noqa: F811
    """`llmalign dpo` with algorithm.loss=srpo (six sequences a pair, their reference log-probs cached): killed
    after its 2nd of 12 checkpoints, resumed (the cache read back), it ends with the uninterrupted run's weights."""
    extra = ["algorithm.loss=srpo", "data.test=null", "train.steps=12", "log.keep_last=2", "train.warmup_steps=3"]
    torch.set_num_threads(1)
    main(["dpo", *dpo_overrides(tiny, tmp_path / "straight", *extra)])
    out = tmp_path / "killed"
    kill_after_checkpoint(["dpo", *dpo_overrides(tiny, out, *extra)], out, 2)
    main(["dpo", *dpo_overrides(tiny, out, *extra), "--resume"])
    straight, resumed = (
        load_state(latest_checkpoint(tmp_path / name / "checkpoints"), "trainable") for name in ("straight", "killed")
    )
    assert latest_checkpoint(out / "checkpoints").name == "step-000012"
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


def test_grpo_resume_with_a_changed_config_is_refused_unless_allowed_and_then_the_new_lr_is_used(  # noqa: F811
    tiny_lm_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    torch.set_num_threads(1)
    main(["grpo", *overrides(tiny_lm_dir, out, "train.iterations=1")])
    kept = {name: (out / name).read_text() for name in ("metrics.jsonl", "samples.jsonl", "config.json")}
    capsys.readouterr()
    weights = "reward.weights={accuracy: 2.0, tests.test_llm_grpo:char_count_reward: 1.0}"
    with pytest.raises(SystemExit) as refused:
        main(
            [
                "grpo",
                *overrides(tiny_lm_dir, out, "train.iterations=2", "train.learning_rate=5e-3", weights),
                "--resume",
            ]
        )
    assert refused.value.code == 2
    assert capsys.readouterr().err == (
        "config error: --resume: the config differs from the one step-000001 was written under in "
        "train.learning_rate (0.01 -> 0.005), reward.weights.accuracy (1.0 -> 2.0); set them back, or add "
        "--allow-config-change to apply them (on resume only train.iterations, budget.*, train.steps, "
        "train.epochs, log.*, eval.* may change without it)\n"
    )
    assert {name: (out / name).read_text() for name in kept} == kept  # nothing touched
    with pytest.raises(SystemExit) as refused:
        main(["grpo", *overrides(tiny_lm_dir, tmp_path / "other"), "--allow-config-change"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1

    main(
        [
            "grpo",
            *overrides(tiny_lm_dir, out, "train.iterations=2", "train.learning_rate=5e-3"),
            "--resume",
            "--allow-config-change",
        ]
    )
    assert load_state(out / "checkpoints" / "step-000001", "optimizer")["param_groups"][0]["lr"] == 1e-2
    # the optimizer that took step 2 held the new rate (nothing else sets it; a plain restore put back 1e-2)
    assert load_state(out / "checkpoints" / "step-000002", "optimizer")["param_groups"][0]["lr"] == 5e-3
    assert json.loads((out / "config.json").read_text())["train"]["learning_rate"] == 5e-3
    assert [json.loads(line) for line in (out / "config_changes.jsonl").read_text().splitlines()] == [
        {"iteration": 1, "changes": {"train.iterations": [1, 2], "train.learning_rate": [0.01, 0.005]}}
    ]


def test_changing_model_lora_on_resume_is_one_line_even_with_allow_config_change(tiny_lm_dir, tmp_path, capsys):  # noqa: F811
    """Issue 23: --allow-config-change with model.lora changed ended in a traceback ("checkpoint has parameters the
    model lacks"); it is now one line naming the field, exit 2. The overrides stand after --resume, where argparse
    used to refuse them as "unrecognized arguments"."""
    out = tmp_path / "run"
    main(["grpo", *overrides(tiny_lm_dir, out, "train.iterations=1")])
    kept = {name: (out / name).read_text() for name in ("metrics.jsonl", "config.json")}
    capsys.readouterr()
    for flags in (["--resume", "--allow-config-change"], ["--resume"]):
        with pytest.raises(SystemExit) as refused:
            main(["grpo", *overrides(tiny_lm_dir, out), *flags, "model.lora=true", "train.iterations=3"])
        assert refused.value.code == 2
        assert capsys.readouterr().err == (
            "config error: --resume: model.lora (false -> true) cannot change on resume, not even with "
            "--allow-config-change: the weights step-000001 holds were trained under the old setting and load only "
            "into that model; set it back, or start a new run in another log.output_dir\n"
        )
    assert {name: (out / name).read_text() for name in kept} == kept  # nothing touched
    main(["grpo", *overrides(tiny_lm_dir, out), "--resume", "train.iterations=3"])  # an override after --resume
    assert latest_checkpoint(out / "checkpoints").name == "step-000003"


def test_dpo_resume_refuses_a_changed_beta_and_applies_a_new_lr_when_allowed(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    main(["dpo", *dpo_overrides(tiny, out, "data.test=null", "train.steps=1")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(["dpo", *dpo_overrides(tiny, out, "data.test=null", "train.steps=2", "algorithm.beta=0.5"), "--resume"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "the config differs from the one step-000001 was written under in algorithm.beta (null -> 0.5);" in err
    assert err.count("\n") == 1
    main(
        [
            "dpo",
            *dpo_overrides(tiny, out, "data.test=null", "train.steps=2", "train.learning_rate=5e-3"),
            "--resume",
            "--allow-config-change",
        ]
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r.get("train/lr")) for r in records] == [(0, None), (1, 1e-2), (2, 5e-3)]
    assert load_state(out / "checkpoints" / "step-000002", "optimizer")["param_groups"][0]["lr"] == 5e-3


def test_a_full_disk_at_a_checkpoint_exits_5_with_one_line_and_resume_ends_bit_identical(  # noqa: F811
    tiny_lm_dir, uninterrupted, tmp_path, capsys, monkeypatch
):
    import errno

    import shared.checkpoint as checkpoint_module

    out = tmp_path / "full"
    real = checkpoint_module.save_file

    def save_file(tensors, filename):  # the disk is full when checkpoint 3 is written
        if "step-000003" in filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        real(tensors, filename)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    torch.set_num_threads(1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as failed:
        main(["grpo", *overrides(tiny_lm_dir, out, *EXTRA)])
    assert failed.value.code == 5
    checkpoints = out / "checkpoints"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"write error: cannot write checkpoint {checkpoints / 'step-000003'} (No space left on device: "
        f"{checkpoints / 'step-000003'}{os.sep}trainable.safetensors); {checkpoints / 'step-000002'} is intact and "
        f"--resume starts from it"
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000001", "step-000002"]
    assert (out / "final").resolve() == (checkpoints / "step-000002" / "model").resolve()  # still the newest model
    monkeypatch.undo()

    main(["grpo", *overrides(tiny_lm_dir, out, *EXTRA), "--resume"])
    resumed = load_state(latest_checkpoint(checkpoints), "trainable")
    assert latest_checkpoint(checkpoints).name == "step-000005"
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    assert (out / "final").resolve() == (checkpoints / "step-000005" / "model").resolve()
    assert [json.loads(line)["iteration"] for line in (out / "samples.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
    ]

"""algorithm.name ppo (llmalign/ppo.py, llmalign/critic.py) on a tiny Qwen2 built in the test: a 2-iteration run
trains both models and saves the critic in the checkpoint; the recipe's advantages are shared.gae's on the values
it computed; SIGKILL then --resume is bit-identical; bad input exits 2 with one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.testing import assert_close

from llmalign.cli import main
from llmalign.config import GRPOConfig
from llmalign.grpo import ALGORITHMS
from shared.checkpoint import latest_checkpoint, load_state
from shared.config import load_config
from shared.gae import gae_advantages, last_token_rewards, whitened
from shared.run import Run
from tests.multiproc import REPO
from tests.test_llm_grpo import overrides as grpo_overrides
from tests.test_llm_grpo import tiny_lm_dir  # noqa: F401  (fixture)


def overrides(model_dir, out_dir, *extra):
    return grpo_overrides(
        model_dir,
        out_dir,
        "algorithm.name=ppo",
        "algorithm.loss=dapo",
        "algorithm.mask_truncated=false",  # the tiny model rarely ends a completion: train on them
        "train.group_size=1",
        "train.prompts_per_iteration=4",
        "memory.micro_batch_size=2",
        "critic.learning_rate=1e-2",
        *extra,
    )


def test_two_iterations_train_policy_and_critic_and_save_the_critic(tiny_lm_dir, tmp_path):
    torch.set_num_threads(1)
    main(["grpo", *overrides(tiny_lm_dir, tmp_path / "run")])
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    critic = load_state(checkpoint, "critic")
    assert "score.weight" in critic and float(critic["score.weight"].abs().max()) > 0  # the zero head moved
    optimizer = load_state(checkpoint, "critic_optimizer")
    assert optimizer["state"], "the critic's AdamW moments are saved"
    assert (checkpoint / "critic.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("train/value_loss" in r and "train/advantage_std" in r for r in records[1:])


def test_sigkill_then_resume_ends_bit_identical(tiny_lm_dir, tmp_path):
    """Killed (SIGKILL) once its first checkpoint is on disk, then resumed: the policy, the critic and its AdamW
    moments end as an uninterrupted run's."""
    torch.set_num_threads(1)
    extra = ("train.iterations=3", "log.eval_every=0")
    main(["grpo", *overrides(tiny_lm_dir, tmp_path / "straight", *extra)])
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "llmalign", "grpo", *overrides(tiny_lm_dir, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and latest_checkpoint(out / "checkpoints") is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    main(["grpo", *overrides(tiny_lm_dir, out, *extra), "--resume"])
    for name in ("trainable", "critic", "critic_optimizer"):
        straight = load_state(latest_checkpoint(tmp_path / "straight" / "checkpoints"), name)
        resumed = load_state(latest_checkpoint(out / "checkpoints"), name)
        if name != "critic_optimizer":
            assert straight.keys() == resumed.keys()
            for key in straight:
                assert torch.equal(straight[key], resumed[key]), (name, key)
        else:  # AdamW's moments and step counts, tensor by tensor
            assert straight["state"].keys() == resumed["state"].keys()
            for index, moments in straight["state"].items():
                for key, value in moments.items():
                    assert torch.equal(value, resumed["state"][index][key]), (name, index, key)


@pytest.mark.parametrize("whiten", ["true", "false"])
def test_advantages_are_gae_on_the_recipes_values(tiny_lm_dir, tmp_path, whiten):
    """One iteration's stages by hand: the advantage stage's per-token advantages equal shared.gae's on the values
    the critic gives for the rollout (after a critic step, so the values are not all 0) and the summed rewards."""
    torch.set_num_threads(1)
    config = load_config(
        GRPOConfig,
        None,
        overrides(tiny_lm_dir, tmp_path / "run", "algorithm.gamma=0.9", "algorithm.gae_lambda=0.8")
        + [f"algorithm.whiten_advantages={whiten}"],
    )
    recipe = ALGORITHMS["ppo"](config)
    run = Run(tmp_path / "run", resume=False, tag="[test]")
    recipe.setup(run)
    recipe.update(recipe.advantage(recipe.rollout(0)))  # the critic moves off 0
    sampled = recipe.rollout(1)
    batch = recipe.advantage(sampled)
    rollout = batch.trained.rollout
    mask = rollout.completion_mask  # [n, C] nothing dropped here
    values = recipe.critic.values(rollout, 1)  # [n, C]
    assert float(values[mask.bool()].abs().min()) > 0
    scores = sampled.batch.scores
    total = sum(config.reward.weights[k] * scores[k] for k in scores)  # [n]
    expected, returns = gae_advantages(last_token_rewards(total, mask), values, mask, gamma=0.9, lam=0.8)
    assert_close(batch.targets.returns, returns)
    if whiten == "true":
        kept = expected[mask.bool()].double()
        expected = whitened(expected, mask, float(kept.mean()), float(kept.var(unbiased=False)))
    assert_close(batch.trained.advantages, expected)
    run.close()


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.loss=disco", "algorithm.loss"),
        ("algorithm.replay=ssr", "algorithm.replay"),
        ("algorithm.full_batch_epochs=2", "algorithm.full_batch_epochs"),
        ("algorithm.window_tokens=4", "algorithm.window_tokens"),
        ("algorithm.gae_lambda=1.5", "algorithm.gae_lambda"),
        ("critic.value_clip=0", "critic.value_clip"),
        ("critic.learning_rate=0", "critic.learning_rate"),
    ],
)
def test_bad_config_exits_2_with_one_line(tiny_lm_dir, tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", *overrides(tiny_lm_dir, tmp_path, override)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_critic_without_a_token_classification_head_exits_2(tmp_path, tiny_lm_dir, capsys):
    """A model type transformers has no AutoModelForTokenClassification for (a vision encoder's config)."""
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)).save_pretrained(
        tmp_path / "vit"
    )
    capsys.readouterr()  # the save's progress bar
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", *overrides(tiny_lm_dir, tmp_path / "run", f"critic.path={tmp_path / 'vit'}")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "critic.path" in err and err.count("\n") == 1


@pytest.mark.timeout(300)
def test_advantage_and_update_on_a_fixed_rollout_are_the_same_on_two_processes(tiny_lm_dir, tmp_path):
    from safetensors.torch import load_file

    from tests.multiproc import run_processes

    for world in (1, 2):
        out = tmp_path / f"w{world}"
        out.mkdir()
        done = run_processes(world, ["-m", "tests.ppo_update_probe", str(tiny_lm_dir), str(out)], timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    one = load_file(str(tmp_path / "w1" / "ppo.world1.safetensors"))
    two = load_file(str(tmp_path / "w2" / "ppo.world2.safetensors"))  # the name holds the world size it ran on
    assert one.keys() == two.keys() and any(k.startswith("critic.") for k in one)
    for key in one:
        # AdamW steps of ~lr on coordinates whose gradient is mostly rounding: the largest gap measured 1.5e-5
        # (critic gate_proj, weights ~0.09) on 2026-12-06's packages, 1e-5 before
        assert_close(two[key], one[key], atol=3e-5, rtol=1e-5, msg=key)
    assert float(one["critic.score.weight"].abs().max()) > 0  # the critic's zero head moved
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).state_dict()
    assert max(float((one[f"policy.{k}"] - initial[k]).abs().max()) for k in initial if f"policy.{k}" in one) > 1e-3
    metrics = [json.loads((tmp_path / f"w{w}" / f"ppo.world{w}.json").read_text()) for w in (1, 2)]
    for key in ("value_loss", "advantage_mean", "advantage_std", "value_mean"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-4, abs=1e-6), key

"""A field that the chosen algorithm.name does not read is refused with one line (exit 2), not silently ignored."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from llmalign.config import ALGORITHM_OWNED, GRPOConfig, LMAlgorithmConfig
from shared.config import ConfigError, load_config


@pytest.mark.parametrize(
    "overrides, field, owners",
    [
        (["algorithm.window_tokens=20"], "algorithm.window_tokens", "t_ppo"),
        (["algorithm.name=episode_grpo", "environment.step_weight=0.5"], "environment.step_weight", "gigpo"),
        (["critic.learning_rate=0.001"], "critic", "ppo or t_ppo"),
        (["algorithm.name=spo_tree", "algorithm.spo_cut_every=3"], "algorithm.spo_cut_every", "spo_chain"),
        (["environment.max_turns=3"], "environment", "gigpo or episode_grpo"),
        (
            ["algorithm.name=ppo", "train.group_size=1", "algorithm.loss=dapo", "algorithm.spo_whiten=false"],
            "algorithm.spo_whiten",
            "spo_chain or spo_tree",
        ),
    ],
)
def test_a_field_of_another_algorithm_is_refused(overrides, field, owners):
    with pytest.raises(ConfigError) as refused:
        load_config(GRPOConfig, "configs/llm/arith.yaml", overrides)
    message = str(refused.value)
    assert f"'{field}'" in message and f"algorithm.name {owners} only" in message, message


def test_the_owning_algorithm_accepts_its_fields():
    config = load_config(
        GRPOConfig, "configs/llm/arith.yaml", ["algorithm.name=spo_tree", "algorithm.spo_tree_advantage=grpo"]
    )
    assert config.algorithm.spo_tree_advantage == "grpo"
    owners = {name for names in ALGORITHM_OWNED.values() for name in names}
    assert owners <= set(typing.get_args(typing.get_type_hints(LMAlgorithmConfig)["name"]))  # no misspelt name


def test_refusal_on_the_command_line_is_one_line_and_exit_2():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmalign",
            "grpo",
            "--config",
            "configs/llm/arith.yaml",
            "--dry-run",
            "algorithm.window_tokens=20",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "config error: config field 'algorithm.window_tokens': is read by algorithm.name t_ppo only, and this run "
        "is grpo; leave it at its default or choose one of those algorithms"
    ]

"""Config by composition (issue 22): the sections both front ends share are declared once (shared.sections), recipe
configs compose them without inheriting from one another, a recipe's section defaults hold under a partial YAML
section, old field names are refused naming their new place, and old checkpoints compare under the new names."""

import copy
import dataclasses
import subprocess
import sys
from typing import get_type_hints

import pytest

from flowalign.config import FlowGRPOConfig, FlowPreferenceConfig
from llmalign.config import GRPOConfig, LMDataSourceConfig
from llmalign.dpo_config import DPOConfig
from llmalign.iterate_config import IterateConfig
from llmalign.rm_config import RMConfig
from llmalign.sft_config import SFTConfig
from shared import sections
from shared.config import ConfigError, describe, load_config, to_dict
from shared.run import with_current_names

RECIPES = (FlowGRPOConfig, FlowPreferenceConfig, GRPOConfig, DPOConfig, SFTConfig, IterateConfig, RMConfig)


def section_types(cls) -> dict[str, type]:
    return {name: hint for name, hint in get_type_hints(cls).items() if dataclasses.is_dataclass(hint)}


def test_recipe_configs_compose_sections_and_none_inherits_from_another():
    every = {hint for cls in RECIPES for hint in section_types(cls).values()}
    for cls in every | set(RECIPES):
        parents = [base for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)]
        # the one base left is a group of data-source fields the four llmalign data sections read with one loader
        assert parents in ([], [LMDataSourceConfig]), (cls.__name__, parents)
    shared_sections = {
        "log": sections.LogSection,
        "budget": sections.BudgetSection,
        "memory": sections.MemorySection,
    }
    for cls in RECIPES:
        for name, section in shared_sections.items():
            assert section_types(cls)[name] is section, (cls.__name__, name)
    for cls in (FlowGRPOConfig, FlowPreferenceConfig, GRPOConfig):
        assert section_types(cls)["reward"] is sections.RewardSection
        assert section_types(cls)["eval"] is sections.EvalSection
    for cls in (FlowGRPOConfig, GRPOConfig):  # the algorithm fields both GRPO recipes share, under algorithm.
        algorithm = {f.name for f in dataclasses.fields(section_types(cls)["algorithm"])}
        assert {"clip_range", "kl_beta", "advantage_scale", "updates_per_pass"} <= algorithm, cls.__name__


def test_a_recipes_section_defaults_hold_under_a_partial_yaml_section(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("recipe: sft\nlog:\n  eval_every: 5\nmemory:\n  gradient_checkpointing: true\n")
    config = load_config(SFTConfig, path)
    assert (config.log.output_dir, config.log.eval_every, config.log.checkpoint_every) == ("runs/llm_sft", 5, 20)
    assert (config.memory.micro_batch_size, config.memory.gradient_checkpointing) == (8, True)
    flow = load_config(FlowGRPOConfig, None, ["memory={gradient_checkpointing: true}", "log={keep_last: 3}"])
    assert (flow.memory.micro_batch_size, flow.log.output_dir, flow.log.eval_every, flow.log.keep_last) == (
        32,
        "runs/flow_grpo",
        10,
        3,
    )
    assert load_config(GRPOConfig).reward.weights == {"accuracy": 1.0}
    assert load_config(FlowPreferenceConfig).reward.weights == {"flowalign.rewards:digit_classifier_reward": 1.0}
    lines = describe(FlowGRPOConfig)
    assert "memory.micro_batch_size (int, default 32): " in "\n".join(lines)
    assert "log.output_dir (str, default 'runs/llm_iterate'): " in "\n".join(describe(IterateConfig))


@pytest.mark.parametrize(
    "cls, override, new",
    [
        (FlowGRPOConfig, "train.kl_beta=0.1", "algorithm.kl_beta"),
        (FlowGRPOConfig, "train.clip_range=1e-3", "algorithm.clip_range"),
        (FlowGRPOConfig, "train.advantage_scale=group", "algorithm.advantage_scale"),
        (FlowGRPOConfig, "train.updates_per_iteration=1", "algorithm.updates_per_pass"),
        (FlowGRPOConfig, "reward.async_scoring=true", "train.async_scoring"),
        (FlowGRPOConfig, "train.max_seconds=5", "budget.max_seconds"),
        (FlowPreferenceConfig, "train.updates_per_iteration=2", "algorithm.num_iterations"),
        (FlowPreferenceConfig, "log.save_pairs=true", "train.save_pairs"),
        (FlowPreferenceConfig, "train.micro_batch_size=2", "memory.micro_batch_size"),
        (GRPOConfig, "train.updates_per_pass=2", "algorithm.updates_per_pass"),
        (GRPOConfig, "train.num_iterations=2", "algorithm.num_iterations"),
        (GRPOConfig, "train.max_generated_tokens=100", "budget.max_generated_tokens"),
        (GRPOConfig, "algorithm.beta=0.1", "algorithm.kl_beta"),
        (DPOConfig, "train.mixed_precision=bf16", "memory.mixed_precision"),
        (SFTConfig, "train.gradient_checkpointing=true", "memory.gradient_checkpointing"),
        (IterateConfig, "train.rounds=2", "iterate.rounds"),
        (IterateConfig, "algorithm.momentum=0.3", "iterate.momentum"),
    ],
)
def test_an_old_name_is_refused_naming_its_new_place(cls, override, new):
    old = override.partition("=")[0]
    with pytest.raises(ConfigError) as refused:
        load_config(cls, None, [override])
    assert str(refused.value) == f"config field '{old}' was renamed; use '{new}'"


def test_an_old_name_in_a_yaml_file_is_refused_alike_and_a_rename_elsewhere_is_an_unknown_field(tmp_path):
    path = tmp_path / "flow.yaml"
    path.write_text("recipe: flow_grpo\ntrain:\n  iterations: 3\n  kl_beta: 0.1\n")
    with pytest.raises(ConfigError, match=r"^config field 'train.kl_beta' was renamed; use 'algorithm.kl_beta'$"):
        load_config(FlowGRPOConfig, path)
    # llmalign GRPO has no train.async_scoring: the flow rename does not point there
    with pytest.raises(ConfigError, match=r"^unknown config field 'reward.async_scoring'"):
        load_config(GRPOConfig, None, ["reward.async_scoring=true"])
    # DPO's algorithm.beta is its own field, not the renamed GRPO KL weight
    assert load_config(DPOConfig, None, ["data.train=x.jsonl", "algorithm.beta=0.2"]).algorithm.beta == 0.2


def test_the_command_line_refuses_an_old_name_in_one_line_with_exit_2():
    done = subprocess.run(
        [sys.executable, "-m", "llmalign", "train", "configs/llm/arith.yaml", "train.micro_batch_size=4", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "config error: config field 'train.micro_batch_size' was renamed; use 'memory.micro_batch_size'"
    ]


def test_a_token_budget_is_refused_by_recipes_that_count_no_tokens():
    with pytest.raises(ConfigError) as refused:
        load_config(SFTConfig, None, ["budget.max_generated_tokens=100"])
    assert str(refused.value) == (
        "config field 'budget.max_generated_tokens': 100: recipe sft does not count generated tokens (grpo does); use "
        "budget.max_seconds or unset it"
    )
    assert load_config(GRPOConfig, None, ["budget.max_generated_tokens=100"]).budget.max_generated_tokens == 100


@pytest.mark.parametrize("cls", [FlowGRPOConfig, FlowPreferenceConfig, DPOConfig, SFTConfig, IterateConfig])
def test_the_ratio_check_cadence_is_refused_by_the_recipes_it_does_not_steer(cls):
    """log.ratio_check_every sets when grpo recomputes its old log-probs; flow_grpo checks every iteration for free
    (the sampler gives the old log-probs) and the preference recipes have no ratio, so each refuses it."""
    extra = ["data.train=x.jsonl"] if cls is DPOConfig else []
    with pytest.raises(ConfigError, match=r"^config field 'log.ratio_check_every': 5: recipe \S+ .*; unset it"):
        load_config(cls, None, [*extra, "log.ratio_check_every=5"])
    assert load_config(cls, None, extra).log.ratio_check_every == 10  # the default passes
    assert load_config(GRPOConfig, None, ["log.ratio_check_every=0"]).log.ratio_check_every == 0


def test_a_bad_ratio_check_cadence_exits_2_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "llmalign", "train", "configs/llm/arith.yaml", "log.ratio_check_every=-1", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "config error: config field 'log.ratio_check_every': -1 must be >= 0 (0 = the first iteration only, "
        "1 = every iteration)"
    ]


def move(tree: dict, old: str, new: str) -> None:
    """Put the value at dotted `new` back at dotted `old`, as the code before the rename wrote it."""
    (*new_parents, new_leaf), (*old_parents, old_leaf) = new.split("."), old.split(".")
    node = tree
    for part in new_parents:
        node = node[part]
    value = node.pop(new_leaf)
    target = tree
    for part in old_parents:
        target = target.setdefault(part, {})
    target[old_leaf] = value


@pytest.mark.parametrize(
    "cls, yaml_path, moves",
    [
        (
            FlowGRPOConfig,
            "configs/flow/flow_grpo.yaml",
            [
                ("train.clip_range", "algorithm.clip_range"),
                ("train.kl_beta", "algorithm.kl_beta"),
                ("train.kl_form", "algorithm.kl_form"),
                ("train.advantage_scale", "algorithm.advantage_scale"),
                ("train.advantage_clip", "algorithm.advantage_clip"),
                ("train.per_prompt_history", "algorithm.per_prompt_history"),
                ("train.updates_per_iteration", "algorithm.updates_per_pass"),
                ("reward.async_scoring", "train.async_scoring"),
                ("train.max_seconds", "budget.max_seconds"),
                ("train.micro_batch_size", "memory.micro_batch_size"),
                ("train.gradient_checkpointing", "memory.gradient_checkpointing"),
                ("train.mixed_precision", "memory.mixed_precision"),
            ],
        ),
        (
            GRPOConfig,
            "configs/llm/arith.yaml",
            [
                ("train.num_iterations", "algorithm.num_iterations"),
                ("train.updates_per_pass", "algorithm.updates_per_pass"),
                ("train.full_batch_epochs", "algorithm.full_batch_epochs"),
                ("train.max_seconds", "budget.max_seconds"),
                ("train.max_generated_tokens", "budget.max_generated_tokens"),
                ("train.micro_batch_size", "memory.micro_batch_size"),
            ],
        ),
        (
            IterateConfig,
            "configs/llm/arith_iterate.yaml",
            [("train.rounds", "iterate.rounds"), ("algorithm.momentum", "iterate.momentum")],
        ),
    ],
)
def test_an_old_checkpoints_config_reads_equal_under_the_new_names(cls, yaml_path, moves):
    config = load_config(cls, yaml_path)
    current = to_dict(config)
    old = copy.deepcopy(current)
    for old_name, new_name in moves:
        move(old, old_name, new_name)
    for section in ("budget", "memory", "iterate"):  # sections that did not exist then
        if old.get(section) == {}:
            del old[section]
    assert old != current
    assert with_current_names(old, config) == current
    changed = copy.deepcopy(old)
    changed["train"]["seed"] = 7  # a real change still shows
    assert with_current_names(changed, config) != current

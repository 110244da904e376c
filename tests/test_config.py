import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal, Optional

import pytest

from shared.config import ConfigError, describe, load_config, option, parse_overrides


@dataclasses.dataclass
class Optim:
    lr: float = option(1e-4, "learning rate")
    betas: list[float] = option([0.9, 0.999], "Adam betas")


@dataclasses.dataclass
class Recipe:
    group_size: int = option(4, "samples per prompt")
    scale: Literal["group", "batch", "none"] = option("group", "advantage scale")
    lora: bool = option(True, "train a LoRA adapter")
    resume_from: Optional[str] = option(None, "checkpoint directory")
    weights: dict[str, float] = option({"a": 1.0}, "reward weights")
    optim: Optim = dataclasses.field(default_factory=Optim)

    def validate(self):
        if self.group_size < 2:
            raise ConfigError(f"config field 'group_size': {self.group_size} < 2; use at least 2 samples per prompt")


def test_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("group_size: 8\noptim:\n  lr: 0.001\nweights: {a: 0.5, b: 2}\n")
    config = load_config(Recipe, path, ["optim.betas=[0.5, 0.6]", "scale=batch", "resume_from=runs/x"])
    assert config.group_size == 8
    assert config.optim.lr == 0.001 and config.optim.betas == [0.5, 0.6]
    assert config.scale == "batch" and config.resume_from == "runs/x"
    assert load_config(Recipe, None, ["optim.lr=1e-3"]).optim.lr == 0.001  # YAML 1.1 reads 1e-3 as a string
    assert config.weights == {"a": 0.5, "b": 2.0} and isinstance(config.weights["b"], float)
    # defaults are per instance, not shared between configs
    assert Recipe().weights is not Recipe().weights


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["group_sise=3"], "unknown config field 'group_sise'; did you mean 'group_size'?"),
        (["optim.lrr=3"], "did you mean 'optim.lr'?"),
        (["group_size=abc"], "config field 'group_size': expected an integer, got 'abc'"),
        (["group_size=2.5"], "expected an integer, got 2.5"),
        (["lora=1"], "config field 'lora': expected true or false, got 1"),
        (["scale=global"], "config field 'scale': 'global' is not allowed; use one of ['group', 'batch', 'none']"),
        (["weights={a: x}"], "config field 'weights.a': expected a number, got 'x'"),
        (["group_size=1"], "config field 'group_size': 1 < 2"),
        (["optim=3"], "config section 'optim': expected a mapping"),
        (["nokey"], "override 'nokey' is not key=value"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(Recipe, None, overrides)
    assert message in str(info.value)


def test_parse_overrides_nests_and_parses_yaml():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=[1, 2]", "f="]) == {
        "a": {"b": {"c": 1}, "d": "x"},
        "e": [1, 2],
        "f": "",
    }


def test_missing_file_and_describe(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(Recipe, tmp_path / "nope.yaml")
    lines = describe(Recipe)
    assert "optim.lr (float, default 0.0001): learning rate" in lines
    assert any(line.startswith("scale (one of 'group'|'batch'|'none'") for line in lines)


def test_exit_code_2_and_no_traceback(tmp_path):
    script = tmp_path / "cli.py"
    script.write_text(
        textwrap.dedent("""
        import sys
        from shared.config import ConfigError, exit_on_config_error, load_config
        from tests.test_config import Recipe
        try:
            load_config(Recipe, None, sys.argv[1:])
        except ConfigError as error:
            exit_on_config_error(error)
    """)
    )
    root = str(Path(__file__).parents[1])
    result = subprocess.run(
        [sys.executable, str(script), "group_size=x"],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: config field 'group_size': expected an integer, got 'x' (str)"
    ]


def test_a_bare_yaml_no_reads_as_the_literal_no(tmp_path):
    @dataclasses.dataclass
    class Precision:
        mixed_precision: Literal["no", "bf16", "fp16"] = option("bf16", "autocast")
        scale: Literal["group", "none"] = option("group", "no 'no' among the choices")

    path = tmp_path / "p.yaml"
    path.write_text("mixed_precision: no\n")  # YAML 1.1 reads this as false
    assert load_config(Precision, path).mixed_precision == "no"
    assert load_config(Precision, None, ["mixed_precision=no"]).mixed_precision == "no"
    with pytest.raises(ConfigError, match="'scale': False is not allowed"):
        load_config(Precision, None, ["scale=no"])  # false stays false where 'no' is not a choice


# ------------------------------------------------------------------ mapping overrides replace (issue 14, item 9)
FLOW_YAML = """
reward:
  weights:
    flowalign.rewards:digit_classifier_reward: 1.0
    flowalign.rewards:jpeg_compressibility: 0.5
"""
LLM_YAML = """
reward:
  weights: {accuracy: 1.0, format: 0.5}
  kwargs: {format: {}}
"""


def front_ends():
    from flowalign.config import FlowGRPOConfig
    from llmalign.config import GRPOConfig

    jpeg = "flowalign.rewards:jpeg_compressibility"
    # (recipe, its YAML, a reward of that YAML, a mapping-typed companion field) per front end
    return [(FlowGRPOConfig, FLOW_YAML, jpeg, "reward.kwargs"), (GRPOConfig, LLM_YAML, "format", "reward.kwargs")]


@pytest.mark.parametrize("front_end", [0, 1], ids=["flow", "llm"])
def test_a_mapping_override_replaces_the_yaml_mapping_in_both_front_ends(front_end, tmp_path):
    recipe, text, kept, companion = front_ends()[front_end]
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert len(load_config(recipe, path).reward.weights) == 2  # the YAML's two rewards
    config = load_config(recipe, path, [f"reward.weights={{{kept}: 3}}", f"{companion}={{}}"])
    assert config.reward.weights == {kept: 3.0}  # the YAML's other reward is gone, not merged back in
    with pytest.raises(ConfigError, match="config field 'reward.weights': empty"):  # ={} empties it, not a no-op
        load_config(recipe, path, ["reward.weights={}"])
    # a dotted key past the mapping sets one entry (the key may hold dots: a module path) and keeps the others
    config = load_config(recipe, path, [f"reward.weights.{kept}=2"])
    assert len(config.reward.weights) == 2 and config.reward.weights[kept] == 2.0
    # overrides apply in order: replace, then add one entry
    config = load_config(
        recipe, path, [f"reward.weights={{{kept}: 1}}", f"{companion}={{}}", f"reward.weights.{kept}=4"]
    )
    assert config.reward.weights == {kept: 4.0}


@pytest.mark.parametrize("front_end", [0, 1], ids=["flow", "llm"])
def test_describe_says_a_mapping_override_replaces_it(front_end):
    recipe = front_ends()[front_end][0]
    line = next(line for line in describe(recipe) if line.startswith("reward.weights "))
    assert (
        "an override replaces the whole mapping (reward.weights={a: 1} keeps a alone, reward.weights={} empties "
        "it); reward.weights.KEY=value sets one entry" in line
    )
    assert not any(
        "replaces the whole mapping" in line for line in describe(recipe) if line.startswith(("train.", "sampling."))
    )  # only mapping-typed fields carry the note


def test_a_section_override_sets_only_the_fields_it_names(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim: {lr: 0.5, betas: [0.1, 0.2]}\nweights: {a: 1, b: 2}\n")
    config = load_config(Recipe, path, ["optim={lr: 0.25}"])
    assert config.optim.lr == 0.25 and config.optim.betas == [0.1, 0.2]  # a section merges field by field
    with pytest.raises(ConfigError, match="'group_size' is a single value, not a section"):
        load_config(Recipe, path, ["group_size.x=1"])
    with pytest.raises(ConfigError, match="'optim' is set to a value and used as a section"):
        load_config(Recipe, path, ["optim=3", "optim.lr=1"])


# ------------------------------------------------------------------ YAML that is not what it seems (item 10)
def test_a_yaml_key_given_twice_is_refused_with_its_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(Recipe, path)
    assert str(info.value) == (
        f"--config {path}: not valid YAML (line 3: key 'lr' is given twice (first on line 2); "
        f"keep one (YAML would silently use the last))"
    )
    with pytest.raises(
        ConfigError,
        match=r"override 'weights=\{a: 1, a: 2\}': value is not valid YAML \(key 'a' is "
        r"given twice",
    ):
        load_config(Recipe, None, ["weights={a: 1, a: 2}"])
    path.write_text("base: &base {lr: 0.1}\noptim:\n  <<: *base\n  lr: 0.2\n")  # a merge key may repeat on purpose
    with pytest.raises(ConfigError, match="unknown config field 'base'"):  # read, then refused for its field alone
        load_config(Recipe, path)


def test_non_utf8_yaml_and_yaml_tags_are_refused(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("group_size: 4  # r\u00e9glage\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(Recipe, path)
    assert str(info.value) == f"--config {path}: not UTF-8 text (byte 18); save it as UTF-8"
    path.write_text("group_size: !!python/object/apply:os.getpid []\n")
    with pytest.raises(ConfigError, match="line 1: could not determine a constructor for the tag"):
        load_config(Recipe, path)


def test_an_integer_too_large_for_a_float_field_is_a_config_error():
    with pytest.raises(ConfigError, match="config field 'optim.lr': an integer of 401 digits is too large"):
        load_config(Recipe, None, [f"optim.lr={10**400}"])


# ------------------------------------------------------------------ renamed fields (issue 15, item 8)
RENAMED = [  # (front end, old key=value as a YAML line under its section, the one line load_config raises)
    ("llm", "reward", "params: {format: {}}", "config field 'reward.params' was renamed; use 'reward.kwargs'"),
    ("flow", "reward", "params: {}", "config field 'reward.params' was renamed; use 'reward.kwargs'"),
    ("llm", "algorithm", "eps_low: 0.2", "config field 'algorithm.eps_low' was renamed; use 'algorithm.clip_range'"),
    (
        "llm",
        "algorithm",
        "eps_high: 0.28",
        "config field 'algorithm.eps_high' was renamed; use 'algorithm.clip_range_high'",
    ),
    ("llm", "algorithm", "beta: 0.04", "config field 'algorithm.beta' was renamed; use 'algorithm.kl_beta'"),
]


@pytest.mark.parametrize(
    "front_end, section, line, message", RENAMED, ids=[r[2].split(":")[0] + "-" + r[0] for r in RENAMED]
)
def test_a_renamed_field_names_its_new_name_in_yaml_and_override(front_end, section, line, message, tmp_path):
    from flowalign.config import FlowGRPOConfig
    from llmalign.config import GRPOConfig

    recipe = {"flow": FlowGRPOConfig, "llm": GRPOConfig}[front_end]
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  {line}\n")
    with pytest.raises(ConfigError) as from_yaml:
        load_config(recipe, path)
    key, _, value = line.partition(": ")
    with pytest.raises(ConfigError) as from_override:
        load_config(recipe, None, [f"{section}.{key}={value}"])
    assert str(from_yaml.value) == str(from_override.value) == message


def test_the_new_names_load_and_dpo_keeps_its_beta():
    from llmalign.config import GRPOConfig
    from llmalign.dpo_config import DPOConfig

    config = load_config(
        GRPOConfig,
        None,
        [
            "reward.weights={format: 1.0, cosine_length: 1.0}",
            "reward.kwargs.cosine_length={max_length: 64}",
            "algorithm.loss=dapo",
            "algorithm.clip_range=0.1",
            "algorithm.kl_beta=0.04",
        ],
    )
    a = config.algorithm
    assert (config.reward.kwargs, a.clip_range, a.kl_beta) == ({"cosine_length": {"max_length": 64}}, 0.1, 0.04)
    assert a.effective_clip_range_high == 0.28  # dapo's clip-higher when clip_range_high is null
    assert load_config(GRPOConfig, None, ["algorithm.clip_range_high=0.3"]).algorithm.effective_clip_range_high == 0.3
    dpo_yaml = Path(__file__).parents[1] / "configs" / "llm" / "arith_dpo.yaml"
    assert load_config(DPOConfig, dpo_yaml, ["algorithm.beta=0.5"]).algorithm.beta == 0.5  # DPO's temperature: kept
    with pytest.raises(ConfigError, match="unknown config field 'algorithm.eps_low'; known"):  # no rename to point to
        load_config(DPOConfig, dpo_yaml, ["algorithm.eps_low=0.2"])


@pytest.mark.parametrize("command", [["-m", "llmalign", "grpo"], ["-m", "flowalign.train"]])
def test_a_renamed_field_is_one_line_and_exit_2_from_the_command_line(command):
    root = str(Path(__file__).parents[1])
    result = subprocess.run(
        [sys.executable, *command, "reward.params={}"],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["config error: config field 'reward.params' was renamed; use 'reward.kwargs'"]

"""Feed a few hundred generated bad configs to each recipe's validator (flow GRPO, text GRPO, DPO): each
must be refused with a ConfigError (one line naming a field), never crash with another exception."""

import dataclasses
import random
import typing

import pytest

from flowalign.config import FlowGRPOConfig
from llmalign.config import GRPOConfig
from llmalign.dpo_config import DPOConfig
from shared.config import ConfigError, load_config

VALID_BASE = {DPOConfig: ["data.train=pairs.jsonl"]}  # DPO has no default data: the base must load on its own
BAD_VALUES = ["abc", -1, 0, 1.5, True, None, [], {}, [1, "x"], {"k": "v"}, "1e400", -1e-9, 10**9, "", "[", "{a: 1}"]


def leaf_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            yield from leaf_fields(hints[field.name], prefix + field.name + ".")
        else:
            yield prefix + field.name


def generated_overrides(count, seed=0, recipe=FlowGRPOConfig):
    rng = random.Random(seed)
    fields = list(leaf_fields(recipe))
    for _ in range(count):
        kind = rng.random()
        if kind < 0.15:  # a misspelt key
            name = rng.choice(fields)
            yield [name[:-1] + rng.choice("xyz") + "=1"]
        elif kind < 0.25:  # a section given a scalar, or a scalar given a section
            yield [rng.choice(["train=3", "model=[1]", "train.group_size.x=1", "sampling={a: 1}", "log=[]"])]
        else:
            yield [f"{rng.choice(fields)}={value}" for value in rng.sample(BAD_VALUES, rng.randint(1, 3))]


@pytest.mark.parametrize("recipe", [FlowGRPOConfig, GRPOConfig, DPOConfig])
@pytest.mark.parametrize("chunk", range(4))
def test_fuzzed_configs_get_clean_errors(recipe, chunk):
    refused = 0
    for overrides in list(generated_overrides(400, seed=7, recipe=recipe))[chunk * 100 : (chunk + 1) * 100]:
        try:
            load_config(recipe, None, VALID_BASE.get(recipe, []) + overrides)
        except ConfigError as error:
            message = str(error)
            assert "\n" not in message and (
                "config field" in message
                or "override" in message
                or "unknown" in message
                or "config section" in message
            ), message
            refused += 1
    # a few generated values are valid by chance (e.g. train.seed=0, data.prompts=[]... is refused); most are refused
    assert refused >= 85, refused


@pytest.mark.parametrize("recipe", [FlowGRPOConfig, GRPOConfig, DPOConfig])
def test_the_unfuzzed_base_loads(recipe):
    assert isinstance(load_config(recipe, None, VALID_BASE.get(recipe, [])), recipe)

import subprocess
import sys
from pathlib import Path

import pytest

from flowalign.config import FlowGRPOConfig, FlowPreferenceConfig
from shared.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "flow").glob("*.yaml"))


def test_every_shipped_recipe_loads():
    preference = {"diffusion_dpo", "smpo"}  # flowalign/preference.py's recipes
    names = {
        path.stem: load_config(FlowPreferenceConfig if path.stem in preference else FlowGRPOConfig, path).algorithm
        for path in RECIPES
    }
    assert set(names) == {
        "flow_grpo",
        "mixgrpo",
        "mixgrpo_flash",
        "mixgrpo_guard",
        "mixgrpo_pairwise",
        "tempflow",  # the embedded default's recipes
        "diffusion_nft",
        *preference,
        "sd35_medium_pickscore",
        "sd35_medium_ocr",
        "flux_dev_mixgrpo",
        "qwen_image_mixgrpo",
        "wan2.1_t2v_1.3b_mixgrpo",
    }  # real models (dry run only)
    assert names["flux_dev_mixgrpo"].name == "mixgrpo" and names["sd35_medium_ocr"].name == "flow_grpo"
    assert names["diffusion_nft"].name == "diffusion_nft"
    assert names["mixgrpo_flash"].name == "mixgrpo" and names["mixgrpo_flash"].flash_ratio == 0.4
    assert names["diffusion_dpo"].name == "diffusion_dpo" and names["smpo"].name == "smpo"
    assert names["tempflow"].noise_aware_weighting
    assert names["mixgrpo_guard"].guard and not names["mixgrpo"].guard


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.group_size=1"], "config field 'train.group_size': 1 < 2"),
        (["train.learning_rate=-1e-4"], "config field 'train.learning_rate': -0.0001 must be positive"),
        (
            ["algorithm.name=mixgrpo", "algorithm.window_size=10"],
            "config field 'algorithm.window_size': 10 does not fit in 9",
        ),
        (["algorithm.flash_ratio=0.4"], "only MixGRPO has a Flash variant"),
        (
            ["algorithm.name=tempflow", "algorithm.branch_steps=subset", "algorithm.branch_subset=[9]"],
            "[9] outside 0..8",
        ),
        (["reward.weights={not_a_path: 1.0}"], "'not_a_path' is not 'module:name'"),
        (["sampling.noise_level=0"], "config field 'sampling.noise_level'"),
        (["train.iteratons=3"], "did you mean 'train.iterations'?"),
        (["budget.max_seconds=-1"], "config field 'budget.max_seconds': -1.0 must be positive or null"),
        (["train.learning_rate=.inf"], "config field 'train.learning_rate': inf is not a finite number"),
        (
            ["model.pipeline=wan", "sampling.num_frames=80"],
            "config field 'sampling.num_frames': 80 is not 4k + 1 (the Wan VAE's temporal compression is 4)",
        ),
        (["sampling.num_frames=5"], "config field 'sampling.num_frames': 5 is for videos (model.pipeline=wan)"),
        (["model.pipeline=hunyuan"], "config field 'model.pipeline'"),
    ],
)
def test_impossible_values_are_refused(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(FlowGRPOConfig, ROOT / "configs" / "flow" / "flow_grpo.yaml", overrides)
    assert message in str(info.value)


def test_video_settings_load_and_preference_refuses_video():
    config = load_config(
        FlowGRPOConfig, ROOT / "configs" / "flow" / "flow_grpo.yaml", ["model.pipeline=wan", "sampling.num_frames=13"]
    )
    assert config.sampling.num_frames == 13
    config.sampling.check_against_model({}, {"scale_factor_temporal": 4})  # 13 = 4 * 3 + 1
    with pytest.raises(ConfigError, match="'sampling.num_frames': 13 is not 8k . 1 .this VAE's temporal compression"):
        config.sampling.check_against_model({}, {"scale_factor_temporal": 8})  # a VAE read from its config.json
    with pytest.raises(ConfigError, match="config field 'model.pipeline': wan .video. is not supported by the pref"):
        load_config(FlowPreferenceConfig, ROOT / "configs" / "flow" / "diffusion_dpo.yaml", ["model.pipeline=wan"])


def test_cli_refuses_bad_config_with_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, "flowalign/train.py", "--config", "configs/flow/flow_grpo.yaml", "train.group_size=1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: config field 'train.group_size': 1 < 2; group advantages need at least 2 samples per prompt"
    ]


def test_accelerate_configs_parse():
    import yaml

    configs = {path.stem: yaml.safe_load(path.read_text()) for path in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert configs["cpu"]["use_cpu"] is True and configs["cpu"]["distributed_type"] == "NO"
    assert configs["multi_gpu"]["distributed_type"] == "MULTI_GPU"

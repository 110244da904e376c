"""Two-iteration runs of the flow recipe on a tiny pipeline built in the test (one per algorithm):
trainable parameters change, the saved LoRA loads into a fresh pipeline and reproduces the trained
transformer, and a resumed run ends bit-identical to an uninterrupted one."""

import json

import pytest
import torch

from flowalign.config import FlowGRPOConfig
from flowalign.toy import build_pipeline, build_tiny_components
from flowalign.train import train
from shared.checkpoint import latest_checkpoint, load_state
from shared.config import load_config

ALGORITHMS = {
    "flow_grpo": ["algorithm.name=flow_grpo", "algorithm.train_fraction=0.5"],
    "mixgrpo": ["algorithm.name=mixgrpo", "algorithm.window_size=2", "algorithm.window_interval=1", "train.ema_decay=0.5"],
    "mixgrpo_flash": ["algorithm.name=mixgrpo", "algorithm.window_size=1", "algorithm.flash_ratio=0.5"],
    "tempflow": ["algorithm.name=tempflow", "algorithm.branch_steps=subset", "algorithm.branch_subset=[0, 2]",
                 "algorithm.num_branches=2", "algorithm.noise_aware_weighting=true"],
}


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-sd3")
    build_pipeline(build_tiny_components(seed=0)).save_pretrained(directory)
    (directory / "flowalign.json").write_text(json.dumps({"max_sequence_length": 0}))  # no T5 tokens
    return directory


def tiny_config(pipeline_dir, out_dir, *extra):
    return load_config(FlowGRPOConfig, None, tiny_overrides(pipeline_dir, out_dir, *extra))


def tiny_overrides(pipeline_dir, out_dir, *extra):
    return [
        f"model.path={pipeline_dir}", "model.lora_rank=4", "model.lora_alpha=8",
        "sampling.num_steps=4", "sampling.eval_num_steps=3", "sampling.guidance_scale=2.0",
        "train.iterations=2", "train.prompts_per_iteration=2", "train.group_size=2", "train.micro_batch_size=3",
        "train.learning_rate=1e-2", "train.clip_range=0.2", "train.kl_beta=0.1",
        "data.prompts=[the digit one, the digit two, the digit three]", "data.eval_seeds=1",
        "reward.weights={flowalign.rewards:jpeg_incompressibility: 1.0}",
        f"log.output_dir={out_dir}", "log.eval_every=1", "log.checkpoint_every=1", *extra]


def lora_params(checkpoint):
    return load_state(checkpoint, "trainable")


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_two_iterations_train_and_save_loadable_lora(tiny_pipeline_dir, tmp_path, algorithm):
    config = tiny_config(tiny_pipeline_dir, tmp_path / "run", *ALGORITHMS[algorithm])
    result = train(config)
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint.name == "step-000002"
    first = load_state(tmp_path / "run" / "checkpoints" / "step-000001", "trainable")
    trained = lora_params(checkpoint)
    assert trained and all(name.endswith(".weight") and "lora_" in name for name in trained)
    # every LoRA B matrix starts at zero (peft's init) and must have moved; every tensor moved between iterations
    assert all(trained[name].abs().sum() > 0 for name in trained if "lora_B" in name)
    assert all(not torch.equal(first[name], trained[name]) for name in trained)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert set(result["after"]) == {"eval/flowalign.rewards:jpeg_incompressibility"}
    assert (tmp_path / "run" / "images" / "iter-000002.png").is_file()
    assert (tmp_path / "run" / "reward_curve.png").is_file()

    # the saved LoRA loads into a fresh pipeline with the diffusers API and reproduces the trained transformer
    from flowalign.adapters import SD3Adapter

    trained_adapter = SD3Adapter.from_pretrained(str(tiny_pipeline_dir))
    from flowalign.lora import load_trainable_state, make_trainable

    make_trainable(trained_adapter.transformer, True, 4, 8, config.model.lora_targets)
    load_trainable_state(trained_adapter.transformer, trained)
    fresh = SD3Adapter.from_pretrained(str(tiny_pipeline_dir))
    fresh.pipeline.load_lora_weights(str(checkpoint / "lora"))
    embeds = fresh.encode_prompts(["the digit one"])
    latents = torch.randn(1, *fresh.latent_shape(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained_adapter.velocity(latents, 0.5, embeds, 2.0)
        loaded = fresh.velocity(latents, 0.5, embeds, 2.0)
        base = SD3Adapter.from_pretrained(str(tiny_pipeline_dir)).velocity(latents, 0.5, embeds, 2.0)
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)
    assert (loaded - base).abs().max() > 1e-4  # and the LoRA really changes the model


def test_resume_after_interruption_is_bit_identical(tiny_pipeline_dir, tmp_path):
    extra = ["train.iterations=3", *ALGORITHMS["flow_grpo"]]
    train(tiny_config(tiny_pipeline_dir, tmp_path / "straight", *extra))
    # "interrupted" run: stop after 1 iteration (its checkpoint), then resume to 3
    train(tiny_config(tiny_pipeline_dir, tmp_path / "resumed", *[e for e in extra if "iterations" not in e],
                      "train.iterations=1"))
    train(tiny_config(tiny_pipeline_dir, tmp_path / "resumed", *extra), resume=True)
    straight = load_state(latest_checkpoint(tmp_path / "straight" / "checkpoints"), "trainable")
    resumed = load_state(latest_checkpoint(tmp_path / "resumed" / "checkpoints"), "trainable")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2, 3]


def test_flux_pipeline_trains_through_the_same_recipe(tmp_path):
    from diffusers import FluxPipeline

    from tests.test_flux_adapter import tiny_components

    pipeline_dir = tmp_path / "tiny-flux"
    FluxPipeline(**tiny_components(guidance_embeds=True)).save_pretrained(pipeline_dir)
    (pipeline_dir / "flowalign.json").write_text(json.dumps({"max_sequence_length": 8}))  # short T5 text: fast
    config = tiny_config(pipeline_dir, tmp_path / "run", "model.pipeline=flux", "algorithm.name=flow_grpo",
                         "train.kl_beta=0.0")
    train(config)
    first = load_state(tmp_path / "run" / "checkpoints" / "step-000001", "trainable")
    trained = load_state(latest_checkpoint(tmp_path / "run" / "checkpoints"), "trainable")
    assert trained and all(not torch.equal(first[name], trained[name]) for name in trained)
    fresh = FluxPipeline.from_pretrained(pipeline_dir)
    fresh.load_lora_weights(str(latest_checkpoint(tmp_path / "run" / "checkpoints") / "lora"))
    assert any("lora" in name for name, _ in fresh.transformer.named_parameters())


def test_time_budget_stops_evaluates_and_saves(tiny_pipeline_dir, tmp_path):
    result = train(tiny_config(tiny_pipeline_dir, tmp_path / "run", "train.iterations=50", "train.max_seconds=1e-6",
                               "log.eval_every=0", "log.checkpoint_every=0"))
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-000001"  # stopped after one iteration
    assert set(result["after"]) == {"eval/flowalign.rewards:jpeg_incompressibility"}


@pytest.mark.parametrize("algorithm", ["flow_grpo", "tempflow"])
def test_async_scoring_of_rollout_chunks_equals_sync(tiny_pipeline_dir, tmp_path, algorithm):
    """Scoring each chunk in a worker thread while the next samples changes timing, not results; chunked
    rollouts group and index their samples like one big rollout (checked through identical training)."""
    weights = {}
    for mode in ("false", "true"):
        out = tmp_path / mode
        train(tiny_config(tiny_pipeline_dir, out, *ALGORITHMS[algorithm], "train.prompts_per_iteration=3",
                          "train.rollout_chunks=2", f"reward.async_scoring={mode}", "log.eval_every=0"))
        weights[mode] = load_state(latest_checkpoint(out / "checkpoints"), "trainable")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["samples"] == 6  # 3 prompts x 2 (group size, or branches for tempflow)
    assert all(torch.equal(weights["false"][k], weights["true"][k]) for k in weights["false"])


def test_a_fresh_run_into_a_used_output_dir_exits_2_and_loses_nothing(tiny_pipeline_dir, tmp_path, capsys):
    from flowalign.train import main

    train(tiny_config(tiny_pipeline_dir, tmp_path, "train.iterations=1"))
    metrics = (tmp_path / "metrics.jsonl").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_overrides(tiny_pipeline_dir, tmp_path, "train.iterations=1"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "log.output_dir" in err and "--resume" in err and err.count("\n") == 1
    assert (tmp_path / "metrics.jsonl").read_text() == metrics

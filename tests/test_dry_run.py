"""--dry-run on both front ends: every shipped recipe passes it, the printed plan carries the numbers worked out
by hand from the YAML (global batch = prompts x group size, optimizer steps, world size, per-process share),
no weights load (every loader that could read them is replaced by one that fails the test), nothing touches the
network (HF_HUB_OFFLINE=1), and bad sources are one line with exit 2 (config) or 3 (reward)."""

import json
from pathlib import Path

import pytest

from flowalign import cli as flow_cli
from flowalign.cli import flow_grpo_main as flow_main
from llmalign.cli import main as llm_main

REPO = Path(__file__).resolve().parents[1]
FLOW_RECIPES = sorted(p.name for p in (REPO / "configs/flow").glob("*.yaml"))
LLM_RECIPES = sorted(p.name for p in (REPO / "configs/llm").glob("*.yaml"))


class WeightsLoaded(AssertionError):
    pass


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """Run from an empty directory with the hub offline; any call that would read model weights fails the test."""
    import diffusers
    import open_clip
    import safetensors.torch
    import transformers
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    def refuse(*args, **kwargs):
        raise WeightsLoaded(f"a dry run loaded weights: {args[:2]}")

    for owner in (
        transformers.PreTrainedModel,
        _BaseAutoModelClass,
        transformers.AutoModelForCausalLM,
        transformers.AutoConfig,
        transformers.AutoTokenizer,
        transformers.AutoProcessor,
        diffusers.DiffusionPipeline,
        diffusers.ModelMixin,
    ):  # each Auto class has its own copy
        monkeypatch.setattr(owner, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(open_clip, "create_model_and_transforms", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_flow_prompts(root: Path) -> None:
    """The prompt files the real-model recipes name (their headers say where the real ones come from)."""
    from flowalign.prompts import ocr_prompts

    files = {
        "data/pickscore/train.txt": ["a cat on a sofa", "a red bicycle", "a lighthouse at dusk"],
        "data/pickscore/test.txt": ["a bowl of fruit"],
        "data/hpdv2/train.txt": ["a castle in the clouds", "an astronaut riding a horse"],
        "data/ocr/train.txt": ocr_prompts("train"),
        "data/ocr/test.txt": ocr_prompts("eval"),
    }
    for name, lines in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("\n".join(lines) + "\n")


def write_long_sft_rows(root: Path) -> None:
    """configs/llm/arith_sft_long.yaml reads runs/arith_sft_long.jsonl, written by the command in its header."""
    from llmalign import toy
    from llmalign.data import write_rows

    (root / "runs").mkdir(exist_ok=True)
    rows = [
        {"prompt": p["prompt"], "completion": toy.solution(p, with_check=True)}
        for p in toy.make_split(toy.TRAIN_PROBLEMS, 0)
    ]
    write_rows(str(root / "runs/arith_sft_long.jsonl"), rows)


def write_levels_stage_one(root: Path) -> None:
    """configs/llm/arith_levels.yaml starts from stage 1's model (configs/llm/arith_levels_sft.yaml); the shipped
    toy's directory stands in for it (a dry run checks the directory, it loads no weights)."""
    from llmalign.toy import resolve_embedded

    (root / "runs/llm_arith_levels_sft").mkdir(parents=True, exist_ok=True)
    (root / "runs/llm_arith_levels_sft/final").symlink_to(resolve_embedded("embedded:arith"))


def write_pairs(root: Path, count: int) -> None:
    """configs/llm/arith_dpo.yaml reads runs/arith_pairs.jsonl (made by `llmalign pairs`)."""
    (root / "runs").mkdir(exist_ok=True)
    rows = [
        {"prompt": f"{i}+1=", "chosen": f"<answer>{i + 1}</answer>", "rejected": "<answer>0</answer>"}
        for i in range(count)
    ]
    (root / "runs/arith_pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def plan(capsys) -> dict[str, str]:
    """The printed plan as name -> value."""
    out = capsys.readouterr().out
    assert out.startswith("dry run:"), out
    return {name.strip(): value.strip() for name, _, value in (line.partition(" : ") for line in out.splitlines()[1:])}


def exit_code(run, argv) -> int:
    with pytest.raises(SystemExit) as raised:
        run(argv)
    return raised.value.code


@pytest.mark.parametrize("recipe", FLOW_RECIPES)
def test_every_flow_recipe_passes_dry_run(recipe, no_weights, capsys):
    write_flow_prompts(no_weights)
    flow_cli.main(["train", str(REPO / "configs/flow" / recipe), "--dry-run"])  # routed by the YAML's recipe: key
    rows = plan(capsys)
    assert rows["world size"] == "1" and rows["rewards"]


# (recipe, world size, prompts, group, optimizer steps, update rows per iteration): worked out from each YAML by hand
FLOW_NUMBERS = [
    ("sd35_medium_pickscore.yaml", 8, 48, 24, 1000 * 2, 48 * 24 * 9),  # 9 noisy steps of 10, all trained
    ("sd35_medium_ocr.yaml", 4, 48, 24, 1000 * 2, 48 * 24 * 9),
    ("flux_dev_mixgrpo.yaml", 4, 32, 12, 300 * 4, 32 * 12 * 4),  # a window of 4 of the 24 noisy steps
    ("qwen_image_mixgrpo.yaml", 4, 32, 12, 300 * 4, 32 * 12 * 4),  # the same window on Qwen-Image
    ("wan2.1_t2v_1.3b_mixgrpo.yaml", 8, 16, 8, 300 * 4, 16 * 8 * 4),  # the same window on 81-frame videos
    ("flow_grpo.yaml", 2, 10, 8, 200 * 2, 10 * 8 * 9),
]


@pytest.mark.parametrize("recipe,world,prompts,group,steps,rows_per_iteration", FLOW_NUMBERS)
def test_flow_plan_numbers(recipe, world, prompts, group, steps, rows_per_iteration, no_weights, capsys, monkeypatch):
    write_flow_prompts(no_weights)
    monkeypatch.setenv("WORLD_SIZE", str(world))  # as accelerate launch --num_processes N sets it
    flow_main(["--config", str(REPO / "configs/flow" / recipe), "--dry-run"])
    rows = plan(capsys)
    assert rows["world size"] == str(world)
    assert rows["global batch"] == f"{prompts} prompts x {group} samples = {prompts * group} samples per iteration"
    assert rows["per process"] == f"{prompts // world} prompts, {prompts * group // world} samples"
    assert rows["optimizer steps"].startswith(f"{steps} (")
    assert rows["update rows"] == f"{rows_per_iteration} (sample, step) rows per iteration"


def test_video_recipe_plan_names_its_frames(no_weights, capsys):
    write_flow_prompts(no_weights)
    flow_main(["--config", str(REPO / "configs/flow/wan2.1_t2v_1.3b_mixgrpo.yaml"), "--dry-run"])
    rows = plan(capsys)
    assert rows["model"].endswith("pipeline wan")
    assert rows["sampling"] == "noise level 0.7 (flow_grpo), guidance 5, 480 x 832 px, 81 frames"


def test_flow_dry_run_refuses_a_batch_that_does_not_split(no_weights, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # flow_grpo.yaml's 10 prompts do not split over 4 processes
    assert exit_code(flow_main, ["--config", str(REPO / "configs/flow/flow_grpo.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.prompts_per_iteration" in err and "10 prompts do not split over 4 processes" in err


def test_flow_plan_reports_the_paper_settings(no_weights, capsys):
    write_flow_prompts(no_weights)
    flow_main(["--config", str(REPO / "configs/flow/sd35_medium_ocr.yaml"), "--dry-run"])
    rows = plan(capsys)
    assert rows["model"].startswith("stabilityai/stable-diffusion-3.5-medium (hub id: form checked, not downloaded")
    assert rows["optimizer"] == "AdamW lr 0.0003, clip 0.0001, KL beta 0.04 (flow_grpo)"
    assert rows["sampling"] == "noise level 0.7 (flow_grpo), guidance 4.5, 512 x 512 px"
    assert rows["trainable"].startswith("LoRA r 32 alpha 64")
    assert rows["train prompts"] == "2096 prompts from data/ocr/train.txt"  # read in full: 16 templates x 131 words
    assert rows["eval prompts"] == "924 prompts from data/ocr/test.txt"


@pytest.mark.parametrize(
    "override,field",
    [
        ("model.path=org//bad id", "model.path"),  # neither a local path nor a hub id
        ("model.path=./no_such_pipeline", "model.path"),  # a local path that is missing
        ("data.prompts_file=missing.txt", "data.prompts_file"),
        ("data.prompts_dataset=bad//id", "data.prompts_dataset"),
    ],
)
def test_flow_dry_run_refuses_bad_sources(override, field, no_weights, capsys):
    code = exit_code(flow_main, ["--config", str(REPO / "configs/flow/flow_grpo.yaml"), "--dry-run", override])
    err = capsys.readouterr().err
    assert code == 2 and field in err and len(err.strip().splitlines()) == 1, err


def test_flow_dry_run_reports_a_hub_prompt_dataset_without_loading_it(no_weights, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("a dry run downloaded a dataset"))
    flow_main(
        [
            "--config",
            str(REPO / "configs/flow/flow_grpo.yaml"),
            "--dry-run",
            "data.prompts_dataset=org/prompts",
            "data.prompts_column=caption",
        ]
    )
    assert plan(capsys)["train prompts"] == (
        "hub dataset org/prompts, split train, column caption (form checked, not downloaded)"
    )


def test_flow_dry_run_checks_reward_signatures(no_weights, capsys):
    write_flow_prompts(no_weights)
    code = exit_code(
        flow_main,
        [
            "--config",
            str(REPO / "configs/flow/flow_grpo.yaml"),
            "--dry-run",
            "reward.weights={flowalign.rewards.models:no_such_reward: 1.0}",
        ],
    )
    assert code == 3 and "no_such_reward" in capsys.readouterr().err
    code = exit_code(
        flow_main,
        [
            "--config",
            str(REPO / "configs/flow/sd35_medium_pickscore.yaml"),
            "--dry-run",
            "reward.kwargs={flowalign.rewards.models:pickscore: {model: x, colour: red}}",
        ],
    )
    assert code == 3 and "colour" in capsys.readouterr().err  # the factory refuses the argument, before any model


@pytest.mark.parametrize("recipe", LLM_RECIPES)
def test_every_llm_recipe_passes_dry_run(recipe, no_weights, capsys):
    write_pairs(no_weights, 10)
    write_long_sft_rows(no_weights)
    write_levels_stage_one(no_weights)
    judge = no_weights / "runs/llm_arith_rm_gpm/final"  # arith_gpo.yaml's judge: only its kind is read
    judge.mkdir(parents=True, exist_ok=True)
    (judge / "reward_model.json").write_text(json.dumps({"kind": "gpm", "dim": 2, "tau": 0.1, "normalize": False}))
    llm_main(["train", str(REPO / "configs/llm" / recipe), "--dry-run"])  # routed by the YAML's recipe: key
    assert plan(capsys)["world size"] == "1"


# (recipe, prompts, group, optimizer steps): worked out from each YAML by hand
LLM_NUMBERS = [
    ("open_rs_1.5b.yaml", 12, 6, 500),  # 500 iterations x 1 pass x 1 update
    ("qwen2.5_math_dapo.yaml", 512, 16, 540 * 16),  # 512 / 32 = 16 updates per rollout
    ("arith.yaml", 32, 8, 300),
]


@pytest.mark.parametrize("recipe,prompts,group,steps", LLM_NUMBERS)
def test_grpo_plan_numbers(recipe, prompts, group, steps, no_weights, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    llm_main(["grpo", "--config", str(REPO / "configs/llm" / recipe), "--dry-run"])
    rows = plan(capsys)
    assert rows["world size"] == "4"
    assert rows["global batch"] == f"{prompts} prompts x {group} completions = {prompts * group} per iteration"
    assert rows["per process"] == f"{prompts // 4} prompts, {prompts * group // 4} completions"
    assert rows["optimizer steps"].startswith(f"{steps} (")
    if recipe == "qwen2.5_math_dapo.yaml":  # 16 steps per rollout: the old log-probs are needed before them
        assert (
            rows["old log-probs"]
            == "recomputed every iteration (16 optimizer steps per rollout); ratio checked each time"
        )
    else:  # one step per rollout: recomputed only to check the ratio
        assert rows["old log-probs"] == (
            "the update's forward, detached; recomputed to check the ratio at iterations 1, 11, 21, ... "
            "(log.ratio_check_every)"
        )


def test_grpo_plan_reports_hub_sources_and_rewards(no_weights, capsys):
    llm_main(["grpo", "--config", str(REPO / "configs/llm/open_rs_1.5b.yaml"), "--dry-run"])
    rows = plan(capsys)
    assert rows["model"].startswith("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (hub id: form checked, not downloaded")
    assert rows["train data"].startswith(
        "hub dataset knoveleng/open-rs, split train, columns prompt <- problem, answer <- answer"
    )
    assert rows["rewards"].startswith("format x 1; cosine_length x 2")  # experiment 3: cosine replaces accuracy
    assert rows["tokens"] == "prompt <= 512, completion <= 3584 (temperature 0.7)"
    assert rows["optimizer"] == "AdamW lr 1e-06, weight decay 0"


def test_grpo_dry_run_reads_local_data_in_full(no_weights, capsys):
    llm_main(["grpo", "--config", str(REPO / "configs/llm/arith.yaml"), "--dry-run"])
    from llmalign.data import load_rows
    from llmalign.toy import resolve_embedded

    expected = len(load_rows(resolve_embedded("embedded:arith/train.jsonl")))
    assert plan(capsys)["train data"] == f"{expected} rows from embedded:arith/train.jsonl"


def test_dpo_plan_steps_from_the_pairs(no_weights, capsys, monkeypatch):
    write_pairs(no_weights, 10)
    monkeypatch.setenv("WORLD_SIZE", "2")
    llm_main(["dpo", "--config", str(REPO / "configs/llm/arith_dpo.yaml"), "--dry-run"])
    rows = plan(capsys)
    assert rows["optimizer steps"] == "5 (ceil(16 epochs x 10 pairs / 32))"  # arith_dpo: epochs 16, batch 32
    assert rows["global batch"] == "32 pairs per optimizer step" and rows["per process"] == "16 pairs"


def test_rm_plan_steps_from_the_embedded_pairs(no_weights, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    llm_main(["rm", "--config", str(REPO / "configs/llm/arith_rm_gpm.yaml"), "--dry-run"])
    rows = plan(capsys)
    assert rows["optimizer steps"] == "750 (ceil(16 epochs x 1500 pairs / 32))"  # arith_rm_gpm: epochs 16, batch 32
    assert rows["global batch"] == "32 pairs per optimizer step" and rows["per process"] == "16 pairs"
    assert rows["held-out data"] == "200 rows from embedded:arith/rm/answers_test.jsonl"
    assert rows["algorithm"] == "rm[gpm] (gpm: 2 outputs, tau 0.1, normalize False)"


def test_iterate_plan_on_two_processes_and_a_batch_that_does_not_split(no_weights, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    llm_main(["iterate", "--config", str(REPO / "configs/llm/arith_iterate.yaml"), "--dry-run"])
    rows = plan(capsys)
    assert rows["world size"] == "2" and rows["global batch"] == "32 pairs per DPO step, 16 per process"
    monkeypatch.setenv("WORLD_SIZE", "3")  # arith_iterate.yaml's 32 pairs per DPO step do not split over 3
    assert exit_code(llm_main, ["iterate", "--config", str(REPO / "configs/llm/arith_iterate.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size" in err and "32 pairs do not split over 3 processes" in err


@pytest.mark.parametrize(
    "command,override,field,code",
    [
        ("grpo", "model.path=org//bad id", "model.path", 2),
        ("grpo", "model.path=./no_such_model", "model.path", 2),
        ("grpo", "data.path=bad//id", "data.path", 2),
        ("grpo", "reward.weights={mypkg_missing.rewards:score: 1.0}", "mypkg_missing", 3),
        ("dpo", "model.path=/no/such/model", "model.path", 2),
    ],
)
def test_llm_dry_run_refuses_bad_sources(command, override, field, code, no_weights, capsys):
    write_pairs(no_weights, 10)
    recipe = "arith_dpo.yaml" if command == "dpo" else "arith.yaml"
    assert exit_code(llm_main, [command, "--config", str(REPO / "configs/llm" / recipe), "--dry-run", override]) == code
    err = capsys.readouterr().err
    assert field in err and len(err.strip().splitlines()) == 1, err


def test_the_weight_guard_would_catch_a_load(no_weights):
    """The fixture's guard is live: the loaders a training run calls fail under it."""
    import transformers

    with pytest.raises(WeightsLoaded):
        transformers.AutoModelForCausalLM.from_pretrained("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    with pytest.raises(WeightsLoaded):
        from flowalign.rewards.models import pickscore

        import torch

        pickscore("yuvalkirstain/PickScore_v1")(torch.zeros(1, 3, 8, 8), ["a cat"], [{}])


@pytest.mark.parametrize("recipe", ["sd35_medium_pickscore.yaml", "sd35_medium_ocr.yaml"])
def test_sd35_lora_targets_name_sd3_modules(recipe):
    """The official LoRA targets (attn.add_q_proj, attn.to_add_out, ...) match modules of an SD3 transformer: checked
    on the embedded SD3 pipeline's weightless copy, the same joint-attention block names as SD3.5."""
    from flowalign.config import FlowGRPOConfig
    from flowalign.lora import check_lora_targets
    from flowalign.toy import ensure_digits_pipeline
    from shared.config import ConfigError, load_config

    targets = load_config(FlowGRPOConfig, REPO / "configs/flow" / recipe).model.lora_targets
    assert "attn.add_q_proj" in targets and len(targets) == 8
    for target in targets:  # one at a time: peft refuses a target list only when none of it matches
        check_lora_targets(ensure_digits_pipeline(), [target])
    with pytest.raises(ConfigError):
        check_lora_targets(ensure_digits_pipeline(), ["attn.no_such_proj"])


def test_dry_runs_check_eval_rewards(no_weights, capsys):
    """eval.rewards are reward signatures too: a missing one is exit 3 in both front ends, before any weights."""
    code = exit_code(
        flow_main,
        [
            "--config",
            str(REPO / "configs/flow/flow_grpo.yaml"),
            "--dry-run",
            "eval.rewards={flowalign.rewards.models:no_such_scorer: {}}",
        ],
    )
    assert code == 3 and "no_such_scorer" in capsys.readouterr().err
    code = exit_code(
        llm_main,
        [
            "grpo",
            "--config",
            str(REPO / "configs/llm/arith.yaml"),
            "--dry-run",
            "eval.rewards={mypkg_missing.rewards:score: {}}",
        ],
    )
    assert code == 3 and "eval.rewards" in capsys.readouterr().err
    llm_main(["grpo", "--config", str(REPO / "configs/llm/arith.yaml"), "--dry-run", "eval.rewards={format: {}}"])
    assert plan(capsys)["eval rewards"] == "format"

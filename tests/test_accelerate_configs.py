"""The accelerate configs in configs/accelerate/: each file goes through accelerate's own loader and launcher
argument handling (what `accelerate launch --config_file` does before it starts anything), and the CPU ones
really start processes.

On a machine without GPUs accelerate 1.15 never selects FSDP or DeepSpeed (the processes of fsdp.yaml run as
MULTI_CPU DDP), so the FSDP step test forces accelerate's FSDP path with the plugin accelerate builds from
fsdp.yaml's launcher environment; DeepSpeed is not installed here and is checked as far as its plugin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

FSDP_WRAPPED = {  # model class -> transformer blocks fsdp.yaml wraps (the model's `_no_split_modules`)
    "SD3Transformer2DModel": {"JointTransformerBlock"},
    "FluxTransformer2DModel": {"FluxTransformerBlock", "FluxSingleTransformerBlock"},
    "Qwen2ForCausalLM": {"Qwen2DecoderLayer"},
}

# file -> (distributed_type, num_processes, mixed_precision, use_cpu, fsdp_config subset, deepspeed_config subset)
EXPECTED = {
    "cpu.yaml": (DistributedType.NO, 1, "no", True, {}, {}),
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2, "no", True, {}, {}),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 8, "bf16", False, {}, {}),
    "fsdp.yaml": (
        DistributedType.FSDP,
        8,
        "bf16",
        False,
        {
            "fsdp_version": 1,
            "fsdp_reshard_after_forward": "FULL_SHARD",
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_use_orig_params": True,
            "fsdp_offload_params": False,
            "fsdp_sync_module_states": False,
            "fsdp_cpu_ram_efficient_loading": False,
        },
        {},
    ),
    "deepspeed_zero2.yaml": (
        DistributedType.DEEPSPEED,
        8,
        "bf16",
        False,
        {},
        {"zero_stage": 2, "offload_optimizer_device": "none", "offload_param_device": "none", "gradient_clipping": 1.0},
    ),
    "deepspeed_zero3.yaml": (
        DistributedType.DEEPSPEED,
        8,
        "bf16",
        False,
        {},
        {
            "zero_stage": 3,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            "gradient_clipping": 1.0,
            "zero3_save_16bit_model": True,
            "zero3_init_flag": False,
        },
    ),
}


def _env(**extra) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
        **extra,
    }


def _launch(config: str, script: Path, *args: str, options: tuple = (), timeout: float = 120):
    command = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(CONFIGS / config),
        "--num_cpu_threads_per_process",
        "1",
        *options,
        str(script),
        *args,
    ]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _launcher_env(config: str, *options: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG OPTIONS` gives its processes (computed by accelerate's
    own argument handling; nothing is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / config), *options, "script.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


# ----------------------------------------------------------------------------------------------- the files
def test_every_config_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_fields(name):
    distributed_type, processes, precision, use_cpu, fsdp, deepspeed = EXPECTED[name]
    config = load_config_from_file(str(CONFIGS / name))  # accelerate's loader: refuses unknown keys
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == distributed_type
    assert (config.num_processes, config.num_machines, config.mixed_precision, config.use_cpu) == (
        processes,
        1,
        precision,
        use_cpu,
    )
    assert {k: config.fsdp_config.get(k) for k in fsdp} == fsdp
    assert {k: config.deepspeed_config.get(k) for k in deepspeed} == deepspeed
    if not fsdp:
        assert config.fsdp_config == {}
    if not deepspeed:
        assert config.deepspeed_config == {}
    # one class list for SD3, FLUX and Qwen2 would fail for each ("Could not find the transformer layer class")
    assert "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config
    first = (CONFIGS / name).read_text().splitlines()[0]
    assert first.startswith(f"# accelerate launch --config_file configs/accelerate/{name} "), first


# ----------------------------------------------------------------------------------------------- launcher environment
def _tiny_models():
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    qwen = lambda: Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
        )
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return {
        "SD3Transformer2DModel": SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=8,
            out_channels=4,
            pos_embed_max_size=8,
        ),
        "FluxTransformer2DModel": FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=8,
            axes_dims_rope=(2, 2, 4),
        ),
        "Qwen2ForCausalLM": qwen(),
        "PeftModel(Qwen2ForCausalLM)": get_peft_model(qwen(), lora),
    }


def test_fsdp_plugin_from_launcher_env(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import ShardingStrategy, StateDictType

    env = _launcher_env("fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    models = _tiny_models()
    for name, model in models.items():
        plugin = FullyShardedDataParallelPlugin()  # what Accelerator() builds in each process (on GPUs)
        assert plugin.fsdp_version == 1 and plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
        assert plugin.use_orig_params is True and plugin.sync_module_states is False
        assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
        assert plugin.cpu_offload.offload_params is False
        plugin.set_auto_wrap_policy(model)  # accelerate's own resolution of the wrapped classes
        wrapped = {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]}
        assert wrapped == FSDP_WRAPPED[name.removeprefix("PeftModel(").rstrip(")")], name

    # the FSDP2 override named in fsdp.yaml's header gives a valid FSDP2 plugin
    for key, value in _launcher_env("fsdp.yaml", "--fsdp_version", "2", "--fsdp_reshard_after_forward", "true").items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_plugin_from_launcher_env(monkeypatch, stage):
    """DeepSpeed itself is not installed here; accelerate builds its plugin (the DeepSpeed JSON config) without it."""
    from accelerate.utils import DeepSpeedPlugin

    env = _launcher_env(f"deepspeed_zero{stage}.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = DeepSpeedPlugin().deepspeed_config
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"
    assert config["gradient_clipping"] == 1.0 and config["gradient_accumulation_steps"] == 1
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) is (stage == 3)


# ----------------------------------------------------------------------------------------------- real launches
WORLD_SCRIPT = """
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

accelerator = Accelerator(cpu=not torch.cuda.is_available())  # as shared/run.py does
total = accelerator.reduce(torch.tensor([accelerator.process_index + 1.0], device=accelerator.device), "sum")
# a file per rank: two processes' lines on one stdout pipe can interleave
Path(sys.argv[1], f"rank{accelerator.process_index}.txt").write_text(
    f"WORLD rank={accelerator.process_index} world={accelerator.num_processes} "
    f"type={accelerator.distributed_type.name} backend={accelerator.state.backend} sum={int(total.item())}")
torch.distributed.destroy_process_group()  # leaving without it can abort a gloo process at exit
"""


def test_cpu_2proc_starts_two_processes(tmp_path):
    script = tmp_path / "world.py"
    script.write_text(WORLD_SCRIPT)
    _launch("cpu_2proc.yaml", script, str(tmp_path))
    lines = [path.read_text() for path in sorted(tmp_path.glob("rank*.txt"))]
    assert lines == [f"WORLD rank={rank} world=2 type=MULTI_CPU backend=gloo sum=3" for rank in (0, 1)]


FSDP_SCRIPT = """
import json, os, sys
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import Qwen2Config, Qwen2ForCausalLM

from shared.checkpoint import load_state, save_state
from shared.run import Run
from tests.multiproc import force_fsdp_on_cpu

out = Path(sys.argv[1])
run = Run(None, resume=False, tag="[fsdp]")  # the trainers' checkpoint state goes through its methods
accelerator = run.accelerator
assert accelerator.distributed_type == DistributedType.MULTI_CPU  # accelerate's choice on CPU: FSDP is not used
force_fsdp_on_cpu(accelerator)  # accelerate's FSDP path, with the plugin it builds from fsdp.yaml
rank, world = accelerator.process_index, accelerator.num_processes


def build(lora: bool, shift: float = 0.0):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    with torch.no_grad():  # a resumed run starts from other trainable values: the checkpoint must replace them
        for p in model.parameters():
            if p.requires_grad:
                p.add_(shift)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


batch = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(1))
mine = batch[rank * 4 // world:(rank + 1) * 4 // world]  # this rank's rows; gradients are averaged over ranks
report = {}
for lora in (False, True):
    tag = "lora" if lora else "full"
    model, optimizer = accelerator.prepare(*build(lora))
    accelerator.backward(model(input_ids=mine, labels=mine).loss)
    optimizer.step(); optimizer.zero_grad()
    step1 = run.trainable_state(model)  # full (unsharded), by parameter name
    optim = run.optimizer_state(model, optimizer)
    ckpt = out / tag
    if rank == 0:  # the checkpoint: safetensors + JSON, no pickle
        ckpt.mkdir(parents=True)
        save_state(ckpt, "trainable", step1)
        save_state(ckpt, "optimizer", optim)
    accelerator.wait_for_everyone()
    # resume: a fresh model and optimizer, every rank reads the full state from the files
    model2, optimizer2 = accelerator.prepare(*build(lora, shift=1.0))
    run.load_trainable(model2, load_state(ckpt, "trainable"))
    run.load_optimizer(model2, optimizer2, load_state(ckpt, "optimizer"))
    accelerator.backward(model2(input_ids=mine, labels=mine).loss)
    optimizer2.step()
    step2 = run.trainable_state(model2)
    if rank == 0:
        ref, ref_opt = build(lora)  # one process, no FSDP, the whole batch
        diffs = []
        for state in (step1, step2):
            ref(input_ids=batch, labels=batch).loss.backward()
            ref_opt.step(); ref_opt.zero_grad()
            expected = {n: p.detach() for n, p in ref.named_parameters() if p.requires_grad}
            assert sorted(state) == sorted(expected), (sorted(state)[:3], sorted(expected)[:3])
            diffs.append(max((state[n] - expected[n]).abs().max().item() for n in expected))
        report[tag] = {"wrapper": type(model).__name__, "resumed_wrapper": type(model2).__name__,
                       "tensors": len(step1), "optimizer_entries": len(optim["state"]),
                       "diff_step1": diffs[0], "diff_step2_after_resume": diffs[1]}
if rank == 0:
    (out / "report.json").write_text(json.dumps(report))
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
"""


def test_fsdp_two_process_step_matches_single_process(tmp_path):
    """fsdp.yaml on 2 CPU processes (accelerate's FSDP1 path, forced): one step of full fine-tuning and of LoRA,
    gathered to full trainable + optimizer state, saved as safetensors + JSON, loaded into a fresh model and
    optimizer, one more step; both equal one process without FSDP."""
    script = tmp_path / "fsdp_step.py"
    script.write_text(FSDP_SCRIPT)
    _launch(
        "fsdp.yaml",
        script,
        str(tmp_path / "out"),
        timeout=180,
        options=("--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"),
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for tag in ("full", "lora"):
        assert report[tag]["wrapper"] == report[tag]["resumed_wrapper"] == "FullyShardedDataParallel", report
    assert report["full"]["tensors"] == report["full"]["optimizer_entries"] == 27  # every parameter
    assert report["lora"]["tensors"] == report["lora"]["optimizer_entries"] == 8  # lora_A/B of q, v in 2 layers
    for tag in ("full", "lora"):
        assert report[tag]["diff_step1"] < 1e-5, report
        assert report[tag]["diff_step2_after_resume"] < 1e-5, report

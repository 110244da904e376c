"""`python flowalign/train.py --config ... --dry-run`: check a flow recipe and print its plan, loading no weights.

Checks, each a one-line ConfigError (exit 2) or RewardError (exit 3) as training would raise it:
  - the config (load_config already validated its fields);
  - model.path: the embedded pipeline, an existing local directory, or a well-formed hub id (form only: no
    download, no network);
  - the prompts: data.prompts / data.prompts_file / a local data.prompts_dataset are read in full, as training
    reads them; a hub data.prompts_dataset is checked by form and reported, not downloaded;
  - each reward (and each of eval.rewards) through load_reward, the loader training uses: importable, its
    factory accepts its kwargs, the reward accepts (images, prompts, metadata). The learned scorers
    (flowalign.rewards.models, the OCR reward, the digit classifier) load their models on the first call, so no
    weights load here;
  - the global batch splits over the processes (WORLD_SIZE, as set by accelerate launch).
"""

from __future__ import annotations

import math
from pathlib import Path

from flowalign.config import EMBEDDED_MODEL, FlowGRPOConfig
from flowalign.data import (
    prompt_lines,
    read_pairs_file,
    read_prompts,
)  # the readers training uses: same checks, same messages
from flowalign.rewards.plugins import load_reward
from shared.config import ConfigError
from shared.plan import describe_source, format_plan, hub_id_problem, require_divisible, world_size


def _prompt_source(config: FlowGRPOConfig) -> tuple[str, str]:
    """(training prompts, evaluation prompts) as plan lines; local sources are read in full."""
    d = config.data
    if d.prompts_dataset and not Path(d.prompts_dataset).expanduser().exists():
        problem = hub_id_problem(d.prompts_dataset)
        if problem is not None:
            raise ConfigError(
                f"config field 'data.prompts_dataset': {d.prompts_dataset!r} is neither a local "
                f"dataset nor a hub id ({problem}); give a file, a directory or org/name"
            )
        hub = (
            f"hub dataset {d.prompts_dataset}, split {d.prompts_split}, column {d.prompts_column} (form checked, "
            f"not downloaded)"
        )
        if d.eval_split:
            return hub, f"split {d.eval_split} of the hub dataset (not downloaded)"
        eval_prompts = read_eval_only(config)
        return hub, f"{len(eval_prompts)} prompts" if eval_prompts else "the training prompts"
    prompts, eval_prompts = read_prompts(config)
    source = d.prompts_file or d.prompts_dataset or "data.prompts"
    eval_source = d.eval_prompts_file or (
        f"split {d.eval_split}" if d.eval_split else "data.eval_prompts" if d.eval_prompts else "the training prompts"
    )
    return f"{len(prompts)} prompts from {source}", f"{len(eval_prompts)} prompts from {eval_source}"


def read_eval_only(config: FlowGRPOConfig) -> list[str]:
    """The evaluation prompts of data.eval_prompts / data.eval_prompts_file, for a hub training dataset."""
    d = config.data
    return prompt_lines(d.eval_prompts_file, "data.eval_prompts_file") if d.eval_prompts_file else list(d.eval_prompts)


def plan_rows(config: FlowGRPOConfig) -> list[tuple[str, object]]:
    """Check the recipe (see the module docstring) and return its plan as (name, value) rows."""
    m, s, a, t, r = config.model, config.sampling, config.algorithm, config.train, config.reward
    mem = config.memory
    world = world_size()
    require_divisible(t.prompts_per_iteration, world, "train.prompts_per_iteration", "prompts")
    model = describe_source(m.path, "model.path", embedded=EMBEDDED_MODEL, kind="pipeline")
    train_prompts, eval_prompts = _prompt_source(config)
    rewards = []
    for path, weight in r.weights.items():
        load_reward(path, r.kwargs.get(path))  # import, factory(kwargs), signature; scorers load on first call
        rewards.append(f"{path} x {weight:g}" + (f" {r.kwargs[path]}" if path in r.kwargs else ""))
    for path, kwargs in config.eval.rewards.items():  # scored on evaluation samples only; checked alike
        load_reward(path, kwargs or None)
    per_prompt = a.num_branches if a.name == "tempflow" else t.group_size
    samples = t.prompts_per_iteration * per_prompt
    noisy = s.num_steps - 1  # the last step lands on sigma = 0 and has no noise
    if a.name == "mixgrpo":
        trained = (
            f"{a.window_size} of {noisy} (window moves {a.window_stride} every {a.window_interval} iterations, "
            f"{a.window_mode})"
        )
        rows_per_sample = a.window_size
    elif a.name == "flow_grpo":
        rows_per_sample = max(1, math.ceil(a.train_fraction * noisy))
        trained = f"{rows_per_sample} of {noisy}"
    elif a.name == "diffusion_nft":
        rows_per_sample = max(1, int(a.train_fraction * s.num_steps))  # flowalign/nft.py's levels_per_sample
        trained = f"ODE samples, each forward-noised at {rows_per_sample} of the {s.num_steps} noise levels"
    else:
        rows_per_sample = None
        trained = f"branch steps: {a.branch_steps}" + (f" {a.branch_subset}" if a.branch_steps == "subset" else "")
    size = f"{s.height or 'default'} x {s.width or 'default'} px" + (
        f", {s.num_frames or 'default'} frames" if m.pipeline == "wan" else ""
    )
    rows: list[tuple[str, object]] = [
        ("algorithm", a.name),
        ("model", f"{model}, pipeline {m.pipeline}"),
        ("train prompts", train_prompts),
        ("eval prompts", eval_prompts),
        ("rewards", "; ".join(rewards) + f" ({r.composition})"),
        ("eval rewards", "; ".join(config.eval.rewards) or "none"),
        ("world size", world),
        ("global batch", f"{t.prompts_per_iteration} prompts x {per_prompt} samples = {samples} samples per iteration"),
        ("per process", f"{t.prompts_per_iteration // world} prompts, {samples // world} samples"),
        ("denoising steps", f"{s.num_steps} (eval {s.eval_num_steps}); trained per sample: {trained}"),
    ]
    if rows_per_sample is not None:
        rows.append(("update rows", f"{samples * rows_per_sample} (sample, step) rows per iteration"))
    rows += [
        ("iterations", t.iterations),
        ("optimizer steps", f"{t.iterations * a.updates_per_pass} ({a.updates_per_pass} per iteration)"),
        ("optimizer", f"AdamW lr {t.learning_rate:g}, " + _loss_line(config)),
        ("policy loss", _policy_loss_name(a)),
        ("sampling", f"noise level {s.noise_level:g} ({s.sde_kind}), guidance {s.guidance_scale:g}, {size}"),
        (
            "trainable",
            f"LoRA r {m.lora_rank} alpha {m.lora_alpha} on {m.lora_targets}" if m.lora else "full transformer",
        ),
        (
            "memory",
            f"dtype {m.dtype}, mixed precision {mem.mixed_precision}, micro batch {mem.micro_batch_size} rows, "
            f"gradient checkpointing {mem.gradient_checkpointing}, rollout chunks {t.rollout_chunks}, "
            f"text encoders offloaded {m.offload_text_encoders}, EMA {t.ema_decay}",
        ),
        ("output", config.log.output_dir),
    ]
    return rows


def _policy_loss_name(a) -> str:
    if a.name == "diffusion_nft":
        return "DiffusionNFT (implicit positive and negative velocities on the forward process)"
    return f"GRPO-Guard ({a.guard_average})" if a.guard else "Flow-GRPO clipped ratio"


def _loss_line(config: FlowGRPOConfig) -> str:
    a = config.algorithm
    if a.name == "diffusion_nft":
        return (
            f"NFT beta {a.nft_beta:g}, adaptive weighting {a.nft_adaptive_weighting}, advantage clip "
            f"{a.advantage_clip:g}, velocity-gap KL beta {a.kl_beta:g}, old policy decay min({a.nft_old_decay_rate:g} "
            f"x (steps - {a.nft_old_decay_start}), {a.nft_old_decay_max:g})"
        )
    return f"clip {a.clip_range:g}, KL beta {a.kl_beta:g} ({a.kl_form})"


def dry_run(config: FlowGRPOConfig) -> None:
    """Print the checked plan (see the module docstring); raises as training would on a bad recipe."""
    title = "dry run: config, model source, prompts and rewards checked; no weights loaded"
    print(format_plan(title, plan_rows(config)))


def preference_plan_rows(config) -> list[tuple[str, object]]:
    """The checks of `plan_rows` for a `FlowPreferenceConfig` (flowalign/preference.py), the pairs file read in
    full as training reads it, and its plan as (name, value) rows."""
    m, s, a, t, r = config.model, config.sampling, config.algorithm, config.train, config.reward
    world = world_size()
    require_divisible(t.prompts_per_iteration, world, "train.prompts_per_iteration", "prompts")
    model = describe_source(m.path, "model.path", embedded=EMBEDDED_MODEL, kind="pipeline")
    train_prompts, eval_prompts = _prompt_source(config)
    for path in [*r.weights, *config.eval.rewards]:
        load_reward(path, r.kwargs.get(path) if path in r.weights else config.eval.rewards[path] or None)
    if config.data.pairs_file:
        records, size = read_pairs_file(config.data.pairs_file)
        pairs = (
            f"{len(records)} pairs from {config.data.pairs_file} ({size[0]} x {size[1]} px); "
            f"{t.prompts_per_iteration} drawn per iteration"
        )
        batch = f"{t.prompts_per_iteration} pairs per iteration"
    else:
        pairs = f"on-policy, {a.pairs} (reward gap > {a.min_reward_gap:g}), {s.num_steps}-step ODE samples"
        samples = t.prompts_per_iteration * t.group_size
        batch = f"{t.prompts_per_iteration} prompts x {t.group_size} samples = {samples} samples per iteration"
    loss = f"beta {a.beta:g}" + (
        f", label temperature {a.label_temperature:g}, gamma {a.gamma:g}, ReNoise {a.inversion_steps} steps x "
        f"{a.renoise_iterations} iterations"
        if a.name == "smpo"
        else ""
    )
    return [
        ("algorithm", a.name),
        ("model", f"{model}, pipeline {m.pipeline}"),
        ("train prompts", train_prompts),
        ("eval prompts", eval_prompts),
        ("pairs", pairs),
        ("rewards", "; ".join(f"{p} x {w:g}" for p, w in r.weights.items())),
        ("world size", world),
        ("global batch", batch),
        ("loss", f"{loss}; t in [{a.t_min:g}, {a.t_max:g}]"),
        ("iterations", f"{t.iterations} ({a.num_iterations} optimizer steps each), max {config.budget.max_seconds} s"),
        (
            "trainable",
            f"LoRA r {m.lora_rank} alpha {m.lora_alpha} on {m.lora_targets}" if m.lora else "full transformer",
        ),
        ("output", config.log.output_dir),
    ]


def preference_dry_run(config) -> None:
    """Print the checked plan of a preference recipe; raises as training would on a bad recipe."""
    title = "dry run: config, model source, prompts, pairs and rewards checked; no weights loaded"
    print(format_plan(title, preference_plan_rows(config)))

"""`llmalign grpo|dpo|sft|iterate|rm --config ... --dry-run`: check a text recipe and print its plan, loading no weights.

Checks, each one line and an exit code as training would give (2 config or data, 3 a reward):
  - the config (load_config already validated its fields);
  - model.path (and DPO's algorithm.guidance_model): embedded:arith, an existing local directory, or a
    well-formed hub id (form only: no download, no network);
  - the data: local files, directories and the embedded task are read in full through load_train_test, as
    training reads them (columns mapped, prompts formatted); a hub data.path is checked by form and reported,
    not downloaded;
  - GRPO rewards and eval.rewards through build_reward, the builder training uses (builtins and import paths
    with their kwargs);
  - the global batch splits over the processes (WORLD_SIZE, as set by accelerate launch).
"""

from __future__ import annotations

import math
from pathlib import Path

from llmalign.config import EMBEDDED_MODEL
from shared.config import ConfigError
from shared.plan import describe_source, format_plan, hub_id_problem, require_divisible, world_size


class _PlannedWorld:
    """The `run` that llmalign.grpo.check_world_split asks for (its world size and refusal), without a Run."""

    def __init__(self, world: int):
        self.world = world

    def require_divisible(self, value: int, field: str, what: str) -> None:
        require_divisible(value, self.world, field, what)


def _data_rows(
    data, required: tuple[str, ...], test_required: tuple[str, ...] = ("prompt", "answer")
) -> tuple[str, str, int]:
    """(training source, held-out source, training row count or -1) as plan lines; hub datasets not loaded."""
    from llmalign.data import load_train_test
    from llmalign.toy import resolve_embedded

    if data.path is not None and not Path(data.path).expanduser().exists():
        problem = hub_id_problem(data.path)
        if problem is not None:
            raise ConfigError(
                f"config field 'data.path': {data.path!r} is neither a local dataset nor a hub id "
                f"({problem}); give a file, a directory or org/name"
            )
        subset = f" (subset {data.subset})" if data.subset else ""
        columns = ", ".join(f"{name} <- {getattr(data, name + '_column')}" for name in required)
        train = (
            f"hub dataset {data.path}{subset}, split {data.split or 'train'}, columns {columns} "
            f"(form checked, not downloaded)"
        )
        test = f"split {data.test_split} of the hub dataset (not downloaded)" if data.test_split else "none"
        return train, test, -1
    train_rows, test_rows = load_train_test(data, required, resolve_embedded, test_required)
    source = data.path or data.train
    test_source = (f"split {data.test_split}" if data.path and data.test_split else data.test) if test_rows else "none"
    return f"{len(train_rows)} rows from {source}", f"{len(test_rows)} rows from {test_source}", len(train_rows)


def _format(data) -> str:
    return f"system prompt {data.system_prompt!r}, template {data.prompt_template!r}"


def _memory(config) -> str:
    m, mem = config.model, config.memory
    lora = f"LoRA r {m.lora_rank} alpha {m.lora_alpha}" if m.lora else "full fine-tuning"
    return (
        f"dtype {m.dtype}, mixed precision {mem.mixed_precision}, {lora}, micro batch {mem.micro_batch_size}, "
        f"gradient checkpointing {mem.gradient_checkpointing}"
    )


def _rollout_rows(config) -> list[tuple[str, object]]:
    """The rollout schedule, replay and Forced Rethinking rows of a GRPO plan, each only when it is on."""
    t, r, a = config.train, config.rollout, config.algorithm
    rows = []
    if r.two_stage:
        first = r.first_stage_size(t.group_size)
        budget = r.extra_rollouts(t.prompts_per_iteration, t.group_size)
        cap = r.max_total(t.group_size)
        rule = (
            f"extra rollouts for prompts with pass rate < {r.dars_threshold:g}"
            if r.schedule != "gvm"
            else f"at least {r.min_rollouts_per_prompt} per prompt, by pass rate and gradient norm"
        )
        rows.append(
            (
                "rollout schedule",
                f"{r.schedule}: first stage {first} per prompt ({t.prompts_per_iteration * first} in all), second "
                f"stage {'up to ' if r.schedule != 'gvm' else ''}{budget} ({rule}; "
                f"{f'at most {cap} per prompt in all' if cap is not None else 'no per-prompt cap'}), pass rates "
                f"from {a.correct_reward}",
            )
        )
    if a.replay == "ssr":
        rows.append(
            (
                "replay",
                f"ssr: buffer of {config.replay.size}, fills batches below {config.replay.min_informative} "
                f"informative samples, |advantage|^{config.replay.alpha:g}",
            )
        )
    if r.rethink_fraction > 0 and r.rethink_style == "continue":
        rows.append(("forced rethinking", f"{r.rethink_fraction:g} of the finished rollouts + {r.rethink_trigger!r}"))
    elif r.rethink_fraction > 0:
        rows.append(
            (
                "forced rethinking",
                f"vl_rethinker: {r.rethink_fraction:g} of the finished rollouts, cut before the answer half the time, "
                f"+ one of VL-Rethinker's 4 triggers; kept when correct ({a.correct_reward}), finished, longer than "
                f"{r.rethink_min_tokens} tokens, at most 2 per prompt",
            )
        )
    return rows


def grpo_plan(config) -> list[tuple[str, object]]:
    """Check a GRPOConfig (see the module docstring) and return its plan as (name, value) rows."""
    from llmalign.grpo import check_world_split
    from llmalign.grpo import load_rewards
    from llmalign.rollout import check_groupwise_rewards, check_rollout

    t, a, s, d, r = config.train, config.algorithm, config.sampling, config.data, config.reward
    world = world_size()
    check_world_split(_PlannedWorld(world), config)
    check_rollout(config)
    model = describe_source(config.model.path, "model.path", embedded=_embedded_name(config.model.path))
    model += f", {_model_kind(config.model.path, a.name)}"
    train, test, _ = _data_rows(d, ("prompt", "answer"))
    check_groupwise_rewards(config, *load_rewards(config))  # as training builds them: a bad one is exit 3
    rewards = "; ".join(
        f"{name} x {weight:g}" + (f" {r.kwargs[name]}" if name in r.kwargs else "")
        for name, weight in r.weights.items()
    )
    rollout = t.prompts_per_iteration * t.group_size
    steps_per_iteration = a.steps_per_rollout
    return [
        *_environment_rows(config),
        (
            "algorithm",
            f"{a.loss} (clip {a.clip_range:g} / {a.effective_clip_range_high:g}, KL beta {a.kl_beta:g}, "
            + (
                f"advantage std {a.scale})"
                if a.name != "coupled_grpo"
                else f"leave-one-out advantages, unscaled; {a.diffusion_masks} masks, {a.diffusion_steps} unmasking "
                f"steps, {a.diffusion_confidence} first)"
            ),
        ),
        ("model", model),
        ("train data", train),
        ("held-out data", test),
        ("prompt format", _format(d)),
        ("rewards", f"{rewards} ({r.composition})"),
        ("eval rewards", "; ".join(config.eval.rewards) or "none"),
        ("world size", world),
        ("global batch", f"{t.prompts_per_iteration} prompts x {t.group_size} completions = {rollout} per iteration"),
        ("per process", f"{t.prompts_per_iteration // world} prompts, {rollout // world} completions"),
        *_rollout_rows(config),
        ("iterations", t.iterations),
        (
            "optimizer steps",
            f"{t.iterations * steps_per_iteration} ({a.passes} passes x {a.updates_per_pass} "
            f"updates per iteration, {rollout // a.updates_per_pass} completions each"
            f"{', full batch (algorithm.full_batch_epochs)' if a.full_batch_epochs else ''})",
        ),
        ("old log-probs", _old_logprobs(config)),
        ("optimizer", f"AdamW lr {t.learning_rate:g}, weight decay {t.weight_decay:g}"),
        (
            "tokens",
            f"prompt <= {d.max_prompt_length}, completion <= {s.max_new_tokens} (temperature {s.temperature:g})",
        ),
        ("memory", _memory(config) + f", reference model {'kept' if a.kl_beta > 0 else 'none'}"),
        ("output", config.log.output_dir),
    ]


def _embedded_name(path: str) -> str:
    """The embedded toy `path` names (embedded:arith or one of llmalign.toy.OTHER_EMBEDDED), else embedded:arith."""
    from llmalign.toy import OTHER_EMBEDDED

    return next((name for name in OTHER_EMBEDDED if path == name or path.startswith(name + "/")), EMBEDDED_MODEL)


def _model_kind(path: str, algorithm: str) -> str:
    """The model's kind as its config declares it (llmalign.policy.declared_architectures), refused when the
    algorithm (or recipe: sft, dpo, iterate) trains the other kind (coupled_grpo: masked-diffusion, every other:
    causal), as training refuses it."""
    from llmalign.policy import CAUSAL, MASKED_DIFFUSION, declared_architectures, model_kind, refuse_other_kind

    architectures = declared_architectures(path)
    kind = MASKED_DIFFUSION if algorithm == "coupled_grpo" else CAUSAL
    refuse_other_kind(architectures, kind, "config field 'model.path':", path)
    found = model_kind(architectures)
    return f"{found.replace('_', '-')} LM" if found else "model kind not known until it loads"


def _environment_rows(config) -> list[tuple[str, object]]:
    """algorithm.name gigpo / episode_grpo: the environment built and reset once (a factory that does not load,
    or a reset that returns no str, is the one line training would give), and its settings."""
    from llmalign.config import ENVIRONMENT_ALGORITHMS

    e = config.environment
    if config.algorithm.name not in ENVIRONMENT_ALGORITHMS:
        return []
    from llmalign.environments import checked_reset, environment_factory

    first = checked_reset(e.name, environment_factory(e.name, e.kwargs)(), 0)
    omega = 0 if config.algorithm.name == "episode_grpo" else e.step_weight
    return [
        (
            "environment",
            f"{e.name} {e.kwargs or ''} (reset checked: {first[:40]!r}), at most {e.max_turns} turns, one row per turn; "
            f"gamma {e.gamma:g}, omega {omega:g}, {e.mode}, episode statistics over {e.episode_statistics}, "
            f"invalid penalty {e.invalid_penalty:g}; the global batch's prompts are tasks, its completions "
            "trajectories; the data and reward sections are not read",
        )
    ]


def _old_logprobs(config) -> str:
    """Where grpo's old log-probs come from and which iterations check the first update's ratio."""
    a, every = config.algorithm, config.log.ratio_check_every
    if a.steps_per_rollout > 1:
        return (
            f"recomputed every iteration ({a.steps_per_rollout} optimizer steps per rollout); ratio checked each time"
        )
    checked = "1 only" if every == 0 else f"1, {1 + every}, {1 + 2 * every}, ..."
    return (
        f"the update's forward, detached; recomputed to check the ratio at iterations {checked} (log.ratio_check_every)"
    )


def dpo_plan(config) -> list[tuple[str, object]]:
    """Check a DPOConfig (see the module docstring) and return its plan as (name, value) rows."""
    t, a, d = config.train, config.algorithm, config.data
    world = world_size()
    require_divisible(t.batch_size, world, "train.batch_size", "pairs")
    model = describe_source(config.model.path, "model.path", embedded=_embedded_name(config.model.path))
    model += f", {_model_kind(config.model.path, 'causal')}"
    guidance = (
        describe_source(a.guidance_model, "algorithm.guidance_model", embedded=EMBEDDED_MODEL)
        if a.guidance_model is not None
        else None
    )
    train, test, pairs = _data_rows(d, ("prompt", "chosen", "rejected"))
    steps = _pair_steps(t, pairs)
    rows = [
        ("algorithm", f"dpo[{a.loss}], reference {a.reference if a.uses_reference else 'none'}"),
        ("model", model),
    ]
    if guidance is not None:
        rows.append(("guidance model", guidance))
    rows += [
        ("train data", train),
        ("held-out data", test),
        ("prompt format", _format(d)),
        ("world size", world),
        ("global batch", f"{t.batch_size} pairs per optimizer step"),
        ("per process", f"{t.batch_size // world} pairs"),
        ("optimizer steps", steps),
        ("optimizer", f"AdamW lr {t.learning_rate:g}, warm-up {t.warmup_steps} steps, weight decay {t.weight_decay:g}"),
        ("tokens", f"prompt <= {d.max_prompt_length}, completion <= {d.max_completion_length}"),
        ("memory", _memory(config)),
        ("output", config.log.output_dir),
    ]
    return rows


def _pair_steps(t, pairs: int) -> str:
    """The optimizer steps of a pair recipe (DPO, rm) from train.steps or the epochs over `pairs` (-1: not loaded)."""
    if t.steps is not None:
        return f"{t.steps} (train.steps)"
    if pairs >= 0:
        return (
            f"{math.ceil(t.epochs * pairs / t.batch_size)} (ceil({t.epochs:g} epochs x {pairs} pairs / {t.batch_size}))"
        )
    return f"ceil({t.epochs:g} epochs x the dataset's pairs / {t.batch_size}) (dataset not loaded)"


def sft_plan(config) -> list[tuple[str, object]]:
    """Check an SFTConfig (see the module docstring) and return its plan as (name, value) rows."""
    t, d = config.train, config.data
    world = world_size()
    require_divisible(t.batch_size, world, "train.batch_size", "sequences")
    model = describe_source(config.model.path, "model.path", embedded=_embedded_name(config.model.path))
    model += f", {_model_kind(config.model.path, 'causal')}"
    train, test, count = _data_rows(d, d.required_columns)
    if t.steps is not None:
        steps = f"{t.steps} (train.steps)"
    elif count >= 0:
        steps = (
            f"{math.ceil(t.epochs * count / t.batch_size)} (ceil({t.epochs:g} epochs x {count} rows / {t.batch_size}))"
        )
    else:
        steps = f"ceil({t.epochs:g} epochs x the dataset's rows / {t.batch_size}) (dataset not loaded)"
    if d.messages_column is not None:
        completion = f"the last (assistant) message of column {d.messages_column!r}"
    elif d.completion_template is not None:
        completion = f"template {d.completion_template!r}"
    else:
        completion = f"column {d.completion_column!r}"
    return [
        ("algorithm", "sft (token-mean NLL of the completion tokens)"),
        ("model", model),
        ("train data", train),
        ("held-out data", test),
        ("prompt format", _format(d)),
        ("completion", completion + ", then end-of-text"),
        ("world size", world),
        ("global batch", f"{t.batch_size} sequences per optimizer step"),
        ("per process", f"{t.batch_size // world} sequences"),
        ("optimizer steps", steps),
        ("optimizer", f"AdamW lr {t.learning_rate:g}, warm-up {t.warmup_steps} steps, weight decay {t.weight_decay:g}"),
        ("tokens", f"prompt + completion <= {t.max_length} ({t.overlong}), packing {t.packing}"),
        ("memory", _memory(config)),
        ("output", config.log.output_dir),
    ]


def iterate_plan(config) -> list[tuple[str, object]]:
    """Check an IterateConfig (see the module docstring) and return its plan as (name, value) rows."""
    t, a, d, p = config.train, config.algorithm, config.data, config.pairs
    world = world_size()
    require_divisible(t.batch_size, world, "train.batch_size", "pairs")  # each round's DPO splits its batch
    model = describe_source(config.model.path, "model.path", embedded=_embedded_name(config.model.path))
    model += f", {_model_kind(config.model.path, 'iterate')}"
    train, test, _ = _data_rows(d, ("prompt", "answer"))
    steps = (
        f"{t.steps} (train.steps)"
        if t.steps is not None
        else f"ceil({t.epochs:g} epochs x the round's pairs / {t.batch_size})"
    )
    return [
        (
            "algorithm",
            f"iterative dpo[{a.loss}], reference = the previous round's policy, momentum {config.iterate.momentum:g}",
        ),
        ("model", model),
        ("train data", train),
        ("held-out data", test),
        ("prompt format", _format(d)),
        ("world size", world),
        ("rounds", config.iterate.rounds),
        (
            "pairs per round",
            f"{d.prompts_per_round} prompts x {p.group_size} completions (<= {p.max_new_tokens} tokens, temperature "
            f"{p.temperature:g}), at most {p.pairs_per_prompt} pair(s) per prompt",
        ),
        ("global batch", f"{t.batch_size} pairs per DPO step, {t.batch_size // world} per process"),
        ("optimizer steps per round", steps),
        ("optimizer", f"AdamW lr {t.learning_rate:g}, warm-up {t.warmup_steps} steps, weight decay {t.weight_decay:g}"),
        ("tokens", f"prompt <= {d.max_prompt_length}, completion <= {d.max_completion_length}"),
        ("memory", _memory(config)),
        ("output", config.log.output_dir),
    ]


def rm_plan(config) -> list[tuple[str, object]]:
    """Check an RMConfig (see the module docstring) and return its plan as (name, value) rows."""
    t, a, d = config.train, config.algorithm, config.data
    world = world_size()
    require_divisible(t.batch_size, world, "train.batch_size", "pairs")
    model = describe_source(config.model.path, "model.path", embedded=EMBEDDED_MODEL)
    pair_columns = ("prompt", "chosen", "rejected")
    train, test, pairs = _data_rows(d, pair_columns, pair_columns)
    steps = _pair_steps(t, pairs)
    head = (
        "bt: 1 output, -log sigmoid(r_w - r_l)"
        if a.kind == "bt"
        else f"gpm: {a.gpm_dim} outputs, tau {a.tau:g}, normalize {a.normalize}"
    )
    return [
        ("algorithm", f"rm[{a.kind}] ({head})"),
        ("model", model),
        ("train data", train),
        ("held-out data", test),
        ("prompt format", _format(d)),
        ("world size", world),
        ("global batch", f"{t.batch_size} pairs per optimizer step"),
        ("per process", f"{t.batch_size // world} pairs"),
        ("optimizer steps", steps),
        ("optimizer", f"AdamW lr {t.learning_rate:g}, warm-up {t.warmup_steps} steps, weight decay {t.weight_decay:g}"),
        ("tokens", f"prompt <= {d.max_prompt_length}, completion <= {d.max_completion_length}"),
        ("memory", _memory(config)),
        ("output", config.log.output_dir),
    ]


def dry_run(config) -> None:
    """Print the checked plan of a GRPO, DPO, SFT, iterate or rm config; raises as training would on a bad recipe."""
    from llmalign.config import GRPOConfig
    from llmalign.iterate_config import IterateConfig
    from llmalign.rm_config import RMConfig
    from llmalign.sft_config import SFTConfig

    if isinstance(config, RMConfig):
        rows = rm_plan(config)
    elif isinstance(config, IterateConfig):
        rows = iterate_plan(config)
    elif isinstance(config, SFTConfig):
        rows = sft_plan(config)
    else:
        rows = grpo_plan(config) if isinstance(config, GRPOConfig) else dpo_plan(config)
    print(format_plan("dry run: config, model source, data and rewards checked; no weights loaded", rows))

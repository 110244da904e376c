"""`llmalign`: the text-RL command line.

    llmalign train configs/llm/arith.yaml [key=value ...]   # the recipe named by the YAML's `recipe:` key
    llmalign grpo --config configs/llm/arith.yaml [key=value ...] [--resume [--allow-config-change]] [--describe]
    llmalign dpo --config configs/llm/arith_dpo.yaml [key=value ...] [--resume [--allow-config-change]] [--describe]
    llmalign sft --config configs/llm/arith_sft.yaml [key=value ...] [--resume [--allow-config-change]] [--describe]
    llmalign iterate --config configs/llm/arith_iterate.yaml [key=value ...] [--resume [--allow-config-change]]
    llmalign rm --config configs/llm/arith_rm_gpm.yaml [key=value ...] [--resume [--allow-config-change]] [--describe]
    llmalign grpo|dpo|sft|iterate|rm --config ... --dry-run      # check config, model source, data, rewards; print the plan
    llmalign pairs --model DIR --data FILE --out pairs.jsonl [--adapter DIR] [--group-size G]
                   [--pairs-per-prompt K] [--max-new-tokens N] [--temperature T] [--limit N] [--seed S]
                   [--format-check | --no-format-check] [--engine hf|vllm [--vllm-kv-cache-mib M]]
    llmalign eval --model DIR --data FILE [--limit N] [--max-new-tokens N] [--engine hf|vllm]
    accelerate launch --multi_gpu --num_processes N -m llmalign {grpo,dpo,sft,rm,pairs,eval} ...   # N processes

Batch sizes count over all processes; pairs and eval split their prompts over the processes and the main
process alone writes.

Exit codes: 2 bad config or data, 3 a reward failed, 4 the loss became NaN/inf, 5 a checkpoint or log could not
be written (a full disk; the previous checkpoint is intact).
"""

from __future__ import annotations

import argparse
import os
import sys
import typing

from shared.errors import user_errors
from shared.config import (
    SEED_LIMIT,
    ConfigError,
    describe,
    exit_on_config_error,
    load_config,
    local_path_problem,
    parse_with_overrides,
)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one line naming it (no usage block), exit code 2; printed once
    under a multi-process launcher (RANK 0), as exit_on_config_error does."""

    def error(self, message: str) -> typing.NoReturn:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def run_recipe(config_class, train, args: argparse.Namespace) -> None:
    """--describe, or load and validate the config, then train; errors become one line and an exit code."""
    if args.describe:
        print("\n".join(describe(config_class)))
        return
    from llmalign.data import DataError

    with user_errors((DataError,)):  # a ConfigError also once a model is loaded (a guidance model's vocabulary)
        config = load_config(config_class, args.config, args.overrides)
        if args.dry_run:  # model source, data and rewards checked, the plan printed; no weights load
            from llmalign.plan import dry_run

            dry_run(config)
        else:
            train(config, resume=args.resume, allow_config_change=args.allow_config_change)


def _grpo():
    from llmalign import grpo
    from llmalign.config import GRPOConfig

    return GRPOConfig, grpo.train


def _dpo():
    from llmalign import dpo
    from llmalign.dpo_config import DPOConfig

    return DPOConfig, dpo.train


def _sft():
    from llmalign import sft
    from llmalign.sft_config import SFTConfig

    return SFTConfig, sft.train


def _rm():
    from llmalign import reward_model
    from llmalign.rm_config import RMConfig

    return RMConfig, reward_model.train


def _iterate():
    from llmalign import iterate
    from llmalign.iterate_config import IterateConfig

    return IterateConfig, iterate.train


# recipe name (a YAML's top-level `recipe:` key, and its subcommand) -> (config class, train function), imported
# only when that recipe runs
RECIPES = {"grpo": _grpo, "dpo": _dpo, "sft": _sft, "iterate": _iterate, "rm": _rm}


def run_named_recipe(args: argparse.Namespace) -> None:
    run_recipe(*RECIPES[args.command](), args)


def run_train(args: argparse.Namespace) -> None:
    """`llmalign train CONFIG`: the recipe named by the YAML's `recipe:` key."""
    from shared.config import read_recipe

    try:
        recipe = read_recipe(args.config, RECIPES, "llmalign")
    except ConfigError as error:
        exit_on_config_error(error)
    run_recipe(*RECIPES[recipe](), args)


def run_pairs(args: argparse.Namespace) -> None:
    from pathlib import Path

    from llmalign.data import DataError, load_rows, write_rows
    from llmalign.pairs import level_table, make_pairs, sample_completions
    from llmalign.toy import resolve_embedded
    from shared.run import Run

    run = Run(None, resume=False, tag="[llmalign]")
    try:
        if Path(args.out).suffix.lower() != ".jsonl":  # checked before sampling, which takes the time
            raise DataError(f"--out {args.out}: pairs are written as JSON lines; name the file .jsonl")
        rows = load_rows(run.main_first(lambda: resolve_embedded(args.data)))[: args.limit]
    except DataError as error:
        print(f"data error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        model, tokenizer = load_for_sampling(run, args.model, args.adapter)
        engine = sampling_engine(args, model, tokenizer, rows)
    except ConfigError as error:
        exit_on_config_error(error)
    completions = sample_completions(
        model,
        tokenizer,
        rows,
        args.group_size,
        args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        batch_size=args.batch_size,
        run=run,
        engine=engine,
    )
    pairs, summary = make_pairs(rows, completions, args.pairs_per_prompt, args.format_check)
    run.main_only(lambda: write_rows(args.out, pairs))
    if run.is_main:
        print(level_table(summary))
        print(
            f"{summary['pairs']} pairs from {len(rows)} prompts x {args.group_size} completions written to {args.out}"
        )
    if engine is not None:
        engine.close()
    run.close()


def _at_least(minimum: int, below: int | None = None):
    def integer(text: str) -> int:  # argparse names the type by this function's name: "invalid integer value"
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"{value} is not below {below}")
        return value

    return integer


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def load_for_sampling(run, model_path: str, adapter: str | None):
    """(model, tokenizer) of a model directory, hub id or embedded:arith on the run's device, with an optional LoRA
    adapter on top."""
    from llmalign.config import LMModelConfig
    from llmalign.policy import load_policy
    from llmalign.toy import resolve_embedded

    for flag, value in (("--model", model_path), ("--adapter", adapter)):
        problem = local_path_problem(value) if value is not None else None
        if problem is not None:  # before anything loads, naming the flag
            raise ConfigError(f"{flag} {problem}")
    path = run.main_first(lambda: resolve_embedded(model_path))
    model, tokenizer = load_policy(LMModelConfig(path=path, lora=False), run.device, field="--model")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model, tokenizer


def sampling_engine(args: argparse.Namespace, model, tokenizer, rows: list[dict]):
    """--engine vllm: a `VLLMEngine` on --model holding `model`'s weights (an --adapter's merged in); None for hf."""
    from llmalign.config import RolloutEngineConfig
    from llmalign.engines import engine_for_rows

    section = RolloutEngineConfig(engine=args.engine, vllm_kv_cache_mib=args.vllm_kv_cache_mib)
    section.check()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    engine = engine_for_rows(model.name_or_path, tokenizer, rows, args.max_new_tokens, section, dtype, args.seed)
    if engine is not None and args.adapter is not None:
        engine.push_policy(model)
    return engine


def engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine", choices=("hf", "vllm"), default="hf", help="what generates: as rollout.engine (docs/llmalign.md)"
    )
    parser.add_argument("--vllm-kv-cache-mib", type=_at_least(0), default=64, help="as rollout.vllm_kv_cache_mib")


def grouped_results(rows: list[dict], result: dict, column: str | None) -> dict:
    """`llmalign eval --by COLUMN`: value -> (accuracy, mean completion length, its standard error, rows), in
    first-seen order (shared.stats.mean_with_standard_error; 0 for a single row)."""
    import torch

    from shared.stats import mean_with_standard_error

    groups: dict = {}
    for row, correct, length in zip(rows, result["correct"], result["lengths"]) if column is not None else ():
        groups.setdefault(row[column], []).append((correct, length))
    out = {}
    for value, pairs in groups.items():
        mean, error, n = mean_with_standard_error(torch.tensor([length for _, length in pairs], dtype=torch.float64))
        out[value] = (sum(c for c, _ in pairs) / n, mean, error if n > 1 else 0.0, n)
    return out


def run_eval(args: argparse.Namespace) -> None:
    from llmalign.data import DataError, load_rows
    from llmalign.evaluate import accuracy_on
    from llmalign.toy import resolve_embedded
    from shared.run import Run

    run = Run(None, resume=False, tag="[llmalign]")
    try:
        rows = load_rows(run.main_first(lambda: resolve_embedded(args.data)))[: args.limit]
    except DataError as error:
        print(f"data error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    missing = [index for index, row in enumerate(rows) if args.by is not None and args.by not in row]
    if missing:
        exit_on_config_error(ConfigError(f"--by: row {missing[0]} of {args.data} has no column {args.by!r}"))
    try:
        model, tokenizer = load_for_sampling(run, args.model, args.adapter)
        engine = sampling_engine(args, model, tokenizer, rows)
    except ConfigError as error:
        exit_on_config_error(error)
    result = accuracy_on(model, tokenizer, rows, args.max_new_tokens, progress=True, run=run, engine=engine)
    if run.is_main:
        for prompt, completion in result["samples"][: args.show]:
            print(f"--- {prompt.strip()!r}\n    {completion!r}")
        print(
            f"accuracy {result['accuracy']:.4f} on {len(rows)} rows (greedy), mean completion length "
            f"{result['mean_length']:.1f} tokens"
        )
        for value, (accuracy, length, error, count) in grouped_results(rows, result, args.by).items():
            print(
                f"  {args.by}={value}: accuracy {accuracy:.4f}, mean completion length {length:.1f} +- {error:.1f} "
                f"({count} rows)"
            )
    if engine is not None:
        engine.close()
    run.close()


ALLOW_CONFIG_CHANGE_HELP = (
    "with --resume: apply config changes beyond train.iterations, train.steps, train.epochs, budget.*, "
    "log.* and eval.* (refused without it)"
)
DRY_RUN_HELP = (
    "check the config, model source (a hub id by form only), data and rewards, print the plan (model, "
    "global batch, steps, rewards, memory settings) and exit; loads no weights"
)


def recipe_flags(parser: argparse.ArgumentParser, resume_help: str, override_example: str) -> None:
    """The flags every training subcommand takes (besides its config)."""
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--allow-config-change", action="store_true", help=ALLOW_CONFIG_CHANGE_HELP)
    parser.add_argument("--describe", action="store_true", help="list every config field and exit")
    parser.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {override_example}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="llmalign", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,grpo,dpo,sft,iterate,rm,pairs,eval}")
    train = sub.add_parser(
        "train", help="the recipe the YAML's top-level recipe: key names (grpo, dpo, sft, iterate, rm)"
    )
    train.add_argument("config", help="YAML recipe with a recipe: key, e.g. configs/llm/arith.yaml")
    recipe_flags(train, "continue from the latest checkpoint in log.output_dir", "train.iterations=5")
    train.set_defaults(run=run_train)
    for name, help_text, example, resume, override in (
        (
            "grpo",
            "GRPO / Dr. GRPO / DAPO / DisCO training with verifiable rewards",
            "arith",
            None,
            "train.iterations=5",
        ),
        (
            "dpo",
            "DPO / IPO / robust / hinge / SimPO (and TGDPO) training on preference pairs",
            "arith_dpo",
            None,
            "algorithm.loss=ipo",
        ),
        (
            "sft",
            "supervised fine-tuning on prompt/completion rows or chat conversations",
            "arith_sft",
            None,
            "train.packing=true",
        ),
        (
            "iterate",
            "iterative DPO / APO: rounds of on-policy pairs then DPO",
            "arith_iterate",
            "continue the run, mid-round too",
            "iterate.momentum=0.3",
        ),
        (
            "rm",
            "reward model (Bradley-Terry or GPM) on preference pairs",
            "arith_rm_gpm",
            None,
            "algorithm.kind=bt",
        ),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--config", help=f"YAML recipe, e.g. configs/llm/{example}.yaml")
        recipe_flags(command, resume or "continue from the latest checkpoint in log.output_dir", override)
        command.set_defaults(run=run_named_recipe)
    pairs = sub.add_parser("pairs", help="sample completions and write chosen/rejected pairs by preference level")
    pairs.add_argument("--model", required=True, help="model directory, hub id or embedded:arith")
    pairs.add_argument("--adapter", help="a LoRA adapter directory to load on top of --model")
    pairs.add_argument("--data", required=True, help="JSONL/JSON/CSV/Parquet or datasets directory with prompt, answer")
    pairs.add_argument("--out", required=True, help="pairs file to write (.jsonl): prompt, chosen, rejected, levels")
    pairs.add_argument("--group-size", type=_at_least(2), default=8, help="completions sampled per prompt")
    pairs.add_argument("--pairs-per-prompt", type=_at_least(1), default=1, help="pairs written per prompt at most")
    pairs.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    pairs.add_argument("--temperature", type=_positive_float, default=1.0)
    pairs.add_argument("--limit", type=_at_least(1), default=None, help="use the first N rows")
    pairs.add_argument("--seed", type=_at_least(0, below=SEED_LIMIT), default=0, help="sampling seed")
    pairs.add_argument("--batch-size", type=_at_least(1), default=32, help="prompts per generate call")
    pairs.add_argument(
        "--format-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rank completions that break <think>...</think><answer>...</answer> lowest (level 0)",
    )
    engine_flags(pairs)
    pairs.set_defaults(run=run_pairs)
    ev = sub.add_parser("eval", help="greedy accuracy of a model on prompt/answer data")
    ev.add_argument("--model", required=True, help="model directory, hub id or embedded:arith")
    ev.add_argument("--adapter", help="a LoRA adapter directory to load on top of --model")
    ev.add_argument("--data", required=True, help="JSONL/JSON/CSV/Parquet or datasets directory with prompt, answer")
    ev.add_argument("--limit", type=_at_least(1), default=None, help="evaluate the first N rows")
    ev.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    ev.add_argument("--show", type=_at_least(0), default=3, help="print this many completions")
    ev.add_argument("--by", default=None, help="also give accuracy and length per value of this data column (level)")
    ev.add_argument("--seed", type=_at_least(0, below=SEED_LIMIT), default=0, help="the engine's seed (greedy: unused)")
    engine_flags(ev)
    ev.set_defaults(run=run_eval)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parse_with_overrides(build_parser(), argv)  # key=value overrides after --resume too
    args.run(args)


if __name__ == "__main__":
    main()

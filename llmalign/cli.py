"""`llmalign`: the text-RL command line.

    llmalign grpo --config configs/llm/arith.yaml [key=value ...] [--resume] [--describe]
    llmalign eval --model DIR --data FILE [--limit N] [--max-new-tokens N]

Exit codes: 2 bad config or data, 3 a reward failed, 4 the loss became NaN/inf.
"""

from __future__ import annotations

import argparse
import sys

from shared.config import ConfigError, describe, exit_on_config_error, load_config


def run_grpo(args: argparse.Namespace) -> None:
    from llmalign.config import GRPOConfig

    if args.describe:
        print("\n".join(describe(GRPOConfig)))
        return
    try:
        config = load_config(GRPOConfig, args.config, args.overrides)
    except ConfigError as error:
        exit_on_config_error(error)
    from llmalign.data import DataError
    from llmalign.grpo import RewardError, train

    try:
        train(config, resume=args.resume)
    except DataError as error:
        print(f"data error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except RewardError as error:
        print(f"reward error: {error}", file=sys.stderr)
        raise SystemExit(3) from None
    except FloatingPointError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        raise SystemExit(4) from None


def run_eval(args: argparse.Namespace) -> None:
    from llmalign.config import LMModelConfig
    from llmalign.data import DataError, load_rows
    from llmalign.evaluate import accuracy_on
    from llmalign.grpo import load_policy
    from llmalign.toy import resolve_embedded

    try:
        rows = load_rows(resolve_embedded(args.data))[: args.limit]
    except DataError as error:
        print(f"data error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    model, tokenizer = load_policy(LMModelConfig(path=args.model, lora=False))
    if (adapter := args.adapter) is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    result = accuracy_on(model, tokenizer, rows, args.max_new_tokens, progress=True)
    for prompt, completion in result["samples"][: args.show]:
        print(f"--- {prompt.strip()!r}\n    {completion!r}")
    print(f"accuracy {result['accuracy']:.4f} on {len(rows)} rows (greedy), mean completion length "
          f"{result['mean_length']:.1f} tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmalign", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{grpo,eval}")
    grpo = sub.add_parser("grpo", help="GRPO / Dr. GRPO / DAPO / DisCO training with verifiable rewards")
    grpo.add_argument("--config", help="YAML recipe, e.g. configs/llm/arith.yaml")
    grpo.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in log.output_dir")
    grpo.add_argument("--describe", action="store_true", help="list every config field and exit")
    grpo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.iterations=5")
    grpo.set_defaults(run=run_grpo)
    ev = sub.add_parser("eval", help="greedy accuracy of a model on prompt/answer data")
    ev.add_argument("--model", required=True, help="model directory, hub id or embedded:arith")
    ev.add_argument("--adapter", help="a LoRA adapter directory to load on top of --model")
    ev.add_argument("--data", required=True, help="JSONL/JSON/CSV/Parquet or datasets directory with prompt, answer")
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N rows")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--show", type=int, default=3, help="print this many completions")
    ev.set_defaults(run=run_eval)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()

"""A trained policy's held-out win rate against another (its starting point), judged by a GPM reward model.

Both policies answer each held-out prompt greedily (max_new_tokens tokens); the judge gives P(trained > start) for
each prompt's pair of answers (llmalign.reward_model.gpm_preference); the table shows the mean with its standard
error over prompts, and the fraction of prompts where both answered alike (P = 1/2 exactly).

    python benchmarks/gpo_win_rate.py --judge runs/llm_arith_rm_gpm/final --model runs/llm_arith_gpo/final
"""

from __future__ import annotations

import argparse
import json

import torch

from llmalign.data import render_prompt, tokenize_prompts
from llmalign.evaluate import generate
from llmalign.reward_model import gpm_preference
from llmalign.toy import resolve_embedded
from shared.stats import mean_with_standard_error


def greedy_answers(path: str, rows: list[dict], max_new_tokens: int) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_embedded(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    texts = [render_prompt(tokenizer, row["prompt"]) for row in rows]
    ids, _ = tokenize_prompts(tokenizer, texts, 256, "truncate")
    with torch.no_grad():
        return generate(model, tokenizer, ids, 1, max_new_tokens, greedy=True).texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", required=True, help="an `llmalign rm` GPM run's final/ directory")
    parser.add_argument("--model", required=True, help="the trained policy")
    parser.add_argument("--against", default="embedded:arith", help="the starting policy (default embedded:arith)")
    parser.add_argument("--data", default="embedded:arith/test.jsonl")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    args = parser.parse_args()
    torch.manual_seed(0)
    with open(resolve_embedded(args.data)) as f:
        rows = [json.loads(line) for line in f if line.strip()][: args.limit]
    trained = greedy_answers(args.model, rows, args.max_new_tokens)
    start = greedy_answers(args.against, rows, args.max_new_tokens)
    judge = gpm_preference(args.judge)
    wins = torch.tensor(
        [judge(row["prompt"], [a], [b])[0] for row, a, b in zip(rows, trained, start)], dtype=torch.float64
    )  # [P] P(trained > start)
    mean, se, _ = mean_with_standard_error(wins)
    same = sum(a == b for a, b in zip(trained, start)) / len(rows)
    print("| model | against | prompts | win rate (GPM judge) | same answer |")
    print("|---|---|---|---|---|")
    print(f"| {args.model} | {args.against} | {len(rows)} | {mean:.3f} +- {se:.3f} | {same:.2f} |")


if __name__ == "__main__":
    main()

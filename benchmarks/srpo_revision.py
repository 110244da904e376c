"""Held-out accuracy of a first answer and of its revision: does SRPO's revision objective show at inference?

For each model: greedy answer y to each held-out prompt x (as `llmalign dpo` evaluates), then a greedy revision y'
generated from the revision prompt (x, y), the SRPO revision template filled with x and y's text (the default of
`data.revision_template` unless --template is given). Prints the accuracy of y and of y', and how many answers the
revision fixed (wrong -> right) and broke (right -> wrong). The numbers behind docs/results.md, "SRPO vs DPO on the
embedded pairs":

    python benchmarks/srpo_revision.py --models embedded:arith runs/m_srpo_s0/final runs/m_dpo_s0/final
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmalign.dpo_config import DEFAULT_REVISION_TEMPLATE, template_problem  # noqa: E402


def revise(model, tokenizer, rows: list[dict], template: str, max_new_tokens: int) -> dict:
    """{"first", "revised": accuracy, "fixed", "broken": counts} of greedy answers and their greedy revisions."""
    from llmalign.data import render_prompt
    from llmalign.evaluate import accuracy_on

    first = accuracy_on(model, tokenizer, rows, max_new_tokens)
    revision_rows = [
        {**row, "prompt": template.format(prompt=render_prompt(tokenizer, row["prompt"]), completion=completion)}
        for row, (_, completion) in zip(rows, first["samples"])
    ]
    revised = accuracy_on(model, tokenizer, revision_rows, max_new_tokens)
    pairs = list(zip(first["correct"], revised["correct"]))
    return {
        "first": first["accuracy"],
        "revised": revised["accuracy"],
        "fixed": sum(1 for a, b in pairs if b > a),
        "broken": sum(1 for a, b in pairs if a > b),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="model directories (or embedded:arith)")
    parser.add_argument("--data", default="embedded:arith/test.jsonl", help="prompt/answer rows")
    parser.add_argument("--limit", type=int, default=200, help="the first N rows (as data.eval_size)")
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--template", default=DEFAULT_REVISION_TEMPLATE, help="the revision prompt")
    args = parser.parse_args(argv)
    problem = template_problem(args.template)
    if problem is not None:
        parser.error(f"--template {args.template!r} {problem}")
    import torch

    from llmalign.data import load_rows
    from llmalign.policy import load_policy
    from llmalign.config import LMModelConfig
    from llmalign.toy import resolve_embedded

    torch.set_num_threads(1)
    rows = load_rows(resolve_embedded(args.data))[: args.limit]
    results = {}
    for path in args.models:
        model, tokenizer = load_policy(LMModelConfig(path=path))
        model.eval()
        results[path] = revise(model, tokenizer, rows, args.template, args.max_new_tokens)
        print(json.dumps({"model": path, **results[path]}), flush=True)
    return results


if __name__ == "__main__":
    main()

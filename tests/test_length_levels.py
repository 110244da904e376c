"""Length by level (TLDR): the level-tagged embedded data and `llmalign eval --by`. The reward is tested by hand in
tests/test_llm_rewards.py; the run that orders lengths by level is in docs/results.md."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from llmalign import toy
from llmalign.cli import grouped_results


def test_level_rows_take_the_levels_in_turn_and_say_them_in_the_prompt():
    rows = [{"prompt": f"Compute {i}+1-0.\n", "answer": str(i + 1)} for i in range(5)]
    tagged = toy.level_rows(rows)
    assert [row["level"] for row in tagged] == ["short", "medium", "long", "short", "medium"]
    assert tagged[2] == {"prompt": "[long] Compute 2+1-0.\n", "answer": "3", "level": "long"}
    assert rows[0] == {"prompt": "Compute 0+1-0.\n", "answer": "1"}  # the input is left as it was


def test_level_sft_rows_are_the_supervised_problems_with_styles_drawn_whatever_the_level():
    shipped = [json.loads(line) for line in (toy.SHIPPED_DIR / "sft.jsonl").read_text().splitlines()]
    rows = toy.level_sft_rows()
    assert [row["prompt"].split("] ", 1)[1] for row in rows] == [row["prompt"] for row in shipped]
    styles = Counter()
    for row, problem in zip(rows, toy.make_split(toy.TRAIN_PROBLEMS, 0)):
        variants = {
            "direct": toy.solution(problem, with_check=False, direct=True),
            "worked": toy.solution(problem, with_check=False),
            "checked": toy.solution(problem, with_check=True),
        }
        style = next(name for name, text in variants.items() if text == row["completion"])  # one of the three
        styles[row["level"], style] += 1
    for level in toy.LEVELS:  # every level gets every style, in about the build's shares (not tied to the level)
        counts = [styles[level, style] for style in ("direct", "worked", "checked")]
        assert min(counts) > 0.15 * sum(counts), (level, counts)


def test_grouped_results_by_hand():
    rows = [{"level": "a"}, {"level": "b"}, {"level": "a"}]
    result = {"correct": [True, False, False], "lengths": [10, 20, 30]}
    # a: lengths 10 and 30, mean 20, sample std sqrt(((-10)^2 + 10^2) / 1) = 14.142, standard error 14.142 / sqrt(2) = 10
    assert grouped_results(rows, result, "level") == {"a": (0.5, 20.0, 10.0, 2), "b": (0.0, 20.0, 0.0, 1)}
    assert grouped_results(rows, result, None) == {}


def test_eval_by_a_missing_column_is_one_line_and_exit_2(tmp_path: Path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "Compute 1+1+1.\n", "answer": "3"}) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "llmalign", "eval", "--model", "embedded:arith", "--data", str(data), "--by", "level"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(f"--by: row 0 of {data} has no column 'level'")
    assert "Traceback" not in done.stderr

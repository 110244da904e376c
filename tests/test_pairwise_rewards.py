"""Pairwise-preference rewards ranked by win rates (Pref-GRPO, shared.pairwise): the math on hand-worked matrices,
the wrapper's pairings and failed pairs, a text comparator through llmalign's call_text_reward, and a two-iteration
MixGRPO run on the tiny pipeline whose logged rewards equal the win rates recomputed from the digit classifier."""

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from shared.pairwise import (
    group_win_rates,
    ordered_pairs,
    preference_matrix,
    unordered_pairs,
    win_rate_scorer,
    win_rates,
)
from tests.test_llm_grpo import overrides, tiny_lm_dir  # noqa: F401  (fixture)
from tests.test_train_smoke import ALGORITHMS, tiny_config

NAN = math.nan
# P[i, j] = P(i beats j) of three members; the diagonal is never read
TRUE = torch.tensor([[NAN, 0.8, 0.6], [0.2, NAN, 0.9], [0.4, 0.1, NAN]])
# w_0 = (0.8 + 0.6) / 2, w_1 = (0.2 + 0.9) / 2, w_2 = (0.4 + 0.1) / 2; they sum to K / 2 = 1.5
TRUE_RATES = [0.7, 0.55, 0.25]


def test_win_rates_by_hand():
    assert_close(win_rates(TRUE), torch.tensor(TRUE_RATES))
    assert_close(win_rates(torch.tensor([[0.5, 1.0], [0.0, 0.5]])), torch.tensor([1.0, 0.0]))  # K = 2
    # a NaN entry (a pair with no answer) leaves its row without a score, the others untouched
    holed = TRUE.clone()
    holed[0, 2] = NAN
    assert_close(win_rates(holed), torch.tensor([NAN, 0.55, 0.25]), equal_nan=True)
    with pytest.raises(ValueError, match="a group of 1 has no other member"):
        win_rates(torch.tensor([[0.5]]))
    with pytest.raises(ValueError, match="holds 1.5, outside \\[0, 1\\]"):
        win_rates(torch.tensor([[0.5, 1.5], [0.0, 0.5]]))
    with pytest.raises(ValueError, match="square matrix"):
        win_rates(torch.zeros(2, 3))


def test_preference_matrix_from_pairs_by_hand():
    assert unordered_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    assert ordered_pairs(3) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    unordered = preference_matrix(3, unordered_pairs(3), torch.tensor([0.8, 0.6, 0.9]))
    assert_close(unordered, TRUE.double(), equal_nan=True)  # P[j, i] = 1 - P[i, j]; the diagonal never asked: NaN
    # a judge that adds 0.1 for the image shown first: p(i, j) = P[i, j] + 0.1; both orders average it away:
    # P[0, 1] = (0.9 + 1 - 0.3) / 2 = 0.8, P[0, 2] = (0.7 + 1 - 0.5) / 2 = 0.6, P[1, 2] = (1.0 + 1 - 0.2) / 2 = 0.9
    biased = torch.tensor([0.9, 0.7, 0.3, 1.0, 0.5, 0.2])
    assert_close(preference_matrix(3, ordered_pairs(3), biased), TRUE.double(), equal_nan=True)
    with pytest.raises(ValueError, match="compares a member with itself"):
        preference_matrix(2, [(1, 1)], torch.tensor([0.5]))


def _table_judge(table: dict, calls: list):
    """compare(i, j) from a table of answers, recording each call."""

    def compare(i, j):
        calls.append((i, j))
        return table[(i, j)]

    return compare


BIASED = {(0, 1): 0.9, (0, 2): 0.7, (1, 0): 0.3, (1, 2): 1.0, (2, 0): 0.5, (2, 1): 0.2}  # TRUE + 0.1 for first


def test_group_win_rates_pairings_count_their_calls_and_cancel_position_bias():
    calls = []
    both = group_win_rates(_table_judge(BIASED, calls), 3, pairing="both_orders")
    assert_close(torch.tensor(both), torch.tensor(TRUE_RATES))
    assert len(calls) == 6  # K (K - 1)
    calls.clear()
    once = group_win_rates(_table_judge(BIASED, calls), 3, pairing="unordered")
    # unordered asks (i, j), i < j, only: P[0, 1] = 0.9, P[0, 2] = 0.7, P[1, 2] = 1.0, the first-shown bias kept
    assert_close(torch.tensor(once), torch.tensor([0.8, 0.55, 0.15]))
    assert calls == [(0, 1), (0, 2), (1, 2)]  # K (K - 1) / 2, never a member against itself
    with ThreadPoolExecutor(2) as pool:  # on a pool: the same numbers
        assert group_win_rates(_table_judge(BIASED, []), 3, "both_orders", pool=pool) == both


def test_a_hard_judge_with_ties_as_the_official_code_counts_them():
    strength = [3, 1, 3, 0]  # 1 for a win, 1/2 each for a tie
    compare = lambda i, j: 1.0 if strength[i] > strength[j] else 0.5 if strength[i] == strength[j] else 0.0
    # member 0: beats 1 and 3, ties 2 -> 2.5 / 3; member 1: beats 3 -> 1 / 3; member 2 as 0; member 3: 0
    assert_close(torch.tensor(group_win_rates(compare, 4)), torch.tensor([2.5 / 3, 1 / 3, 2.5 / 3, 0.0]))


def test_a_pair_without_an_answer_drops_its_members_or_counts_as_a_tie():
    table = {(0, 1): 0.8, (0, 2): None, (1, 2): 0.9}
    assert group_win_rates(_table_judge(table, []), 3, failed_pair="drop") == [None, pytest.approx(0.55), None]
    # tie: P[0, 2] = 1/2 -> w_0 = (0.8 + 0.5) / 2, w_1 = (0.2 + 0.9) / 2, w_2 = (0.5 + 0.1) / 2
    tie = group_win_rates(_table_judge(table, []), 3, failed_pair="tie")
    assert_close(torch.tensor(tie), torch.tensor([0.65, 0.55, 0.3]))


@pytest.mark.parametrize(
    "answer, message",
    [(1.5, "returned 1.5 for pair \\(0, 1\\)"), ("0.5", "returned '0.5' for pair"), (True, "returned True for")],
)
def test_a_comparator_answer_that_is_not_a_probability_is_one_line(answer, message):
    with pytest.raises(ValueError, match=message):
        group_win_rates(lambda i, j: answer, 2)


def test_bad_options_are_refused_when_the_reward_is_built():
    with pytest.raises(ValueError, match="pairing 'all': choose one of \\['both_orders', 'unordered'\\]"):
        win_rate_scorer(lambda p, a, b: 0.5, pairing="all")
    with pytest.raises(ValueError, match="failed_pair 'skip': choose one of \\['drop', 'tie'\\]"):
        win_rate_scorer(lambda p, a, b: 0.5, failed_pair="skip")
    with pytest.raises(ValueError, match="max_workers 0"):
        win_rate_scorer(lambda p, a, b: 0.5, max_workers=0)


# ----------------------------------------------------------------------------- llmalign


def longer_wins(prompt, a, b):
    """A toy text comparator: the longer completion wins, equal lengths tie."""
    return 1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0


def test_a_text_comparator_through_llmalign_call_text_reward():
    from llmalign.rewards import build_reward
    from llmalign.rollout import call_text_reward
    from shared.reward_calls import is_groupwise

    fn = build_reward(
        "llmalign.rewards:make_pairwise_win_rate_reward", {"comparator": "tests.test_pairwise_rewards:longer_wins"}
    )
    assert is_groupwise(fn)
    prompts = ["p"] * 3 + ["q"] * 3
    completions = ["aa", "a", "aaa", "b", "b", "bbbb"]
    scores = call_text_reward(fn, prompts, completions, {"answer": ["1"] * 6}, group_size=3, step=0, max_new_tokens=8)
    # group p: "aa" beats "a", loses to "aaa" -> 1/2; "a" 0; "aaa" 1. group q: "b" ties "b" and loses -> 1/4 each
    assert scores == pytest.approx([0.5, 0.0, 1.0, 0.25, 0.25, 1.0])


def longer_wins_batch(prompts, completions, group_size, **columns):
    """The same win rates from a batch reward, by hand: per group, the mean over the others of longer_wins."""
    scores = []
    for start in range(0, len(completions), group_size):
        group = completions[start : start + group_size]
        for i, mine in enumerate(group):
            others = [other for j, other in enumerate(group) if j != i]
            scores.append(sum(longer_wins(None, mine, other) for other in others) / len(others))
    return scores


def test_llmalign_grpo_with_the_pairwise_reward_equals_the_same_win_rates_from_a_batch_reward(tiny_lm_dir, tmp_path):  # noqa: F811
    from llmalign.cli import main

    pairwise = "llmalign.rewards:make_pairwise_win_rate_reward"
    runs = {
        "pairwise": [
            f"reward.weights={{{pairwise}: 1.0}}",
            f"reward.kwargs={{{pairwise}: {{comparator: tests.test_pairwise_rewards:longer_wins}}}}",
        ],
        "batch": ["reward.weights={tests.test_pairwise_rewards:longer_wins_batch: 1.0}"],
    }
    logged = {}
    for name, reward in runs.items():
        main(["grpo", *overrides(tiny_lm_dir, tmp_path / name, *reward)])
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        drop = ("time/", "timestamp", "tokens_per_second")
        logged[name] = [
            {k.replace(pairwise, "R").replace("tests.test_pairwise_rewards:longer_wins_batch", "R"): v}
            for line in lines
            for k, v in json.loads(line).items()
            if not k.startswith(drop)
        ]
    assert logged["pairwise"] == logged["batch"]
    means = [v for entry in logged["pairwise"] for k, v in entry.items() if k.endswith("R/mean")]
    assert len(means) == 2 and all(m == pytest.approx(0.5) for m in means)  # a group's win rates average 1/2
    assert any(v > 0 for entry in logged["pairwise"] for k, v in entry.items() if k.endswith("R/std"))  # it varied


# ----------------------------------------------------------------------------- flowalign


def test_a_group_of_one_image_is_one_line_naming_the_reward():
    from flowalign.rewards.pairwise import win_rate_reward
    from flowalign.rewards.plugins import RewardError, call_reward

    reward = win_rate_reward(lambda prompt, a, b: 0.5)
    images = torch.zeros(3, 3, 4, 4)
    pairs = call_reward("w", reward, images[:2], ["p", "p"], [{}] * 2, groups=[0, 0])
    assert pairs.tolist() == [0.5, 0.5]  # every comparison a tie
    with pytest.raises(RewardError, match="reward 'w' raised ValueError: a group of 1 has no other member to compare"):
        call_reward("w", reward, images, ["p", "p", "q"], [{}] * 3, groups=[0, 0, 1])


def image_probe(directory: str):
    """Factory: a batch reward (trained at weight 0) that saves every batch it is asked to score, so the test can
    recompute the pairwise reward from the very images it saw."""
    Path(directory).mkdir(parents=True, exist_ok=True)

    def reward(images, prompts, metadata):
        index = len(list(Path(directory).glob("*.pt")))
        torch.save({"images": images.cpu(), "prompts": prompts, "metadata": metadata}, f"{directory}/{index:04d}.pt")
        return torch.zeros(len(prompts))

    return reward


def _recomputed_win_rates(images, prompts, keys, temperature: float) -> dict:
    """key -> win rate, by hand: p = the shipped classifier's probability of the prompted digit, P(i > j) =
    1 / (1 + exp(-(p_i - p_j) / T)), w_i = the mean over the others of i's group (the images sharing its key)."""
    from flowalign import toy

    classifier = toy.load_digit_classifier(toy.SHIPPED_DIR / "digit_classifier")
    with torch.no_grad():
        probs = classifier(images).softmax(dim=-1)  # [B, 10]
    p = [probs[i, toy.digit_in_prompt(prompt)].item() for i, prompt in enumerate(prompts)]
    rates = {}
    for i, key in enumerate(keys):
        others = [j for j, other in enumerate(keys) if other[:-1] == key[:-1] and j != i]
        rates[key] = sum(1 / (1 + math.exp(-(p[i] - p[j]) / temperature)) for j in others) / len(others)
    return rates


def test_mixgrpo_with_the_digit_win_rate_logs_the_win_rates_recomputed_from_the_classifier(
    tmp_path,
):
    from flowalign import toy
    from flowalign.train import train

    name, probe, temperature = (
        "flowalign.rewards.pairwise:digit_win_rate",
        "tests.test_pairwise_rewards:image_probe",
        0.05,
    )
    out, saved = tmp_path / "run", tmp_path / "probe"
    config = tiny_config(
        toy.ensure_digits_pipeline(),  # the embedded digits with the tiny settings: p varies within a group
        out,
        *ALGORITHMS["mixgrpo"],
        "train.group_size=3",
        "data.eval_seeds=3",
        "log.checkpoint_every=0",
        f"reward.weights={{{name}: 1.0, {probe}: 0.0}}",
        f"reward.kwargs={{{name}: {{temperature: {temperature}, path: {toy.SHIPPED_DIR}}}, "
        f"{probe}: {{directory: {saved}}}}}",
    )
    train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    batches = [torch.load(path) for path in sorted(saved.glob("*.pt"))]
    for iteration in (1, 2):  # the training batches: group = the sample's prompt slot (3 samples each)
        seen = [
            b
            for b in batches
            if b["metadata"][0].get("split") == "train" and b["metadata"][0]["iteration"] == iteration
        ]
        images = torch.cat([b["images"] for b in seen])  # [6, 3, H, W]
        metadata = [m for b in seen for m in b["metadata"]]
        keys = [(m["sample"] // 3, m["sample"]) for m in metadata]
        rates = torch.tensor(
            list(_recomputed_win_rates(images, [p for b in seen for p in b["prompts"]], keys, temperature).values()),
            dtype=torch.float64,
        )
        assert len(rates) == 6
        record = records[iteration]
        assert record[f"reward/{name}/mean"] == pytest.approx(0.5, abs=1e-6)  # a group's win rates average 1/2
        assert record[f"reward/{name}/std"] == pytest.approx(rates.std(unbiased=False).item(), abs=1e-5)
        assert record[f"reward/{name}/std"] > 0.01  # the images differ: the reward carries a signal
    for done in (0, 1, 2):  # the evaluation: each prompt's 3 seeds one group, per-sample scores in eval/iter-N.json
        seen = [b for b in batches if b["metadata"][0].get("split") == "eval"][done]
        keys = [(m["sample"] // 3, m["sample"]) for m in seen["metadata"]]
        expected = list(_recomputed_win_rates(seen["images"], seen["prompts"], keys, temperature).values())
        logged = json.loads((out / "eval" / f"iter-{done:06d}.json").read_text())[name]
        assert logged == pytest.approx(expected, abs=1e-5)
        assert records[done][f"eval/{name}"] == pytest.approx(0.5, abs=1e-6)

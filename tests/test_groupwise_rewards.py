"""Groupwise rewards (shared.reward_calls): a reward marked `groupwise = True` is called once per group with that
group's prompt and members, in both front ends. A groupwise reward and a batch reward that compute the same scores
give the same run; a group's bad output and the places where a group is not whole are one line each."""

import json

import pytest
import torch

from llmalign.cli import main
from shared.reward_calls import GroupOutputError, groupwise, is_groupwise, score_groups, with_deadline
from shared.checkpoint import latest_checkpoint, load_state
from tests.multiproc import kill_at_checkpoint, run_processes
from tests.test_llm_grpo import overrides, tiny_lm_dir  # noqa: F401  (fixture)
from tests.test_train_smoke import ALGORITHMS, tiny_config, tiny_overrides, tiny_pipeline_dir  # noqa: F401  (fixture)

CALLS: list[dict] = []


def _ranks(keys: list) -> list[float]:
    """Each member's share of the others that sort strictly before it: a score that needs the whole group."""
    others = max(len(keys) - 1, 1)
    return [sum(other < mine for other in keys) / others for mine in keys]


@groupwise
def text_rank(prompt, completions, **columns):
    CALLS.append({"prompt": prompt, "completions": list(completions), **columns})
    return _ranks(completions)


def text_rank_batch(prompts, completions, group_size, **columns):
    """The same scores from the whole batch, by the batch signature."""
    return [s for g in range(0, len(completions), group_size) for s in _ranks(completions[g : g + group_size])]


@groupwise
def one_short(prompt, completions, **columns):
    return [0.0] * (len(completions) - 1)


def test_score_groups_places_each_groups_scores_by_hand():
    seen = []

    def call(members):
        seen.append(members)
        return torch.tensor([10.0 * members[0] + k for k in range(len(members))]) if members[0] else [None, 2.5]

    # items 0, 3 form group 7; 1, 2, 4 group 1: groups need not be contiguous
    assert score_groups([7, 1, 1, 7, 1], call) == [None, 10.0, 11.0, 2.5, 12.0]  # group 1: 10 * 1 + (0, 1, 2)
    assert seen == [[0, 3], [1, 2, 4]]
    with pytest.raises(GroupOutputError, match="returned 1 scores for group 1 of 3"):
        score_groups([7, 1, 1, 7, 1], lambda members: [0.0] * (2 if members[0] == 0 else 1))
    with pytest.raises(GroupOutputError, match="returned a str at position 0 .* for group 7"):
        score_groups([7, 7], lambda members: ["a", 1.0])


def test_the_mark_survives_the_deadline_wrapper():
    assert is_groupwise(with_deadline(text_rank, 5.0)) and not is_groupwise(with_deadline(text_rank_batch, 5.0))


def _records(out):
    drop = ("time/", "timestamp", "tokens_per_second")
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(drop)}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def test_grpo_with_a_groupwise_reward_equals_the_same_scores_from_a_batch_reward(tiny_lm_dir, tmp_path):  # noqa: F811
    CALLS.clear()
    runs = {}
    for name in ("text_rank", "text_rank_batch"):
        out = tmp_path / name
        main(["grpo", *overrides(tiny_lm_dir, out, f"reward.weights={{tests.test_groupwise_rewards:{name}: 1.0}}")])
        runs[name] = out
    grouped, batch = _records(runs["text_rank"]), _records(runs["text_rank_batch"])
    rename = lambda r: {k.replace("text_rank_batch", "text_rank"): v for k, v in r.items()}
    assert grouped == [rename(r) for r in batch]
    assert any(0 < v < 1 for r in grouped for k, v in r.items() if "text_rank" in k and "mean" in k)  # it varied
    # one call per group: 2 iterations x 2 prompts, each with one prompt string and its 3 completions and columns
    assert len(CALLS) == 4
    for call in CALLS:
        assert isinstance(call["prompt"], str) and len(call["completions"]) == 3
        assert len(call["answer"]) == 3 and len(set(call["answer"])) == 1 and len(call["completion_ids"]) == 3
        assert call["group_size"] == 3


def test_a_groupwise_reward_with_too_few_scores_stops_naming_it(tiny_lm_dir, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", *overrides(tiny_lm_dir, tmp_path, "reward.weights={tests.test_groupwise_rewards:one_short: 1}")])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert "reward 'tests.test_groupwise_rewards:one_short' returned 2 scores for group 0 of 3" in err[-1]


@pytest.mark.parametrize(
    "extra, field",
    [
        (["rollout.rethink_fraction=0.5", "rollout.rethink_style=continue"], "rollout.rethink_fraction"),
        (
            ["rollout.schedule=dars_et", "algorithm.correct_reward=tests.test_groupwise_rewards:text_rank"],
            "rollout.schedule",
        ),
        (
            [
                "algorithm.name=spo_tree",
                "train.group_size=4",
                "algorithm.spo_tree_branching=[2, 2]",
                "algorithm.spo_tree_segment_tokens=4",
            ],
            "algorithm.name",
        ),
        (
            ["reward.weights={accuracy: 1.0}", "eval.rewards={tests.test_groupwise_rewards:text_rank: {}}"],
            "eval.rewards",
        ),
    ],
)
def test_a_groupwise_reward_where_groups_are_not_whole_is_one_line(tiny_lm_dir, tmp_path, capsys, extra, field):  # noqa: F811
    reward = [] if "eval.rewards" == field else ["reward.weights={tests.test_groupwise_rewards:text_rank: 1.0}"]
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", *overrides(tiny_lm_dir, tmp_path, *reward, *extra)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(err) == 1 and field in err[0] and "groupwise" in err[0]


# ----------------------------------------------------------------------------- flowalign


def _brightness_ranks(images) -> list[float]:
    return _ranks(images.mean(dim=(1, 2, 3)).tolist())


@groupwise
def brightness_rank(images, prompt, metadata):
    assert isinstance(prompt, str) and len(metadata) == len(images)
    return _brightness_ranks(images)


def brightness_rank_batch(images, prompts, metadata):
    """The same scores from a batch reward: the groups found from the samples' indices (2 per group)."""
    keys = [(m.get("split"), m.get("sample", 0) // 2) for m in metadata]
    scores = [0.0] * len(keys)
    for key in dict.fromkeys(keys):
        members = [i for i, k in enumerate(keys) if k == key]
        for i, value in zip(members, _brightness_ranks(images[members])):
            scores[i] = value
    return scores


FLOW_GROUPS = ["train.group_size=2", "data.eval_seeds=2", "log.checkpoint_every=0"]


def _flow_statistics(out) -> list[dict]:
    keep = ("reward/", "eval/", "eval_se/", "train/loss")
    rename = lambda k: k.replace("brightness_rank_batch", "brightness_rank")
    return [
        {rename(k): v for k, v in json.loads(line).items() if k.startswith(keep)}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def test_flow_grpo_with_a_groupwise_reward_equals_the_same_scores_from_a_batch_reward(tiny_pipeline_dir, tmp_path):  # noqa: F811
    from flowalign.train import train

    for name in ("brightness_rank", "brightness_rank_batch"):
        reward = f"reward.weights={{tests.test_groupwise_rewards:{name}: 1.0}}"
        train(tiny_config(tiny_pipeline_dir, tmp_path / name, reward, *FLOW_GROUPS))
    grouped, batch = (
        _flow_statistics(tmp_path / "brightness_rank"),
        _flow_statistics(tmp_path / "brightness_rank_batch"),
    )
    assert grouped == batch
    name = "tests.test_groupwise_rewards:brightness_rank"
    assert len(grouped) == 3 and all(f"eval/{name}" in r for r in grouped)
    # 2 members per group: ranks 0 and 1 (a tie gives 0 and 0), so every mean is 0.5 or below
    assert all(0 <= r[f"reward/{name}/mean"] <= 0.5 for r in grouped[1:])


def test_flow_groupwise_evaluation_on_two_processes_equals_one(tiny_pipeline_dir, tmp_path):  # noqa: F811
    """3 prompts x 2 seeds over 2 ranks: prompt 2's seeds lie on both ranks, and are still scored as one group."""
    reward = "reward.weights={tests.test_groupwise_rewards:brightness_rank: 1.0}"
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        args = tiny_overrides(tiny_pipeline_dir, out, reward, *FLOW_GROUPS, "train.iterations=1")
        done = run_processes(processes, ["flowalign/train.py", *args])
        assert done.returncode == 0, done.stderr[-3000:]
        results[processes] = _flow_statistics(out)
    evals = lambda records: [{k: v for k, v in r.items() if k.startswith("eval")} for r in records]
    assert evals(results[1]) == evals(results[2])
    assert len(results[1]) == 2 and all(evals(results[1]))
    # the training groups too: iteration 1's rewards, scored per group on whichever rank holds it, gathered
    train_rewards = lambda records: {k: v for k, v in records[1].items() if k.startswith("reward/")}
    assert train_rewards(results[1]) and train_rewards(results[1]) == train_rewards(results[2])


def test_flow_groupwise_reward_sigkill_then_resume_is_bit_identical(tiny_pipeline_dir, tmp_path):  # noqa: F811
    from flowalign.train import train

    reward = "reward.weights={tests.test_groupwise_rewards:brightness_rank: 1.0}"
    extra = (reward, "train.group_size=2", "train.iterations=3", "log.checkpoint_every=1", "log.eval_every=0")
    train(tiny_config(tiny_pipeline_dir, tmp_path / "straight", *extra))
    out = tmp_path / "killed"
    args = ["flowalign/train.py", *tiny_overrides(tiny_pipeline_dir, out, *extra)]
    kill_at_checkpoint(1, args, out / "checkpoints")
    train(tiny_config(tiny_pipeline_dir, out, *extra), resume=True)
    straight = load_state(latest_checkpoint(tmp_path / "straight" / "checkpoints"), "trainable")
    resumed = load_state(latest_checkpoint(out / "checkpoints"), "trainable")
    assert straight.keys() == resumed.keys() and latest_checkpoint(out / "checkpoints").name == "step-000003"
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_flow_tempflow_refuses_a_groupwise_reward_in_one_line(tiny_pipeline_dir, tmp_path, capsys):  # noqa: F811
    from flowalign.cli import flow_grpo_main

    reward = "reward.weights={tests.test_groupwise_rewards:brightness_rank: 1.0}"
    with pytest.raises(SystemExit) as exit_info:
        flow_grpo_main(tiny_overrides(tiny_pipeline_dir, tmp_path, reward, *ALGORITHMS["tempflow"]))
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loaders' progress bars
    assert exit_info.value.code == 2 and err.startswith("config error:"), err
    assert "reward.weights" in err and "tempflow" in err and "groupwise" in err

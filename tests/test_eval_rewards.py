"""eval.rewards: rewards scored at evaluation only, logged as eval/<name> next to the training rewards' eval
metrics, loaded and checked before training (flowalign and llmalign)."""

import json

import pytest

from flowalign.train import main as flow_main
from flowalign.train import train
from tests.test_llm_grpo import overrides as llm_overrides
from tests.test_llm_grpo import tiny_lm_dir  # noqa: F401  (fixture)
from tests.test_train_smoke import tiny_config, tiny_overrides, tiny_pipeline_dir  # noqa: F401  (fixture)

TRAINED = "flowalign.rewards:jpeg_incompressibility"  # the tiny config's training reward: +JPEG size in kB
HELD_OUT = "flowalign.rewards:jpeg_compressibility"  # -JPEG size in kB: on the same images, exactly its negative


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_flow_eval_reward_is_scored_on_the_eval_samples_only(tiny_pipeline_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    result = train(tiny_config(tiny_pipeline_dir, out, "train.iterations=1",
                               f"eval.rewards={{{HELD_OUT}: {{quality: 95}}}}"))
    logged = records(out)
    assert [r["iteration"] for r in logged] == [0, 1]
    for record in logged:  # before training and after its iteration
        assert record[f"eval/{HELD_OUT}"] == -record[f"eval/{TRAINED}"] != 0
    assert not any(key.startswith(f"reward/{HELD_OUT}") for key in logged[1])  # never a training reward
    assert f"reward/{TRAINED}/mean" in logged[1]
    assert set(result["after"]) == {f"eval/{TRAINED}", f"eval/{HELD_OUT}"}


@pytest.mark.parametrize("entry, code, message", [
    ("{nomodule: {}}", 2, "config error: config field 'eval.rewards': "),
    (f"{{{TRAINED}: {{}}}}", 2, f"config error: config field 'eval.rewards': ['{TRAINED}'] already in reward.weights"),
    ("{flowalign.no_such_module:score: {}}", 3, "reward error: eval.rewards: reward 'flowalign.no_such_module:score'"
                                                ": cannot import module"),
    (f"{{{HELD_OUT}: {{colour: 1}}}}", 3, f"reward error: eval.rewards: reward '{HELD_OUT}': calling it with"),
])
def test_flow_bad_eval_reward_stops_before_training_with_one_line(tiny_pipeline_dir, tmp_path, capsys,  # noqa: F811
                                                                 entry, code, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        flow_main(tiny_overrides(tiny_pipeline_dir, out, "train.iterations=1", f"eval.rewards={entry}"))
    assert stopped.value.code == code
    last_line = capsys.readouterr().err.splitlines()[-1]  # after the model's loading bars, where it loaded
    assert last_line.startswith(message), last_line
    assert not (out / "metrics.jsonl").exists()  # nothing evaluated or trained


# ------------------------------------------------------------------------------------------------ llmalign
def test_llm_eval_rewards_score_the_greedy_held_out_completions(tiny_lm_dir, tmp_path):  # noqa: F811
    from llmalign.cli import main as llm_main
    from llmalign.config import LMModelConfig
    from llmalign.data import load_rows
    from llmalign.evaluate import accuracy_on
    from llmalign.policy import load_policy

    chars = "tests.test_llm_grpo:char_count_reward"  # len(completion) / 64, also a training reward there
    accuracy = "llmalign.rewards:accuracy_reward"  # the matching the held-out accuracy uses
    llm_main(["grpo", *llm_overrides(tiny_lm_dir, tmp_path, "train.iterations=1",
                                     "reward.weights={accuracy: 1.0}",
                                     f"eval.rewards={{{chars}: {{}}, {accuracy}: {{}}, format: {{}}}}")])
    logged = records(tmp_path)
    assert [r["iteration"] for r in logged] == [0, 1]
    rows = load_rows(str(tiny_lm_dir / "test.jsonl"))[:4]  # data.eval_size=4
    for record, model_dir in ((logged[0], tiny_lm_dir), (logged[1], tmp_path / "final")):
        # an independent greedy generation of the same rows by the model before and after training
        model, tokenizer = load_policy(LMModelConfig(path=str(model_dir)))
        completions = [completion for _, completion in accuracy_on(model, tokenizer, rows, 12)["samples"]]
        assert record[f"eval/{chars}"] == pytest.approx(sum(len(c) / 64 for c in completions) / len(rows), rel=1e-12)
        assert record[f"eval/{accuracy}"] == record["eval/accuracy"]
        assert record["eval/format"] == 0.0  # the untrained toy writes no <think>/<answer> tags
    assert not any(key.startswith(f"reward/{chars}") for key in logged[1])  # not trained on


@pytest.mark.parametrize("entry, code, message", [
    ("{accuracy: {}}", 2, "config error: config field 'eval.rewards': 'accuracy': the held-out evaluation logs "
                          "eval/accuracy already"),
    ("{nope: {}}", 2, "config error: config field 'eval.rewards': 'nope' is no builtin reward"),
    ("{llmalign.no_such_module:score: {}}", 3, "reward error: eval.rewards: reward 'llmalign.no_such_module:score': "
                                               "cannot import module"),
    ("{format: {colour: 1}}", 3, "reward error: eval.rewards: reward 'format' is a plain reward function and takes "
                                 "no params"),
])
def test_llm_bad_eval_reward_stops_before_training_with_one_line(tiny_lm_dir, tmp_path, capsys,  # noqa: F811
                                                                entry, code, message):
    from llmalign.cli import main as llm_main

    with pytest.raises(SystemExit) as stopped:
        llm_main(["grpo", *llm_overrides(tiny_lm_dir, tmp_path / "run", f"eval.rewards={entry}")])
    assert stopped.value.code == code
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.startswith(message), last_line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

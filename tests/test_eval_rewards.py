"""eval.rewards: rewards scored at evaluation only, logged as eval/<name> next to the training rewards' eval
metrics, loaded and checked before training (flowalign and llmalign)."""

import json

import pytest

from flowalign.train import main as flow_main
from flowalign.train import train
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

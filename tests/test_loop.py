"""shared.loop.run_loop with a recipe of plain Python numbers: the order of the stages, the evaluation and
checkpoint cadence, the before/after records, the time of the NaN stop and a recipe's early stop."""

import json

import pytest

from shared.loop import Plan, run_loop
from shared.run import Run


class Counting:
    """A recipe whose batch is a list of the stages it went through; update returns their count."""

    def __init__(self, total=5, fail_at=None, stop_after=None):
        self.total, self.fail_at, self.stop_after, self.calls, self.saved = total, fail_at, stop_after, [], []

    def setup(self, run):
        self.run = run
        return Plan(start=0, total=self.total, label="count", unit="step")

    def rollout(self, iteration):
        self.calls.append(("rollout", iteration))
        return [iteration, "rollout"]

    def reward(self, batch):
        return [*batch, "reward"]

    def advantage(self, batch):
        return [*batch, "advantage"]

    def update(self, batch):
        if batch[0] == self.fail_at:
            raise FloatingPointError("loss is nan")
        return {"stages": len(batch) - 1}

    def record(self, batch, metrics):
        return {"train/stages": metrics["stages"], "train/first": batch[0]}

    def evaluate(self, done):
        return {"eval/done": float(done)}

    def stop_early(self):
        return self.stop_after is not None and len(self.calls) >= self.stop_after

    def save(self, done):
        self.saved.append(done)


def records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_stages_run_in_order_with_eval_and_checkpoint_cadence(tmp_path):
    recipe = Counting(total=5)
    result = run_loop(recipe, Run(tmp_path / "run", resume=False, tag="[t]"), eval_every=2, checkpoint_every=3)
    got = records(tmp_path / "run")
    assert [r["iteration"] for r in got] == [0, 1, 2, 3, 4, 5]
    assert all(r["train/stages"] == 3 for r in got[1:])  # rollout, reward, advantage, then update
    assert [r["train/first"] for r in got[1:]] == [0, 1, 2, 3, 4]
    assert [r["iteration"] for r in got if "eval/done" in r] == [0, 2, 4, 5]  # before, every 2, the last
    assert recipe.saved == [3, 5]  # every 3, the last
    assert result == {"before": {"eval/done": 0.0}, "after": {"eval/done": 5.0}}


def test_a_nan_update_stops_naming_the_step(tmp_path):
    recipe = Counting(total=5, fail_at=2)
    with pytest.raises(FloatingPointError, match=r"^step 3: loss is nan; the last good checkpoint is"):
        run_loop(recipe, Run(tmp_path / "run", resume=False, tag="[t]"), eval_every=0, checkpoint_every=1)
    assert recipe.saved == [1, 2]


def test_an_early_stop_evaluates_and_saves_as_the_last_iteration(tmp_path):
    recipe = Counting(total=10, stop_after=3)
    run_loop(recipe, Run(tmp_path / "run", resume=False, tag="[t]"), eval_every=0, checkpoint_every=0)
    got = records(tmp_path / "run")
    assert [r["iteration"] for r in got] == [0, 1, 2, 3] and "eval/done" in got[-1]
    assert recipe.saved == [3]


class Phased(Counting):
    """Iterate's shape: restored inside iteration `start`, its records logged at its own step, its NaN stop already
    phrased by a nested run."""

    def setup(self, run):
        self.run = run
        return Plan(start=1, total=3, label="phased", resumed_inside=True, wrap_nan_stop=False)

    def record(self, batch, metrics):
        return {"iteration": 10 * (batch[0] + 1)}


def test_a_run_restored_inside_an_iteration_skips_the_before_evaluation_and_logs_at_its_own_step(tmp_path):
    result = run_loop(Phased(), Run(tmp_path / "run", resume=False, tag="[t]"), eval_every=1, checkpoint_every=1)
    assert [r["iteration"] for r in records(tmp_path / "run")] == [20, 30]
    assert result["before"] == {}


def test_a_nested_runs_nan_stop_passes_through_unchanged(tmp_path):
    with pytest.raises(FloatingPointError, match=r"^loss is nan$"):
        run_loop(Phased(fail_at=1), Run(tmp_path / "run", resume=False, tag="[t]"), eval_every=0, checkpoint_every=1)

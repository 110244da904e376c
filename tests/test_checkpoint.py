import random

import numpy as np
import pytest
import torch

from shared.checkpoint import (flatten_state, latest_checkpoint, load_state, open_output_dir, rng_state,
                               save_checkpoint, set_rng_state, unflatten_state)


def test_optimizer_state_round_trips_exactly(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, {"optimizer": optimizer.state_dict()})
    loaded = load_state(path, "optimizer")
    original = optimizer.state_dict()
    assert loaded["param_groups"] == original["param_groups"]
    for key, value in original["state"].items():
        for name, tensor in value.items():
            torch.testing.assert_close(loaded["state"][key][name], tensor, rtol=0, atol=0)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    fresh.load_state_dict(loaded)  # the loaded dict is a real optimizer state dict


def test_rng_state_restores_all_generators(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(tmp_path, 5, {"rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_state(path, "rng"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_latest_pointer_and_keep_last(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"trainer": {"step": step}}, keep_last=2)
    assert latest_checkpoint(tmp_path).name == "step-000003"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002", "step-000003"]
    assert load_state(latest_checkpoint(tmp_path), "trainer") == {"step": 3}


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, {"trainer": {"step": 1}})

    def crash(_tmp_dir):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"trainer": {"step": 2}}, extra_writer=crash)
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert load_state(latest_checkpoint(tmp_path), "trainer") == {"step": 1}
    assert not (tmp_path / "step-000002").exists()


def test_flatten_keeps_tuples_ints_keys_and_rejects_objects():
    state = {"a": (1, 2.5, "x"), 3: [torch.ones(2), None]}
    skeleton, tensors = flatten_state(state)
    assert list(tensors) == ["3.0"]
    restored = unflatten_state(skeleton, tensors)
    assert restored["a"] == (1, 2.5, "x") and restored[3][1] is None
    with pytest.raises(TypeError, match="cannot save a object"):
        flatten_state({"bad": object()})


def test_replaced_atomically_swaps_only_on_success(tmp_path):
    from shared.checkpoint import replaced_atomically

    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with replaced_atomically(out) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("interrupted build")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind
    assert (out / "old.txt").read_text() == "old"
    with replaced_atomically(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_a_fresh_run_refuses_a_directory_with_a_checkpoint_and_a_start_from_step_0_resets_stale_logs(tmp_path):
    from shared.config import ConfigError

    stale_lines = '{"iteration": 0, "x": 1}\n{"iteration": 1, "x": 2}\n'
    for resume in (False, True):  # a run stopped before its first checkpoint: fresh or --resume, it restarts at 0
        stale = tmp_path / f"stopped-{resume}"
        stale.mkdir()
        (stale / "metrics.jsonl").write_text(stale_lines)
        (stale / "samples.jsonl").write_text(stale_lines)
        assert open_output_dir(stale, resume) is None
        assert (stale / "metrics.jsonl").read_text() == "" and (stale / "samples.jsonl").read_text() == ""
    assert open_output_dir(tmp_path / "new", resume=False) is None  # a directory that does not exist yet is fine
    used = tmp_path / "used"
    save_checkpoint(used / "checkpoints", 3, {"trainer": {"iteration": 3}})
    (used / "metrics.jsonl").write_text('{"iteration": 3}\n')
    with pytest.raises(ConfigError, match=r"log.output_dir: .*step-000003.*--resume"):
        open_output_dir(used, resume=False)
    assert (used / "metrics.jsonl").read_text() == '{"iteration": 3}\n'  # nothing lost
    assert open_output_dir(used, resume=True).name == "step-000003"  # the trainer trims the logs to it
    assert (used / "metrics.jsonl").read_text() == '{"iteration": 3}\n'

import errno
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.checkpoint import (
    flatten_state,
    latest_checkpoint,
    load_state,
    open_output_dir,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_state,
)


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


def test_keep_last_sorts_checkpoints_by_step_number(tmp_path):
    for step in (999_998, 999_999, 1_000_000):  # by name, step-1000000 sorts before step-999998
        save_checkpoint(tmp_path, step, {"trainer": {"step": step}}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-1000000", "step-999999"]
    assert load_state(latest_checkpoint(tmp_path), "trainer") == {"step": 1_000_000}


def test_leftovers_of_a_killed_checkpoint_write_are_removed_at_start(tmp_path, capsys):
    out = tmp_path / "run"
    save_checkpoint(out / "checkpoints", 3, {"trainer": {"iteration": 3}})
    orphan = out / "checkpoints" / ".tmp-step-000004-4242"  # a run killed while writing step 4
    orphan.mkdir()
    (orphan / "trainable.safetensors").write_bytes(b"half")
    (out / "checkpoints" / ".latest.tmp-4242").write_text("step-0000")
    (out / ".final.tmp-4242").symlink_to("checkpoints/step-000003")
    (out / ".metrics.jsonl.tmp-4242").write_text('{"iteration": 1}\n')
    (out / ".model.tmp-abc").mkdir()  # someone else's temporary directory (replaced_atomically): not ours to delete
    assert open_output_dir(out, resume=True).name == "step-000003"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000003"]
    assert sorted(p.name for p in out.iterdir()) == [".model.tmp-abc", "checkpoints"]
    assert capsys.readouterr().out.count("left unfinished by a run killed while writing a checkpoint") == 4
    assert load_state(latest_checkpoint(out / "checkpoints"), "trainer") == {"iteration": 3}


def no_space(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("failing", ["safetensors", "latest pointer", "tokenizer.json"])
def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    import shared.checkpoint as checkpoint_module

    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, {"trainer": {"step": 1}, "trainable": {"w": torch.ones(3)}})
    if failing == "safetensors":
        real = checkpoint_module.save_file

        def save_file(tensors, filename):  # the disk fills up at the second state of step 2
            if filename.endswith("trainable.safetensors"):
                no_space(filename)
            real(tensors, filename)

        monkeypatch.setattr(checkpoint_module, "save_file", save_file)
        expected = (
            f"cannot write checkpoint {root / 'step-000002'} (No space left on device: "
            f"{root / 'step-000002' / 'trainable.safetensors'}); {root / 'step-000001'} is intact and "
            f"--resume starts from it"
        )
    elif failing == "tokenizer.json":  # tokenizers (Rust) raises a plain Exception on a full disk (seen here)

        def extra_writer(directory):
            raise Exception("No space left on device (os error 28)")

        expected = (
            f"cannot write checkpoint {root / 'step-000002'} (No space left on device); "
            f"{root / 'step-000001'} is intact and --resume starts from it"
        )
    else:
        real_write = Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name.startswith(".latest.tmp-"):
                no_space(self)
            return real_write(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
        expected = None
    with pytest.raises(checkpoint_module.WriteError) as error:
        save_checkpoint(
            root,
            2,
            {"trainer": {"step": 2}, "trainable": {"w": torch.zeros(3)}},
            keep_last=1,
            extra_writer=extra_writer if failing == "tokenizer.json" else None,
        )
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message
    if expected is not None:
        assert message == expected
    assert message.endswith(f"{root / 'step-000001'} is intact and --resume starts from it")
    monkeypatch.undo()
    assert latest_checkpoint(root).name == "step-000001"  # still named by `latest`, still loads, not pruned
    assert load_state(latest_checkpoint(root), "trainer") == {"step": 1}
    assert torch.equal(load_state(latest_checkpoint(root), "trainable")["w"], torch.ones(3))
    assert not list(root.glob(".tmp-step-*")) and not list(root.glob(".latest.tmp-*"))  # no leftovers


def test_a_real_write_failure_inside_safetensors_is_reported_the_same(tmp_path):
    """safetensors raises its own SafetensorError, not OSError, when the operating system refuses a write; a file
    size limit (RLIMIT_FSIZE, in a child process) makes a real refusal (EFBIG) without filling a disk."""
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        from shared.checkpoint import WriteError, latest_checkpoint, load_state, save_checkpoint
        root = {str(tmp_path / "checkpoints")!r}
        save_checkpoint(root, 1, {{"trainable": {{"w": torch.ones(10)}}}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            save_checkpoint(root, 2, {{"trainable": {{"w": torch.ones(1_000_000)}}}})  # 4 MB
        except WriteError as error:
            print(error)
        print(latest_checkpoint(root).name, float(load_state(latest_checkpoint(root), "trainable")["w"].sum()))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    error_line, state_line = done.stdout.splitlines()
    step_2 = tmp_path / "checkpoints" / "step-000002"
    assert error_line.startswith(f"cannot write checkpoint {step_2} (File too large")
    assert error_line.endswith(f"{tmp_path / 'checkpoints' / 'step-000001'} is intact and --resume starts from it")
    assert state_line == "step-000001 10.0"
    assert not list((tmp_path / "checkpoints").glob(".tmp-step-*"))


def test_a_link_is_repointed_atomically_with_latest_before_pruning(tmp_path, monkeypatch):
    import shared.checkpoint as checkpoint_module

    run_dir, root = tmp_path, tmp_path / "checkpoints"
    link = (run_dir / "final", "model")

    def with_model(step):
        return lambda directory: ((directory / "model").mkdir(), (directory / "model" / "step").write_text(str(step)))

    save_checkpoint(root, 1, {"trainer": {"step": 1}}, keep_last=1, extra_writer=with_model(1), link=link)
    assert (run_dir / "final" / "step").read_text() == "1"
    real_replace = os.replace
    seen_at_swap = []

    def replace(src, dst):  # just before the link's rename: a kill here must leave `final` naming a whole model
        if Path(dst) == run_dir / "final":
            seen_at_swap.append((run_dir / "final" / "step").read_text())
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", replace)
    save_checkpoint(root, 2, {"trainer": {"step": 2}}, keep_last=1, extra_writer=with_model(2), link=link)
    assert seen_at_swap == ["1"]  # the old link was still in place, not unlinked first
    assert os.readlink(run_dir / "final") == os.path.join("checkpoints", "step-000002", "model")  # relative
    assert (run_dir / "final" / "step").read_text() == "2"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002"]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".final.tmp-")]

"""shared.run on 2 real processes: whole-group blocks, gathers in rank order, global sums, the synchronised
stop, main-only logs, per-rank RNG states in checkpoints, and the divisibility refusal."""

import json
import textwrap

import pytest

from tests.multiproc import run_processes

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from shared.run import Run
    from shared.config import ConfigError
    out, resume = sys.argv[1], sys.argv[2] == "resume"
    run = Run(out, resume=resume, tag="[test]")
    result = {"world": run.world, "rank": run.rank}
    result["block"] = list(run.block(6))
    result["gather"] = run.gather(torch.tensor([[run.rank, 10 + run.rank]])).tolist()
    result["objects"] = run.gather_objects([f"r{run.rank}"])
    result["sum"] = float(run.sum(run.rank + 1.0))
    result["max"] = float(run.max(run.rank * 5.0))
    result["any"] = run.any(run.rank == 1)
    try:
        run.require_divisible(3, "train.prompts_per_iteration", "prompts")
        result["refused"] = None
    except ConfigError as error:
        result["refused"] = str(error)
    if resume:
        result["start"] = run.restore()
        result["draw"] = torch.rand(2).tolist()  # continues each rank's own saved stream
    else:
        torch.manual_seed(100 + run.rank)  # a different RNG stream per rank
        run.append({"iteration": 1, "rank": run.rank})
        run.save_checkpoint(1, {"trainer": {"iteration": 1}}, keep_last=2)
        result["draw"] = torch.rand(2).tolist()  # what a resumed rank must draw next
    run.close()
    with open(f"{out}.{'resume' if resume else 'fresh'}.rank{result['rank']}.json", "w") as handle:
        json.dump(result, handle)  # a file per rank: two ranks' stdout lines can interleave
""")


def results(completed, out, phase: str) -> dict[int, dict]:
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = [json.loads(path.read_text()) for path in sorted(out.parent.glob(f"{out.name}.{phase}.rank*.json"))]
    return {row["rank"]: row for row in rows}


@pytest.mark.timeout(120)
def test_run_helpers_on_two_processes(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    first = results(run_processes(2, [str(script), str(out), "fresh"]), out, "fresh")
    assert sorted(first) == [0, 1] and all(r["world"] == 2 for r in first.values())
    assert first[0]["block"] == [0, 1, 2] and first[1]["block"] == [3, 4, 5]
    for r in first.values():
        assert r["gather"] == [[0, 10], [1, 11]]  # rank order
        assert r["objects"] == ["r0", "r1"]
        assert r["sum"] == 3.0 and r["max"] == 5.0 and r["any"] is True
        assert r["refused"] == ("config field 'train.prompts_per_iteration': 3 prompts do not split over 2 processes; "
                                "use a multiple of 2 (batch sizes count over all processes)")
    # one log, written once, by the main process; one checkpoint holding both ranks' RNG states
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["rank"] for line in lines] == [0]
    step = out / "checkpoints" / "step-000001"
    assert (step / "rng.json").is_file() and (step / "rng.rank1.json").is_file()

    resumed = results(run_processes(2, [str(script), str(out), "resume"]), out, "resume")
    for rank in (0, 1):
        assert resumed[rank]["start"] == 1
        assert resumed[rank]["draw"] == first[rank]["draw"]  # each rank's own stream, restored
    assert first[0]["draw"] != first[1]["draw"]


def test_one_process_run_is_plain(tmp_path):
    from shared.run import Run

    run = Run(tmp_path / "one", resume=False, tag="[test]")
    assert (run.world, run.rank, run.is_main) == (1, 0, True)
    assert list(run.block(5)) == [0, 1, 2, 3, 4]
    run.require_divisible(5, "train.prompts_per_iteration", "prompts")  # one process takes any size
    assert float(run.sum(2.5)) == 2.5 and run.any(False) is False


def test_fp16_without_a_gpu_is_refused(tmp_path):
    import torch

    from shared.config import ConfigError
    from shared.run import Run

    if torch.cuda.is_available():
        pytest.skip("fp16 autocast works on a GPU")
    with pytest.raises(ConfigError, match="'train.mixed_precision': fp16 needs a GPU"):
        Run(tmp_path / "fp16", resume=False, tag="[test]", mixed_precision="fp16")
    assert not (tmp_path / "fp16").exists()  # refused before anything is written

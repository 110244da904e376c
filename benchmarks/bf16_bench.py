"""float32 against bf16 autocast on this CPU: the embedded default's (configs/flow/mixgrpo.yaml) rollout and update
seconds per iteration, and the update's achieved FLOP/s as a share of both matmul peaks. Prints a table.

    python benchmarks/bf16_bench.py [--iterations 12] [--repeats 2]

Each precision runs the recipe for --iterations iterations (evaluation and checkpoints off), the two precisions
alternating --repeats times so that a machine busy with other work slows both alike; the first iteration of each
run is dropped (warm-up) and the table gives medians. The update's FLOPs are counted by torch's FlopCounterMode
over the update stage of a 2-iteration run (the count does not depend on the precision).
Goal stated in the table: the update at 40% or more of the bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.cpu_flops import matmul_peak, matmul_rate  # noqa: E402

RECIPE = ROOT / "configs" / "flow" / "mixgrpo.yaml"
MODEL_MATMUL = (1280, 64, 64)  # [rows, k, n]: 80 samples x 16 image tokens through a 64-wide layer of the toy
GOAL = 0.40  # the update's share of the bf16 matmul peak we aim for


def overrides(precision: str, iterations: int, out: Path) -> list[str]:
    return [
        f"log.output_dir={out}",
        f"train.iterations={iterations}",
        "budget.max_seconds=100000",
        "log.eval_every=0",
        "log.checkpoint_every=0",
        f"memory.mixed_precision={precision}",
    ]


def timed_run(precision: str, iterations: int, out: Path) -> dict[str, float]:
    """Median rollout and update seconds per iteration (the first iteration dropped). A process of its own per run:
    accelerate's state, mixed precision included, is fixed once per process."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "flowalign/train.py", "--config", str(RECIPE), *overrides(precision, iterations, out)]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:]
    return {key: statistics.median(r[f"time/{key}"] for r in records) for key in ("rollout", "update")}


def update_flops_per_iteration(out: Path, iterations: int = 2) -> float:
    """FLOPs of the update stage per iteration, counted on a float32 run."""
    import flowalign.train as flow_train

    counted = {"flops": 0}
    plain = dict(flow_train.ALGORITHMS)

    def counting(update):
        def counting_update(*args, **kwargs):
            with FlopCounterMode(display=False) as counter:
                result = update(*args, **kwargs)
            counted["flops"] += counter.get_total_flops()
            return result

        return counting_update

    for name, algorithm in plain.items():  # the recipe calls its algorithm's update from this map
        flow_train.ALGORITHMS[name] = dataclasses.replace(algorithm, update=counting(algorithm.update))
    try:
        from flowalign.config import FlowGRPOConfig
        from shared.config import load_config

        shutil.rmtree(out, ignore_errors=True)
        flow_train.train(load_config(FlowGRPOConfig, RECIPE, overrides("no", iterations, out)))
    finally:
        flow_train.ALGORITHMS.update(plain)
    assert counted["flops"] > 0, "no update was counted"
    return counted["flops"] / iterations


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bf16_bench-"))
    peaks = {"no": matmul_peak(dtype=torch.float32), "bf16": matmul_peak(dtype=torch.bfloat16)}
    narrow = {p: matmul_rate(*MODEL_MATMUL, dtype=d) for p, d in (("no", torch.float32), ("bf16", torch.bfloat16))}
    flops = update_flops_per_iteration(scratch / "flops")
    runs: dict[str, list[dict]] = {"no": [], "bf16": []}
    for repeat in range(args.repeats):
        for precision in runs:
            runs[precision].append(timed_run(precision, args.iterations, scratch / f"{precision}_{repeat}"))
    rows = {
        p: {key: statistics.median(r[key] for r in results) for key in ("rollout", "update")}
        for p, results in runs.items()
    }
    threads = torch.get_num_threads()
    lines = [
        f"matmul peak (1024^3, {threads} threads): float32 {peaks['no'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s ({peaks['bf16'] / peaks['no']:.1f}x)",
        f"a matmul at the model's width ({' x '.join(map(str, MODEL_MATMUL))}): float32 {narrow['no'] / 1e9:.0f} "
        f"GFLOP/s, bf16 {narrow['bf16'] / 1e9:.0f} GFLOP/s",
        f"update FLOPs per iteration (MixGRPO, embedded digits): {flops / 1e9:.1f} GFLOP",
        "",
        "| precision | rollout s/it | update s/it | update GFLOP/s | of the float32 peak | of the bf16 peak |",
        "|---|---|---|---|---|---|",
    ]
    for precision, label in (("no", "float32"), ("bf16", "bf16 autocast")):
        achieved = flops / rows[precision]["update"]
        lines.append(
            f"| {label} | {rows[precision]['rollout']:.3f} | {rows[precision]['update']:.3f} | {achieved / 1e9:.1f} "
            f"| {achieved / peaks['no']:.1%} | {achieved / peaks['bf16']:.1%} |"
        )
    speedup = {key: rows["no"][key] / rows["bf16"][key] for key in ("rollout", "update")}
    bf16_share = flops / rows["bf16"]["update"] / peaks["bf16"]
    lines += [
        f"| bf16 speed-up (float32 s / bf16 s) | {speedup['rollout']:.2f}x | {speedup['update']:.2f}x | | | |",
        "",
        f"goal: the bf16 update at {GOAL:.0%} or more of the bf16 peak; measured {bf16_share:.1%}"
        f" ({'met' if bf16_share >= GOAL else 'not met'})",
    ]
    print("\n".join(lines))
    shutil.rmtree(scratch, ignore_errors=True)
    return {"peaks": peaks, "flops": flops, "rows": rows, "table": "\n".join(lines)}


if __name__ == "__main__":
    main()

"""The CPU's measured float32 matmul peak, and the FLOP/s a Flow-GRPO update step achieves as a fraction of it.

python benchmarks/cpu_flops.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def matmul_peak(size: int = 1024, repeats: int = 20, dtype: torch.dtype = torch.float32) -> float:
    return matmul_rate(size, size, size, repeats, dtype)


def matmul_rate(m: int, k: int, n: int, repeats: int = 20, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of the fastest of `repeats` [m, k] x [k, n] matmuls."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / min(times)


def update_step_flops() -> tuple[float, float]:
    """(FLOPs counted by torch's FlopCounterMode, median seconds) of one update() on the embedded default."""
    import tempfile

    from flowalign.config import FlowGRPOConfig
    from flowalign.train import iteration_generator, load_adapter, make_policy, rollout, update, update_parts
    from shared.config import load_config
    from shared.run import Run

    config = load_config(FlowGRPOConfig, ROOT / "configs" / "flow" / "flow_grpo.yaml", ["algorithm.updates_per_pass=1"])
    run = Run(tempfile.mkdtemp(prefix="cpu_flops-"), resume=False, tag="[cpu_flops]")
    adapter = load_adapter(config, run.device)
    params = make_policy(config, adapter.transformer)
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    prompts = config.data.prompts[: config.train.prompts_per_iteration]
    sampled = rollout(config, adapter, adapter.encode_prompts, prompts, 0, 0, None, iteration_generator(0, 0))
    batch = sampled.rows
    batch.advantage = torch.randn(len(batch))
    embeds = adapter.encode_prompts(prompts)
    steps = config.sampling.num_steps
    keys = sampled.sample_id[sampled.row_sample] * steps + batch.step  # [R]

    def one_update(iteration: int) -> None:
        (rows,) = update_parts(keys, batch.prompt_index, 1, 0, iteration)  # one optimizer step: every row
        update(config, run, adapter, optimizer, params, embeds, batch, [(rows, len(rows))], len(keys))

    with FlopCounterMode(display=False) as counter:
        one_update(1)
    times = []
    for i in range(3):
        start = time.perf_counter()
        one_update(2 + i)
        times.append(time.perf_counter() - start)
    return counter.get_total_flops(), statistics.median(times)


def main() -> dict:
    peak = matmul_peak()
    flops, seconds = update_step_flops()
    achieved = flops / seconds
    lines = [
        "| measure | value |",
        "|---|---|",
        f"| float32 matmul peak (1024^3, {torch.get_num_threads()} threads) | {peak / 1e9:.1f} GFLOP/s |",
        f"| Flow-GRPO update step (embedded default) | {flops / 1e9:.2f} GFLOP in {seconds:.2f} s |",
        f"| achieved | {achieved / 1e9:.2f} GFLOP/s = {achieved / peak:.1%} of peak |",
    ]
    print("\n".join(lines))
    return {"peak": peak, "flops": flops, "seconds": seconds, "fraction": achieved / peak, "table": "\n".join(lines)}


if __name__ == "__main__":
    main()

"""Prefix Grouper (shared-prefix forward) against the repeated-prompt forward: seconds and peak memory of one
forward + backward of completion_logprobs, on CPU, for prompt lengths 128/512/2048 and group sizes 4/8/16.
Prints a table, writes benchmarks/out/prefix_bench.csv and prefix_bench.md.

    python benchmarks/prefix_bench.py [--repeats 3] [--quick]
    python benchmarks/prefix_bench.py --one 512 8 shared      # one measurement, printed as a JSON line

Model: a Qwen2 built here (vocab 1000, hidden 256, 4 layers, 4 query / 2 KV heads, MLP 1024, float32), B = 1 prompt,
G completions of 64 tokens, all real tokens (no padding, which keeps the repeated forward on sdpa's plain causal
path, its best case). The loss is the sum of the completion log-probs; backward reaches every parameter.

Each measurement runs in a fresh subprocess so that peak memory is its own: peak RSS growth = the process's
peak RSS (VmHWM) after its first forward + backward minus its resident set just before it (model and inputs built).
This counts everything the forward and backward allocate (activations kept for backward, KV cache, logits,
parameter gradients) as the OS sees it. Time: median over --repeats runs after one warm-up run (--quick: one
run, no warm-up; P=2048 with G=16 skipped).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODEL = dict(
    vocab_size=1000,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=1024,
)
COMPLETION_LENGTH = 64
PROMPT_LENGTHS = (128, 512, 2048)
GROUP_SIZES = (4, 8, 16)
QUICK_SKIPPED = {(2048, 16)}  # about a minute per path on 2 cores: too slow for the --quick budget
PATHS = {"plain": False, "shared": True}  # path name -> completion_logprobs(shared_prefix=...)


def build_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**MODEL)).float()


def make_inputs(prompt_length: int, group_size: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(0, MODEL["vocab_size"], (1, prompt_length), generator=generator)  # [B=1, P]
    completion_ids = torch.randint(0, MODEL["vocab_size"], (group_size, COMPLETION_LENGTH), generator=generator)
    return prompt_ids, torch.ones_like(prompt_ids), completion_ids, torch.ones_like(completion_ids)  # [G, C]


def resident_bytes() -> int:
    """The process's current resident set size (Linux /proc; elsewhere the peak so far, a lower bound)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_resident_bytes()


def peak_resident_bytes() -> int:
    """Peak RSS of this process. On Linux VmHWM, which belongs to the process's own address space:
    ru_maxrss survives fork + exec, so under a big parent (run_all.py) it would report the parent's peak."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def measure_one(prompt_length: int, group_size: int, path: str, repeats: int, warmup: int, threads: int) -> dict:
    """Seconds (median) and peak RSS growth (MiB) of forward + backward; call in a fresh process."""
    from llmalign.logprobs import completion_logprobs

    torch.set_num_threads(threads)
    model = build_model()
    inputs = make_inputs(prompt_length, group_size)
    completion_mask = inputs[3]
    gc.collect()
    before = resident_bytes()
    times = []
    for run in range(warmup + repeats):
        start = time.perf_counter()
        logp = completion_logprobs(model, *inputs, group_size=group_size, shared_prefix=PATHS[path])  # [G, C]
        (logp * completion_mask).sum().backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        del logp
        if run == 0:  # later runs only add allocator fragmentation to the high-water mark
            peak_mb = (peak_resident_bytes() - before) / 2**20
        if run >= warmup:
            times.append(elapsed)
    return {
        "prompt_length": prompt_length,
        "group_size": group_size,
        "path": path,
        "seconds": statistics.median(times),
        "peak_mb": peak_mb,
        "threads": torch.get_num_threads(),
    }


def run_in_subprocess(prompt_length: int, group_size: int, path: str, repeats: int, warmup: int, threads: int) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        str(prompt_length),
        str(group_size),
        path,
        "--repeats",
        str(repeats),
        "--warmup",
        str(warmup),
        "--threads",
        str(threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {done.returncode}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per measurement; 1 by default: on a shared 2-core machine two threads "
        "waiting on each other at every op made runs up to 20x slower and erratic",
    )
    parser.add_argument("--quick", action="store_true", help="1 run, no warm-up, skip P=2048 with G=16")
    parser.add_argument(
        "--one",
        nargs=3,
        metavar=("P", "G", "PATH"),
        help="internal: one measurement in this process, printed as a JSON line",
    )
    args = parser.parse_args(argv)
    repeats, warmup = (1, 0) if args.quick else (args.repeats, args.warmup)
    if args.one:
        prompt_length, group_size, path = int(args.one[0]), int(args.one[1]), args.one[2]
        if path not in PATHS:
            raise ValueError(f"--one PATH must be one of {sorted(PATHS)}, got {path!r}")
        row = measure_one(prompt_length, group_size, path, repeats, warmup, args.threads)
        print(json.dumps(row))
        return [row]

    rows, skipped = [], []
    for prompt_length in PROMPT_LENGTHS:
        for group_size in GROUP_SIZES:
            if args.quick and (prompt_length, group_size) in QUICK_SKIPPED:
                skipped.append((prompt_length, group_size))
                print(f"P={prompt_length} G={group_size}: skipped in --quick mode", flush=True)
                continue
            plain, shared = (
                run_in_subprocess(prompt_length, group_size, path, repeats, warmup, args.threads) for path in PATHS
            )
            rows.append(
                {
                    "prompt_length": prompt_length,
                    "group_size": group_size,
                    "completion_length": COMPLETION_LENGTH,
                    "plain_s": plain["seconds"],
                    "shared_s": shared["seconds"],
                    "speedup": plain["seconds"] / shared["seconds"],
                    "plain_mb": plain["peak_mb"],
                    "shared_mb": shared["peak_mb"],
                    "memory_ratio": plain["peak_mb"] / max(shared["peak_mb"], 1e-9),
                    "threads": plain["threads"],
                    "repeats": repeats,
                }
            )
            print(
                f"P={prompt_length} G={group_size}: plain {plain['seconds']:.3f} s {plain['peak_mb']:.0f} MiB, "
                f"shared {shared['seconds']:.3f} s {shared['peak_mb']:.0f} MiB",
                flush=True,
            )

    title = (
        f"Prefix Grouper vs repeated prompts: forward + backward of completion_logprobs on CPU "
        f"({rows[0]['threads']} threads), Qwen2 hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} "
        f"layers, vocab {MODEL['vocab_size']}, B=1, completion length {COMPLETION_LENGTH}; time = median of "
        f"{repeats} run(s); memory = peak RSS growth of the first forward + backward (VmHWM minus RSS before "
        f"it), fresh process each"
    )
    header = [
        "P",
        "G",
        "plain s",
        "shared s",
        "speed-up (plain/shared)",
        "plain peak RSS MiB",
        "shared peak RSS MiB",
        "memory ratio (plain/shared)",
    ]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(
            f"| {r['prompt_length']} | {r['group_size']} | {r['plain_s']:.3f} | {r['shared_s']:.3f} | "
            f"{r['speedup']:.2f} | {r['plain_mb']:.0f} | {r['shared_mb']:.0f} | {r['memory_ratio']:.2f} |"
        )
    for prompt_length, group_size in skipped:
        lines.append(f"| {prompt_length} | {group_size} | skipped (--quick) | | | | | |")
    print("\n".join(lines))
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "prefix_bench.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "prefix_bench.md").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()

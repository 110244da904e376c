"""Where the rollouts go, measured: plain GRPO against refilled dynamic sampling, DARS (ET, HW), GVM and Selective
Sample Replay in `llmalign grpo` on the embedded arithmetic model (issue 16 item 6), each run stopped by the same
rollout budget in generated tokens. Prints a markdown table, writes OUT/rollout_bench.md and rollout_bench.json
(every run's raw numbers) and the plot docs/images/rollout_bench.png.

    python benchmarks/rollout_bench.py [--seeds 0 1] [--methods grpo refill ...] [--budget 80000] [--parallel 2]
    python benchmarks/rollout_bench.py --smoke --out DIR     # plumbing only: 1 seed, 2 methods, a tiny budget
    python benchmarks/rollout_bench.py --report benchmarks/out/rollout_bench.json   # table and plot again
    python benchmarks/rollout_bench.py --one '{...}'          # internal: one run and its evaluation, JSON out
    python benchmarks/rollout_bench.py --methods grpo spo_chain spo_tree   # SPO at the same token budget (issue 25)

The budget: every run has train.iterations far above what it needs and `budget.max_generated_tokens` = --budget,
so it stops after the first iteration at which the completion tokens it generated (every refill round and
second stage, EOS included, all counted by the trainer as train/generated_tokens) reach the budget. The runs
therefore spend the same tokens up to one iteration's worth, and the table shows what each spent.

Held-out evaluation after each run, on the 200 problems of test.jsonl, the same for every run (and for the
untrained model, the first row): greedy accuracy (one completion per problem), and n = --samples completions per
problem at T = 1 from fixed seeds (the same seeds for every run): the sampled accuracy is their mean, and pass@k
for k = 1, 4, 8 is the unbiased estimator of Chen et al. 2021 (shared.metrics.pass_at_k) averaged over the
problems. The zero-variance fractions: of all groups sampled (first stage, every refill round), and of the
groups in the trained batches (after a second stage or refill; plain GRPO and SSR train every sampled group).
Seconds: training alone, and the evaluation, on a machine shared with other jobs (rough).

Every method trains the same recipe: configs/llm/arith.yaml with --prompts x --group completions per iteration
(defaults 8 x 8), lr --lr, max 80 new tokens; the method's own settings are METHODS below.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "out"
PLOT = ROOT / "docs" / "images" / "rollout_bench.png"
BASELINE = "grpo"

# method -> its overrides on top of the common recipe. gvm: a first stage of 2 plus 0.75 x B x G, the same
# rollouts per iteration as plain GRPO; dars: up to 0.5 x B x G more on prompts with pass rate below 0.5 (the
# defaults); ssr: the batch is topped up to 64 samples with a non-zero advantage from the buffer of 256.
METHODS = {
    "grpo": [],
    "refill": ["algorithm.filter_zero_std=refill"],
    "dars_et": ["rollout.schedule=dars_et"],
    "dars_hw": ["rollout.schedule=dars_hw"],
    "gvm": ["rollout.schedule=gvm", "rollout.extra_budget=0.75"],
    "ssr": ["algorithm.replay=ssr", "replay.min_informative=64"],
    # credit below the sequence (issue 25): the budget counts SPO's continuations and tree segments too
    "spo_chain": ["algorithm.name=spo_chain"],
    "spo_tree": ["algorithm.name=spo_tree", "algorithm.loss=dapo", "algorithm.mask_truncated=false"],
}
KS = (1, 4, 8)


# ----------------------------------------------------------------------------- one run (a child process)


def held_out(model, tokenizer, rows: list[dict], samples: int, max_new_tokens: int, seed: int) -> dict:
    """Greedy accuracy, and `samples` completions per problem at T = 1 (the sampled accuracy, and pass@k from the
    per-problem correct counts)."""
    from llmalign.evaluate import accuracy_on
    from llmalign.rewards import accuracy_reward
    from shared.metrics import pass_at_k

    greedy = accuracy_on(model, tokenizer, rows, max_new_tokens)
    drawn = accuracy_on(model, tokenizer, rows * samples, max_new_tokens, greedy=False, temperature=1.0, seed=seed)
    prompts = [prompt for prompt, _ in drawn["samples"]]
    completions = [completion for _, completion in drawn["samples"]]
    correct = accuracy_reward(prompts, completions, answer=[row["answer"] for row in rows * samples])
    assert abs(sum(correct) / len(correct) - drawn["accuracy"]) < 1e-12  # the same scoring as accuracy_on's
    counts = [int(sum(correct[i :: len(rows)])) for i in range(len(rows))]  # row i's samples: i, i + len(rows), ...
    return {
        "greedy": greedy["accuracy"],
        "greedy_length": greedy["mean_length"],
        "sampled": drawn["accuracy"],
        **{f"pass@{k}": statistics.fmean(pass_at_k(samples, c, k) for c in counts) for k in KS if k <= samples},
        "correct_counts": counts,
    }


def one(spec: dict) -> dict:
    """Train one method and seed under the budget (or nothing, for method "base"), then evaluate RUN/final."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmalign.config import GRPOConfig
    from llmalign.data import load_rows
    from llmalign.grpo import train
    from llmalign.toy import resolve_embedded
    from shared.config import load_config

    torch.set_num_threads(1)
    out = Path(spec["out"])
    result = {"method": spec["method"], "seed": spec["seed"]}
    if spec["method"] == "base":
        model_dir = resolve_embedded("embedded:arith")
        result.update({"iterations": 0, "rollouts": 0, "generated_tokens": 0, "train_s": 0.0})
    else:
        overrides = [
            f"train.seed={spec['seed']}",
            f"train.prompts_per_iteration={spec['prompts']}",
            f"train.group_size={spec['group']}",
            f"train.learning_rate={spec['lr']}",
            "train.iterations=100000",  # the token budget stops the run
            "budget.max_seconds=null",
            f"budget.max_generated_tokens={spec['budget']}",
            f"sampling.max_new_tokens={spec['max_new_tokens']}",
            "data.test=null",  # evaluated below, the same way for every run
            f"log.output_dir={out}",
            "log.checkpoint_every=0",  # the last iteration only: RUN/final
            "log.eval_every=0",
            *METHODS[spec["method"]],
        ]
        config = load_config(GRPOConfig, str(ROOT / "configs" / "llm" / "arith.yaml"), overrides)
        clock = time.perf_counter()
        train(config)
        result["train_s"] = time.perf_counter() - clock
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if r["iteration"] > 0]
        result.update(summarise(records, spec["prompts"], spec["group"], spec["method"]))
        model_dir = out / "final"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = load_rows(resolve_embedded("embedded:arith/test.jsonl"))[: spec["eval_size"]]
    clock = time.perf_counter()
    result.update(held_out(model, tokenizer, rows, spec["samples"], spec["max_new_tokens"], seed=spec["eval_seed"]))
    result["eval_s"] = time.perf_counter() - clock
    return result


def summarise(records: list[dict], prompts: int, group: int, method: str) -> dict:
    """A run's totals from its metrics.jsonl records: iterations, rollouts and generated tokens spent, and the
    zero-variance fractions over the run (of the groups sampled; of the groups trained on)."""
    sampled_groups = zero_sampled = trained_groups = zero_trained = 0.0
    for r in records:
        # a second stage (dars, gvm) samples the B prompts once in its first stage; else rollouts / G groups
        groups = prompts if "train/second_stage_rollouts" in r else r["train/rollouts"] / group
        sampled_groups += groups
        zero_sampled += r["train/zero_std_groups"] * groups
        trained_groups += prompts
        if "train/zero_std_trained_groups" in r:  # a second stage: after it
            zero_trained += r["train/zero_std_trained_groups"] * prompts
        elif method == "refill":  # the first B informative groups (fewer when the rounds ran out)
            zero_trained += prompts - r["train/informative_groups"]
        else:  # every sampled group is trained on
            zero_trained += r["train/zero_std_groups"] * prompts
    return {
        "iterations": len(records),
        "rollouts": int(sum(r["train/rollouts"] for r in records)),
        "generated_tokens": int(records[-1]["train/generated_tokens_total"]),
        "zero_var_sampled": zero_sampled / sampled_groups,
        "zero_var_trained": zero_trained / trained_groups,
        "replayed": int(sum(r.get("train/replayed", 0) for r in records)),
        "refill_rounds": int(sum(r["train/refill_rounds"] for r in records)),
        "train_accuracy_first": statistics.fmean(r["reward/accuracy/mean"] for r in records[:5]),
        "train_accuracy_last": statistics.fmean(r["reward/accuracy/mean"] for r in records[-5:]),
    }


# ----------------------------------------------------------------------------- the benchmark


def launch(spec: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    base = Path(spec["out"])
    with open(base.with_suffix(".log"), "w") as log, open(base.with_suffix(".json"), "w") as result:
        command = [sys.executable, __file__, "--one", json.dumps(spec)]
        return subprocess.Popen(command, stdout=result, stderr=log, env=env)


def run_all(specs: list[dict], parallel: int) -> list[dict]:
    """Each spec in its own process, `parallel` at a time, in order; the results in the specs' order."""
    results: dict[int, dict] = {}
    pending = list(enumerate(specs))
    running: list[tuple[int, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < parallel:
            index, spec = pending.pop(0)
            Path(spec["out"]).parent.mkdir(parents=True, exist_ok=True)
            running.append((index, launch(spec)))
            print(f"[rollout_bench] started {spec['method']} seed {spec['seed']}", flush=True)
        time.sleep(0.5)
        for index, process in list(running):
            if process.poll() is None:
                continue
            running.remove((index, process))
            spec = specs[index]
            if process.returncode != 0:
                log = Path(spec["out"]).with_suffix(".log")
                raise SystemExit(f"[rollout_bench] {spec['method']} seed {spec['seed']} failed; see {log}")
            stdout = Path(spec["out"]).with_suffix(".json").read_text()
            results[index] = json.loads(stdout.strip().splitlines()[-1])
            done = results[index]
            print(
                f"[rollout_bench] {done['method']} seed {done['seed']}: {done['iterations']} iterations, "
                f"{done['generated_tokens']} tokens, sampled {done['sampled']:.3f}, {done['train_s']:.0f} s",
                flush=True,
            )
    return [results[i] for i in range(len(specs))]


COLUMNS = [
    ("iterations", "iters", "{:.0f}"),
    ("rollouts", "rollouts", "{:.0f}"),
    ("generated_tokens", "tokens", "{:.0f}"),
    ("zero_var_sampled", "zero-var sampled", "{:.3f}"),
    ("zero_var_trained", "zero-var trained", "{:.3f}"),
    ("greedy", "greedy", "{:.3f}"),
    ("sampled", "sampled", "{:.3f}"),
    ("pass@1", "pass@1", "{:.3f}"),
    ("pass@4", "pass@4", "{:.3f}"),
    ("pass@8", "pass@8", "{:.3f}"),
    ("train_s", "train s", "{:.0f}"),
]
COMPARED = ("greedy", "sampled", "pass@1", "pass@4", "pass@8")  # differences to the baseline's seed mean


def table(results: list[dict], methods: list[str]) -> str:
    """Markdown: the untrained model, then per method its seed mean (with the difference to the baseline's mean
    for the held-out columns) and each seed."""
    keys = [key for key, _, _ in COLUMNS if any(key in r for r in results)]
    head = "| method | seed | " + " | ".join(label for key, label, _ in COLUMNS if key in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    fmt = {key: f for key, _, f in COLUMNS}
    mean = lambda rs, key: statistics.fmean(r[key] for r in rs)
    by_method = {m: [r for r in results if r["method"] == m] for m in methods}
    base = by_method.get(BASELINE)
    for r in results:
        if r["method"] == "base":
            cells = [fmt[k].format(r[k]) if k in COMPARED else "" for k in keys]
            lines.append("| untrained model | - | " + " | ".join(cells) + " |")
    for method in methods:
        runs = by_method[method]
        cells = []
        for key in keys:
            cell = fmt[key].format(mean(runs, key))
            if key in COMPARED and base and method != BASELINE:
                cell += f" ({mean(runs, key) - mean(base, key):+.3f})"
            cells.append(cell)
        label = f"**{method}**" + (" (baseline)" if method == BASELINE else "")
        lines.append(f"| {label} | mean | " + " | ".join(cells) + " |")
        for r in runs:
            lines.append(f"| {method} | {r['seed']} | " + " | ".join(fmt[k].format(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def spread(results: list[dict], methods: list[str]) -> str:
    """One line per held-out column: the largest seed-to-seed range within a method against the largest distance
    of a method's mean from the baseline's."""
    lines = []
    base = [r for r in results if r["method"] == BASELINE]
    for key in COMPARED:
        ranges = {
            m: max(r[key] for r in results if r["method"] == m) - min(r[key] for r in results if r["method"] == m)
            for m in methods
        }
        if not base:
            continue
        gaps = {
            m: statistics.fmean(r[key] for r in results if r["method"] == m) - statistics.fmean(r[key] for r in base)
            for m in methods
            if m != BASELINE
        }
        if not gaps:
            continue
        widest = max(ranges, key=ranges.get)
        farthest = max(gaps, key=lambda m: abs(gaps[m]))
        lines.append(
            f"{key}: largest seed-to-seed range {ranges[widest]:.3f} ({widest}); largest mean difference to "
            f"{BASELINE} {gaps[farthest]:+.3f} ({farthest})"
        )
    return "\n".join(lines)


def plot(results: list[dict], methods: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = dict(zip(methods, "osD^vP*X"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    base = next((r for r in results if r["method"] == "base"), None)
    for ax, key, label in zip(axes, ("sampled", "pass@8"), ("held-out sampled accuracy (T = 1)", "held-out pass@8")):
        for i, method in enumerate(methods):
            runs = [r for r in results if r["method"] == method]
            ax.scatter(
                [r["rollouts"] for r in runs],
                [r[key] for r in runs],
                marker=markers[method],
                color=f"C{i}",
                s=55,
                label=method,
            )
            for r in runs:
                where = (r["rollouts"], r[key])
                ax.annotate(f"s{r['seed']}", where, fontsize=7, xytext=(3, 3), textcoords="offset points")
        if base is not None:
            ax.axhline(base[key], color="grey", linestyle="--", linewidth=1, label="untrained")
        ax.set_xlabel("rollouts (completions) spent")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", help="internal: one run's spec as JSON; prints its result as JSON")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--budget", type=int, default=80000, help="generated completion tokens per run")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per iteration B")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt G")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--eval-size", type=int, default=200, help="held-out problems (of test.jsonl)")
    parser.add_argument("--samples", type=int, default=8, help="completions per held-out problem at T = 1 (n)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--plot", type=Path, default=None, help=f"default {PLOT} (--smoke: OUT/rollout_bench_smoke.png)"
    )
    parser.add_argument("--report", type=Path, help="a saved rollout_bench.json: print its table, redraw its plot")
    parser.add_argument("--smoke", action="store_true", help="plumbing only: seed 0, grpo and dars_et, a tiny run")
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(json.loads(args.one))), flush=True)
        return
    if args.report is not None:  # the table and plot again from a finished run's JSON, nothing rerun
        saved = json.loads(args.report.read_text())
        report(saved["settings"], saved["runs"], args.report.parent, args.plot or PLOT)
        return
    if args.smoke:
        args.methods, args.seeds = ["grpo", "dars_et"], [0]
        args.budget, args.prompts, args.group, args.max_new_tokens = 300, 2, 4, 48
        args.eval_size, args.samples = 4, 8
    plot_path = args.plot or (args.out / "rollout_bench_smoke.png" if args.smoke else PLOT)
    started = time.perf_counter()
    common = {
        "budget": args.budget,
        "prompts": args.prompts,
        "group": args.group,
        "lr": args.lr,
        "max_new_tokens": args.max_new_tokens,
        "eval_size": args.eval_size,
        "samples": args.samples,
        "eval_seed": 777,  # the same held-out draws for every run
    }
    runs_dir = args.out / "rollout_bench_runs"
    specs = [{**common, "method": "base", "seed": 0, "out": str(runs_dir / "base")}]
    specs += [
        {**common, "method": m, "seed": s, "out": str(runs_dir / f"{m}-seed{s}")}
        for s in args.seeds
        for m in args.methods
    ]
    results = run_all(specs, args.parallel)
    settings = {**common, "seeds": args.seeds, "methods": args.methods, "parallel": args.parallel}
    settings["seconds"] = round(time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rollout_bench.json").write_text(json.dumps({"settings": settings, "runs": results}, indent=1))
    report(settings, results, args.out, plot_path)


def report(settings: dict, results: list[dict], out: Path, plot_path: Path) -> None:
    """Print the table, write OUT/rollout_bench.md and the plot (also from a saved rollout_bench.json: --report)."""
    s, methods = settings, settings["methods"]
    setup = (
        f"llmalign grpo on the embedded arithmetic Qwen2 (arith-qwen2-v3): {s['prompts']} prompts x {s['group']} "
        f"completions per iteration, lr {s['lr']:g}, <= {s['max_new_tokens']} new tokens, each run stopped at the "
        f"first iteration with >= {s['budget']} generated completion tokens"
    )
    title = (
        f"{setup}; held-out: {s['eval_size']} problems, greedy, and n = {s['samples']} samples per problem at T = 1 "
        f"(sampled accuracy = their mean; pass@k unbiased, Chen et al. 2021); seeds "
        f"{', '.join(map(str, s['seeds']))}; differences in brackets: to the {BASELINE} mean; seconds on a 2-core CPU "
        f"shared with other jobs (rough), one thread per run, {s['parallel']} at a time"
    )
    text = "\n\n".join([title, table(results, methods), spread(results, methods)])
    text += f"\n\nrollout_bench took {s['seconds']} s."
    print(text)
    (out / "rollout_bench.md").write_text(text + "\n")
    plot(results, methods, plot_path, textwrap.fill(setup, 130))
    print(f"wrote {out / 'rollout_bench.md'}, {out / 'rollout_bench.json'}, {plot_path}")


if __name__ == "__main__":
    main()

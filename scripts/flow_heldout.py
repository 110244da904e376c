"""Held-out reward of trained flow runs on many held-out images: the "400 held-out images" figures of docs/results.md.

    python scripts/flow_heldout.py runs/flow_grpo runs/tempflow [--seeds 40] [--untrained]

For each run directory: its config.json, its newest checkpoint's trainable weights (LoRA), and the trainer's own
`evaluate` with data.eval_seeds=SEEDS: ODE samples (sampling.eval_num_steps) of every eval prompt from the held-out
noise seeds ("eval", train.seed, i), the same images for every model of the same config, scored with the run's
rewards. --untrained also scores the model without the LoRA. One process; prints one line per model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowalign.config import FlowGRPOConfig  # noqa: E402
from flowalign.rewards.plugins import load_reward  # noqa: E402
from flowalign.data import read_prompts  # noqa: E402
from flowalign.evaluation import evaluate  # noqa: E402
from flowalign.model import load_adapter, make_policy  # noqa: E402
from shared.checkpoint import latest_checkpoint, load_state, load_trainable_state  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.run import Run  # noqa: E402


def heldout(run_dir: Path | None, config_path: Path, seeds: int) -> dict:
    """Mean reward per reward over len(eval prompts) x seeds held-out samples; run_dir None: the untrained model."""
    with tempfile.TemporaryDirectory() as scratch:
        config = load_config(FlowGRPOConfig, config_path, [f"data.eval_seeds={seeds}", f"log.output_dir={scratch}/run"])
        run = Run(config.log.output_dir, False, tag="[heldout]")
        adapter = load_adapter(config, run.device)
        make_policy(config, adapter.transformer)  # the same LoRA layout as in training (B = 0: the base model)
        if run_dir is not None:
            load_trainable_state(
                adapter.transformer, load_state(latest_checkpoint(run_dir / "checkpoints"), "trainable")
            )
        adapter.transformer.eval()
        rewards = {path: load_reward(path, config.reward.kwargs.get(path)) for path in config.reward.weights}
        _, eval_prompts = read_prompts(config)
        scores = evaluate(config, run, adapter, adapter.encode_prompts, rewards, eval_prompts, None)
        run.close()
        return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (log.output_dir of finished runs)")
    parser.add_argument("--seeds", type=int, default=40, help="held-out noise seeds per eval prompt")
    parser.add_argument("--untrained", action="store_true", help="also score the model without the LoRA")
    args = parser.parse_args()
    if args.untrained:
        print(f"untrained: {heldout(None, args.runs[0] / 'config.json', args.seeds)}", flush=True)
    for run_dir in args.runs:
        print(
            f"{run_dir} ({latest_checkpoint(run_dir / 'checkpoints').name}): "
            f"{heldout(run_dir, run_dir / 'config.json', args.seeds)}",
            flush=True,
        )


if __name__ == "__main__":
    main()

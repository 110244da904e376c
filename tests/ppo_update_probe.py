"""One ppo iteration's advantage and update stages (llmalign.ppo: the critic's values, GAE, whitening over the global
batch, the policy's and the critic's steps) on a FIXED rollout of groups of 3, on however many processes launched
this script (tests/test_llm_ppo.py runs it on 1 and on 2). ppo samples with GRPO's rollout stage, whose HF sampling
is seeded per rank, so whole runs differ with the world size; these stages must not. The main process saves the
policy's and the critic's trained weights as OUT/ppo.world<W>.safetensors and the metrics as OUT/ppo.world<W>.json.

    python -m tests.ppo_update_probe MODEL_DIR OUT
    accelerate launch --multi_gpu --num_processes 2 -m tests.ppo_update_probe MODEL_DIR OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmalign.config import GRPOConfig
from llmalign.grpo import ALGORITHMS
from llmalign.rollout import IterationRollout, RefillPlan, RoundSample
from shared.config import load_config
from shared.loop import open_run
from tests.grpo_update_probe import GROUP, PROMPTS, fixed_rollout, rank_rows


def main(model_dir: Path, out: Path) -> None:
    config = load_config(
        GRPOConfig,
        None,
        [
            f"model.path={model_dir}",
            f"data.train={model_dir}/train.jsonl",
            f"data.test={model_dir}/test.jsonl",
            "algorithm.name=ppo",
            "algorithm.loss=dapo",
            "algorithm.mask_truncated=false",
            "algorithm.updates_per_pass=2",  # two optimizer steps per pass, two passes: each split over the ranks
            "algorithm.num_iterations=2",
            "algorithm.gamma=0.9",
            "algorithm.gae_lambda=0.8",
            f"train.prompts_per_iteration={PROMPTS}",
            f"train.group_size={GROUP}",
            "train.learning_rate=1e-2",
            "critic.learning_rate=1e-2",
            "reward.on_bad_score=drop",  # the NaN reward drops its sample
            "memory.micro_batch_size=2",
            f"log.output_dir={out / 'run'}",
        ],
    )
    run = open_run(config, False, False, tag="[probe]")
    recipe = ALGORITHMS["ppo"](config)
    recipe.setup(run)
    rollout, _, keep, _ = fixed_rollout()
    rewards = torch.linspace(0.0, 1.0, PROMPTS * GROUP).masked_fill(~keep, float("nan"))  # [N] one dropped
    block = run.block(PROMPTS)
    mine = rank_rows(run, rollout)[0]
    plan = RefillPlan([(0, i) for i in range(PROMPTS)], PROMPTS, 0, PROMPTS, 0)
    rows = recipe.grpo.train_rows[:PROMPTS]
    timings = {"time/rollout": 0.0, "time/reward": 0.0}
    batch = RoundSample(rows, block, mine, {"accuracy": rewards})
    sampled = IterationRollout(0, batch, [GROUP] * PROMPTS, GROUP, plan, 0, timings, {}, {})
    metrics = recipe.update(recipe.advantage(sampled))
    policy = run.trainable_state(recipe.grpo.model)
    critic = run.trainable_state(recipe.critic.model)
    if run.is_main:
        tensors = {f"policy.{k}": v for k, v in policy.items()} | {f"critic.{k}": v for k, v in critic.items()}
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / f"ppo.world{run.world}.safetensors"))
        (out / f"ppo.world{run.world}.json").write_text(json.dumps(metrics))
    run.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

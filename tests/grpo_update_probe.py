"""One GRPO update on a FIXED rollout, on however many processes launched this script (tests/test_llm_scale.py
runs it on 1 and on 2): every process builds the same tiny Qwen2 and the same global rollout from seeds, takes its
block of whole groups, and calls `llmalign.grpo.update` through `shared.run.Run`. The main process saves the
trained weights of each case as OUT/<case>.world<W>.safetensors, and the update's mismatch/* metrics (the rollout
carries engine log-probs) as OUT/<case>.world<W>.json.

    python -m tests.grpo_update_probe OUT
    accelerate launch --multi_gpu --num_processes 2 -m tests.grpo_update_probe OUT
    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m tests.grpo_update_probe OUT --fsdp
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmalign import toy
from llmalign.config import GRPOConfig
from llmalign.evaluate import Rollout
from llmalign.grpo import check_world_split, update
from llmalign.policy import reference_policy
from shared.config import load_config
from shared.run import Run

PROMPTS, GROUP, PROMPT_LENGTH, COMPLETION_LENGTH = 4, 3, 5, 7
CASES = {  # name -> overrides; each splits the rollout differently over micro-batches, steps and ranks
    "grpo": ["algorithm.loss=grpo", "memory.micro_batch_size=4"],
    "dapo_two_steps_kl": [
        "algorithm.loss=dapo",
        "algorithm.updates_per_pass=2",
        "algorithm.num_iterations=2",
        "algorithm.kl_beta=0.1",
        "memory.micro_batch_size=2",
    ],
    "dr_grpo_two_steps": ["algorithm.loss=dr_grpo", "algorithm.updates_per_pass=2", "memory.micro_batch_size=3"],
    "disco_two_steps_shared_prefix": [
        "algorithm.loss=disco",
        "algorithm.shared_prefix=true",
        "algorithm.updates_per_pass=2",
        "memory.micro_batch_size=3",
    ],
    # later steps leave the old policy, so the trust region binds: on 1 process each step is 2 micro-batches (the
    # step's KL from a no-grad pass first), on 2 it is 1 per process (the KL from that forward, summed over ranks)
    "disco_two_passes_trust_region": [
        "algorithm.loss=disco",
        "algorithm.updates_per_pass=2",
        "algorithm.num_iterations=2",
        "memory.micro_batch_size=3",
    ],
    # algorithm.rollout_correction: the weights come from every rank's old log-probs, the metrics are summed over ranks
    "dapo_tis_two_steps": [
        "algorithm.loss=dapo",
        "algorithm.rollout_correction=tis",
        "algorithm.updates_per_pass=2",
        "memory.micro_batch_size=2",
    ],
    # GPO's squared loss (algorithm.loss=sppo): the sequence log-ratio summed over tokens, two steps, a KL term
    "sppo_two_steps_kl": [
        "algorithm.loss=sppo",
        "algorithm.sppo_beta=0.5",
        "algorithm.updates_per_pass=2",
        "algorithm.kl_beta=0.1",
        "memory.micro_batch_size=2",
    ],
    "grpo_mis_sequence": [
        "algorithm.rollout_correction=mis",
        "algorithm.rollout_correction_level=sequence",
        "algorithm.rollout_correction_cap=4",
        "memory.micro_batch_size=4",
    ],
}


def fixed_rollout(seed: int = 0) -> tuple[Rollout, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A global rollout of PROMPTS x GROUP random completions of random lengths (left-padded prompts, right-padded
    completions), with advantages, a keep mask (one dropped sample) and DisCO's correctness."""
    g = torch.Generator().manual_seed(seed)
    N = PROMPTS * GROUP
    prompt_lengths = torch.randint(2, PROMPT_LENGTH + 1, (PROMPTS,), generator=g)  # [B]
    prompt_mask = (torch.arange(PROMPT_LENGTH)[None, :] >= PROMPT_LENGTH - prompt_lengths[:, None]).long()  # [B, P]
    prompt_ids = torch.randint(3, 250, (PROMPTS, PROMPT_LENGTH), generator=g) * prompt_mask  # [B, P]
    lengths = torch.randint(1, COMPLETION_LENGTH + 1, (N,), generator=g)  # [N]
    completion_mask = (torch.arange(COMPLETION_LENGTH)[None, :] < lengths[:, None]).long()  # [N, C]
    completion_ids = torch.randint(3, 250, (N, COMPLETION_LENGTH), generator=g) * completion_mask  # [N, C]
    engine = -4.0 - 3.0 * torch.rand(N, COMPLETION_LENGTH, generator=g)  # [N, C] near the untrained model's -5.5
    rollout = Rollout(
        prompt_ids, prompt_mask, completion_ids, completion_mask, lengths == COMPLETION_LENGTH, [""] * N, engine
    )
    advantages = torch.randn(N, generator=g)  # [N]
    keep = torch.ones(N, dtype=torch.bool)
    keep[4] = False
    correct = torch.arange(N) % 2 == 0  # every group holds right and wrong answers
    return rollout, advantages, keep, correct


def rank_rows(run: Run, rollout: Rollout, *per_row: torch.Tensor):
    """This rank's block of whole groups: its prompts and their completions, moved to its device."""
    prompts = run.block(PROMPTS)
    rows = slice(prompts.start * GROUP, prompts.stop * GROUP)
    mine = Rollout(
        rollout.prompt_ids[prompts.start : prompts.stop].to(run.device),
        rollout.prompt_mask[prompts.start : prompts.stop].to(run.device),
        rollout.completion_ids[rows].to(run.device),
        rollout.completion_mask[rows].to(run.device),
        rollout.truncated[rows].to(run.device),
        rollout.texts[rows],
        rollout.sampling_logprobs[rows].to(run.device),
    )
    return mine, *(x[rows].to(run.device) for x in per_row)


def main(out: Path, fsdp: bool = False) -> None:
    run = Run(out / "run", resume=False, tag="[probe]")
    if fsdp:
        from tests.multiproc import force_fsdp_on_cpu

        force_fsdp_on_cpu(run.accelerator)
    rollout, advantages, keep, correct = fixed_rollout()
    for name, overrides in CASES.items():
        config = load_config(
            GRPOConfig,
            None,
            [
                f"train.prompts_per_iteration={PROMPTS}",
                f"train.group_size={GROUP}",
                f"sampling.max_new_tokens={COMPLETION_LENGTH}",
                "train.max_grad_norm=1.0",
                *overrides,
            ],
        )
        check_world_split(run, config)
        model = toy.build_model(toy.build_tokenizer(), hidden=32, layers=2, seed=0).to(run.device)
        reference = reference_policy(model, lora=False) if config.algorithm.kl_beta > 0 else None
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the weights move by the gradient itself
        model, optimizer = run.prepare(model, optimizer)
        metrics = update(run, config, model, optimizer, reference, *rank_rows(run, rollout, advantages, keep, correct))
        state = run.trainable_state(model)
        if run.is_main:
            mismatch = {k: v for k, v in metrics.items() if k.startswith("mismatch/")}
            (out / f"{name}.world{run.world}{'.fsdp' if fsdp else ''}.json").write_text(json.dumps(mismatch))
            save_file(
                {k: v.contiguous().cpu() for k, v in state.items()},
                str(out / f"{name}.world{run.world}{'.fsdp' if fsdp else ''}.safetensors"),
            )
        if fsdp:  # the update really ran sharded
            assert type(model).__name__ == "FullyShardedDataParallel", type(model)
    run.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), fsdp="--fsdp" in sys.argv[2:])

"""Coupled-GRPO on a masked-diffusion LM (`algorithm.name: coupled_grpo`): DiffuCoder, Gong et al. 2025, arXiv
2506.20639.

    llmalign grpo --config configs/llm/arith_coupled_grpo.yaml                         # embedded:arith-mdm
    llmalign grpo --config configs/llm/arith_coupled_grpo.yaml algorithm.diffusion_masks=single   # the ablation
    accelerate launch --multi_gpu --num_processes 2 -m llmalign grpo --config configs/llm/arith_coupled_grpo.yaml

`CoupledGRPORecipe` composes a `GRPORecipe` (llmalign.grpo) whose policy loads as a masked-diffusion LM
(`llmalign.policy.load_policy`, kind MASKED_DIFFUSION: a causal model is refused, and the causal recipes refuse
this one) and whose rollout engine is the unmasking sampler (`llmalign.diffusion.DiffusionSampler`). Per iteration:

- rollout: GRPO's stage (llmalign.rollout.sample_iteration): B prompts x G completions of L = sampling.max_new_tokens
  positions, unmasked in algorithm.diffusion_steps steps, completion k sampled from its own seed (no rank in it, so
  the rollout is the same whatever the world size), scored by the configured rewards;
- advantage: GRPO's stage for the filters and statistics; the advantages themselves are leave-one-out on the
  weighted reward total, unscaled (shared.masked_diffusion.leave_one_out_advantages, the official
  ``leave_one_out = True``, ``scale_rewards: false``); then the rollout's masks: one ratio t ~ U(0.2, 0.8) for the
  batch (the official one per call) and pass A's mask u < t per completion, u from the completion's own seed;
- update: GRPO's (`llmalign.grpo.update`: num_iterations passes, the clipped ratio of algorithm.loss, the k3 KL to the
  reference at algorithm.kl_beta) on the per-token estimate `llmalign.diffusion.masked_token_logps` under those
  masks, for the old, reference and policy log-probs alike. Under diffusion_masks=single the loss keeps pass A's
  tokens only.

The paper's settings (configs/llm/arith_coupled_grpo.yaml): clip 0.5 both sides, beta 0.01, num_iterations 2, the
token-mean loss (dapo's aggregation: TRL's token-level loss, which the official trainer extends), G = 10 there.

Departure from the official code: it draws a mask seed per inner iteration k (random in [0, 4096) under
``random_masking``), so the num_iterations updates on one rollout see different masks, each with its own old
log-probs; here the masks are drawn once per rollout and every update on it reuses them (and the old and reference
log-probs computed once under them), which is what the masks' one requirement, the same masks in the ratio's
numerator and denominator, asks, at one old-log-prob pass per rollout instead of num_iterations. The
official passes also mask padding after EOS; here padding is never masked (shared.masked_diffusion's docstring).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from llmalign.config import GRPOConfig
from llmalign.diffusion import DiffusionMasks, DiffusionSampler, draw_masks, masked_token_logps
from llmalign.evaluate import derived_seed
from llmalign.grpo import Advantaged, GRPORecipe, update
from llmalign.policy import MASKED_DIFFUSION, load_policy
from shared.advantages import sequence_to_tokens
from shared.loop import Plan
from shared.masked_diffusion import leave_one_out_advantages, sample_mask_ratio
from shared.run import Run

MASK_RATIO_STREAM, MASK_ROW_STREAM = 7, 8  # the last part of the masks' derived seeds, apart from other streams


def load_masked_diffusion(model_config, device):
    """`load_policy` of a masked-diffusion LM (a causal one is refused, one line)."""
    return load_policy(model_config, device, kind=MASKED_DIFFUSION)


def rollout_masks(config: GRPOConfig, iteration: int, first_row: int, completion_mask, keep) -> DiffusionMasks:
    """This rank's masks of an iteration's rollout: t from (seed, iteration), the same on every rank; row i's
    uniforms from (seed, iteration, first_row + i), its global index."""
    seed = config.train.seed
    t = sample_mask_ratio(torch.Generator().manual_seed(derived_seed(seed, iteration, MASK_RATIO_STREAM)))
    row_seeds = [derived_seed(seed, iteration, first_row + i, MASK_ROW_STREAM) for i in range(len(keep))]
    return draw_masks(t, completion_mask, row_seeds, config.algorithm.diffusion_masks)


@dataclasses.dataclass
class CoupledBatch:
    trained: Advantaged  # GRPO's advantage stage, its advantages replaced by leave-one-out ones
    masks: DiffusionMasks


class CoupledGRPORecipe:
    """Coupled-GRPO in the loop's stages: GRPO's rollout (with the unmasking sampler), leave-one-out advantages and
    the rollout's masks, GRPO's update on the masked-diffusion estimate."""

    def __init__(self, config: GRPOConfig, grpo: GRPORecipe):
        self.config = config
        self.grpo = grpo  # built with the masked-diffusion loader and the sampler (`coupled_grpo_recipe`)

    def setup(self, run: Run) -> Plan:
        self.run = run
        plan = self.grpo.setup(run)
        a, s = self.config.algorithm, self.config.sampling
        run.print(
            f"coupled_grpo: {s.max_new_tokens} completion positions unmasked in {a.diffusion_steps} steps "
            f"({a.diffusion_confidence} first), {a.diffusion_masks} masks, t ~ U(0.2, 0.8) per rollout"
        )
        return dataclasses.replace(
            plan, label=f"coupled_grpo[{a.diffusion_masks}]", title=f"Coupled-GRPO on {self.config.model.path}"
        )

    def rollout(self, iteration: int):
        return self.grpo.rollout(iteration)

    def advantage(self, sampled) -> CoupledBatch:
        run, config = self.run, self.config
        trained = self.grpo.advantage(sampled)  # GRPO's filters, statistics and this rank's rows
        scores, G = sampled.batch.scores, config.train.group_size
        bad = trained.bad  # [N] a dropped score
        total = sum(config.reward.weights[n] * scores[n].nan_to_num(0.0) for n in scores)  # [N]
        advantages = leave_one_out_advantages(total, G).masked_fill(bad, 0.0)  # [N]
        block = sampled.batch.block
        own = slice(block.start * G, block.stop * G)
        width = trained.rollout.completion_ids.shape[1]
        trained.advantages = sequence_to_tokens(advantages[own].to(run.device), width)  # [n, C]
        masks = rollout_masks(
            config, sampled.iteration, own.start, trained.rollout.completion_mask, trained.trained_keep
        )
        return CoupledBatch(trained, masks)

    def update(self, batch: CoupledBatch) -> dict:
        grpo, trained, masks = self.grpo, batch.trained, batch.masks
        mask_id, temperature = grpo.tokenizer.mask_token_id, self.config.sampling.temperature
        G = self.config.train.group_size
        logp_of = lambda model, rows: masked_token_logps(model, trained.rollout, rows, G, masks, mask_id, temperature)
        clock = time.perf_counter()
        metrics = update(
            self.run,
            self.config,
            grpo.model,
            grpo.optimizer,
            grpo.reference,
            trained.rollout,
            trained.advantages,
            trained.trained_keep,
            trained.correct,
            check_ratio=grpo.checks_ratio(trained.sampled.iteration),
            token_mask=masks.loss_mask(),
            logp_of=logp_of,
        )
        trained.sampled.timings["time/update"] = time.perf_counter() - clock
        return metrics

    def record(self, batch: CoupledBatch, metrics: dict) -> dict:
        record = self.grpo.record(batch.trained, metrics)
        record["train/mask_ratio"] = batch.masks.t
        return record

    def logged(self, done: int, batch: CoupledBatch, record: dict) -> None:
        self.grpo.logged(done, batch.trained, record)

    # the rest is GRPO's
    def evaluate(self, done: int) -> dict:
        return self.grpo.evaluate(done)

    def before_record(self) -> dict:
        return self.grpo.before_record()

    def report_before(self, before: dict) -> None:
        self.grpo.report_before(before)

    def describe(self, result: dict) -> str:
        return self.grpo.describe(result)

    def stop_early(self) -> bool:
        return self.grpo.stop_early()

    def postfix(self, record: dict) -> dict:
        return self.grpo.postfix(record)

    def save(self, done: int) -> None:
        self.grpo.save(done)

    def closing(self) -> str:
        return self.grpo.closing()

    @property
    def engine(self):  # llmalign.grpo.train closes it
        return self.grpo.engine


def diffusion_engine(run: Run, config: GRPOConfig, tokenizer, train_rows, test_rows) -> DiffusionSampler:
    """The unmasking sampler in place of a rollout engine (GRPORecipe's `engine` factory)."""
    a = config.algorithm
    return DiffusionSampler(tokenizer, a.diffusion_steps, a.diffusion_confidence)


def coupled_grpo_recipe(config: GRPOConfig) -> CoupledGRPORecipe:
    """algorithm.name coupled_grpo (llmalign.grpo.ALGORITHMS)."""
    return CoupledGRPORecipe(config, GRPORecipe(config, load=load_masked_diffusion, engine=diffusion_engine))

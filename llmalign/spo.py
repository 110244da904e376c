"""Segment Policy Optimization in `llmalign grpo` (Guo et al. 2025, arXiv:2505.23564): algorithm.name=spo_chain.

    llmalign grpo --config configs/llm/arith_spo_chain.yaml
    llmalign grpo --config configs/llm/arith.yaml algorithm.name=spo_chain algorithm.spo_continuations=4
    accelerate launch --multi_gpu --num_processes 2 -m llmalign grpo --config configs/llm/arith_spo_chain.yaml

`SPOChainRecipe` is GRPO's recipe (llmalign.grpo.GRPORecipe, held, not inherited) with two stages changed:
- rollout: GRPO's (B prompts x G completions, scored), then for this rank's completions (`chain_values`): the
  policy's log-prob of each sampled token (the temperature of the update's old log-probs), the cuts
  (shared.spo.spo_cutpoints: every spo_cut_every-th token with p < spo_prob_threshold), and for each cut N =
  spo_continuations continuations sampled from prompt + completion[:cut] with the rollout engine and scored by the
  same rewards; the cut's value is their mean weighted reward (reward.weights, raw scores).
- advantage: GRPO's (reward statistics, dropped samples, filters), then per-token advantages
  shared.spo.spo_chain_advantages from those values and each completion's weighted reward, whitened over the global
  batch's kept tokens (spo_whiten, `shared.spo.whiten_advantages`), and SPO's probability mask
  (shared.spo.spo_probability_mask) as the update's token mask. The update is GRPO's PPO-clip (algorithm.loss
  grpo, dr_grpo or dapo) on those per-token advantages.

Every continuation token counts in train/generated_tokens and budget.max_generated_tokens, so a run compares with
GRPO at an equal token budget; train/spo_* log the cuts, continuations and values.

World-size invariance: the continuations of cut j of the global completion i are sampled in a call of their own
seeded by derived_seed(seed, iteration, i, j, 6) (transformers' generate), or with per-continuation seeds (vLLM),
never from the rank; the cuts come from each rank's own forward over its rows. So 1 process and 2 give the same
values for the same rollout (tests/test_llm_spo.py). Not tried under FSDP: its sharded forward needs every rank in
each generate call, and ranks make as many calls as their completions have cuts.

Departures from the paper's code (github.com/AIFrameResearch/SPO, see shared/spo.py): its values are the mean of
one reward; here of reward.weights' weighted sum of the raw scores (no per-reward normalisation), the same total
each completion's own reward r takes. A continuation cut at the length limit is scored as written (the official
code gives the unfinished-response penalty, 0 in its configs; our rewards score truncated rollouts the same way).
The cap on cuts per completion (spo_max_cuts, the first ones kept) is commented out in the official code: off by
default. The prefix of a cut is the completion up to (not including) the cut token, so continuations re-sample it. Under
reward.on_bad_score=drop a continuation's dropped score counts 0 in its cut's value.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import Tensor

from llmalign.config import GRPOConfig
from llmalign.engines import HFEngine
from llmalign.evaluate import Rollout, derived_seed
from llmalign.logprobs import completion_logprobs
from llmalign.rollout import IterationRollout, score
from shared.reward_calls import RewardError
from shared.run import Run
from shared.spo import (
    spo_chain_advantages,
    spo_cutpoints,
    spo_probability_mask,
    whiten_advantages,
)


@dataclasses.dataclass
class ChainValues:
    """What the SPO rollout measured on this rank's completions [n, C]."""

    cuts: Tensor  # [n, C] bool, True where a segment starts
    values: Tensor  # [n, C] float64 the Monte Carlo value of the prefix before each cut (NaN elsewhere)
    low: Tensor  # [n, C] long, SPO's probability mask (p < threshold) on the completion tokens
    generated: int  # continuation tokens generated on all ranks, EOS included
    log: dict  # train/spo_* metrics


@dataclasses.dataclass
class SPOSample:
    """The SPO rollout stage's output: GRPO's rollout and the measured values."""

    sampled: IterationRollout
    measured: ChainValues


@torch.no_grad()
def sampled_token_logprobs(policy, rollout: Rollout, group_size: int, config: GRPOConfig) -> Tensor:
    """[n, C] the policy's log-prob of every sampled completion token (at sampling.temperature, as the update's old
    log-probs), in eval mode (the rollout's), micro-batches of whole groups (Prefix Grouper with shared_prefix)."""
    was_training = policy.training
    policy.eval()
    per_chunk = max(config.memory.micro_batch_size // group_size, 1)  # groups per forward
    groups = rollout.prompt_ids.shape[0]
    pieces = []
    for first in range(0, groups, per_chunk):
        g = slice(first, min(first + per_chunk, groups))
        rows = slice(g.start * group_size, g.stop * group_size)
        pieces.append(
            completion_logprobs(
                policy,
                rollout.prompt_ids[g],
                rollout.prompt_mask[g],
                rollout.completion_ids[rows],
                rollout.completion_mask[rows],
                group_size,
                shared_prefix=config.algorithm.shared_prefix,
                temperature=config.sampling.temperature,
            )
        )  # [rows, C]
    policy.train(was_training)
    return torch.cat(pieces)  # [n, C]


def capped_cuts(cuts: Tensor, most: int | None) -> Tensor:
    """[n, C] the first `most` cuts of each row (None: all)."""
    if most is None:
        return cuts
    return cuts & (cuts.long().cumsum(dim=1) <= most)  # [n, C]


def continued_texts(tokenizer, heads: list[list[int]], continued: list[Rollout]) -> Rollout:
    """The full completions head + continuation (`continued[k]`: the N continuations of head k), as a Rollout the
    rewards score: rows k*N .. k*N+N-1 continue head k."""
    full, truncated = [], []
    for head, out in zip(heads, continued):
        for r in range(out.completion_ids.shape[0]):
            full.append(head + out.completion_ids[r, : int(out.lengths[r])].tolist())  # EOS included when it ended
            truncated.append(bool(out.truncated[r]))
    pad = tokenizer.pad_token_id
    width = max(len(ids) for ids in full)
    ids = torch.tensor([c + [pad] * (width - len(c)) for c in full])  # [K*N, width]
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in full])  # [K*N, width]
    texts = tokenizer.batch_decode(full, skip_special_tokens=True)
    return Rollout(continued[0].prompt_ids, continued[0].prompt_mask, ids, mask, torch.tensor(truncated), texts)


def row_values(
    sampler,
    tokenizer,
    config: GRPOConfig,
    rewards: dict,
    prompt: list[int],
    completion: list[int],
    positions: list[int],
    row: dict,
    iteration: int,
    global_row: int,
) -> tuple[list[float], int]:
    """The values of one completion's cuts `positions`: the mean weighted reward of N continuations from
    prompt + completion[:j] for each j, and the tokens generated. One generate call per cut, with the cut's own
    budget max_new_tokens - j (a prefix and its continuation then fit the engine's max_model_len, prompt +
    max_new_tokens), seeded from the global completion index and the cut."""
    s, N, seed = config.sampling, config.algorithm.spo_continuations, config.train.seed
    heads = [completion[:j] for j in positions]
    continued = []
    for j, head in zip(positions, heads):
        torch.manual_seed(derived_seed(seed, iteration, global_row, j, 6))  # transformers: torch's global RNG
        continued.append(
            sampler.generate(
                [prompt + head],
                N,
                s.max_new_tokens - j,
                temperature=s.temperature,
                top_p=s.top_p,
                seeds=[derived_seed(seed, iteration, global_row, j, k, 7) for k in range(N)],
            )
        )  # [N] rows
    full = continued_texts(tokenizer, heads, continued)
    columns = {key: value for key, value in row.items() if not key.startswith("_")}
    scores = score(
        rewards,
        [row["_text"]],
        full,
        [columns],
        len(full.texts),
        iteration,
        s.max_new_tokens,
        config.reward.on_bad_score == "drop",
        first_index=global_row,
    )  # name -> [K*N]
    total = sum(config.reward.weights[name] * scores[name].nan_to_num(0.0) for name in scores)  # [K*N]
    return total.double().view(len(positions), N).mean(dim=1).tolist(), sum(int(c.lengths.sum()) for c in continued)


def chain_values(
    run: Run, config: GRPOConfig, model, tokenizer, rewards: dict, sampled: IterationRollout, engine
) -> ChainValues:
    """SPO-chain's measurements on this rank's completions: cuts, the Monte Carlo value of each cut's prefix
    (`row_values`), the probability mask. A reward failure on any rank raises on every rank together."""
    a, G = config.algorithm, sampled.first_size
    batch = sampled.batch
    rollout, first = batch.rollout, batch.block.start * G  # this rank's first row in the global rollout
    with run.unwrapped_for_generation(model) as policy:
        logp = sampled_token_logprobs(policy, rollout, G, config)  # [n, C]
        mask = rollout.completion_mask  # [n, C]
        low = spo_probability_mask(logp, mask, a.spo_prob_threshold)  # [n, C]
        cuts = capped_cuts(spo_cutpoints(logp, mask, a.spo_prob_threshold, a.spo_cut_every), a.spo_max_cuts)
        values = torch.full(cuts.shape, float("nan"), dtype=torch.float64)  # [n, C]
        sampler = engine or HFEngine(policy, tokenizer)
        generated, failure = 0, None
        for i in range(len(rollout.texts)):
            positions = cuts[i].nonzero().flatten().tolist()
            if not positions or failure is not None:
                continue
            group = i // G
            prompt = rollout.prompt_ids[group][rollout.prompt_mask[group].bool()].tolist()
            completion = rollout.completion_ids[i, : int(rollout.lengths[i])].tolist()
            try:
                found, more = row_values(
                    sampler,
                    tokenizer,
                    config,
                    rewards,
                    prompt,
                    completion,
                    positions,
                    batch.rows[batch.block.start + group],
                    sampled.iteration,
                    first + i,
                )
            except RewardError as error:
                failure = str(error)
                continue
            values[i, positions] = torch.tensor(found, dtype=torch.float64)
            generated += more
    failure = run.first_failure(failure)
    if failure is not None:
        raise RewardError(failure)
    total_cuts = int(run.sum(int(cuts.sum())))
    rows = int(run.sum(len(rollout.texts)))
    log = {
        "train/spo_cuts_per_completion": total_cuts / max(rows, 1),
        "train/spo_continuations": total_cuts * a.spo_continuations,
        "train/spo_low_probability_tokens": float(run.sum(int(low.sum()))) / max(float(run.sum(int(mask.sum()))), 1),
    }
    return ChainValues(cuts.cpu(), values, low.cpu(), int(run.sum(generated)), log)


def global_whiten(run: Run, advantages: Tensor, mask: Tensor) -> Tensor | None:
    """`whiten_advantages` with the statistics of every rank's kept tokens (`mask` [n, C]): the kept values are
    gathered and placed beside this rank's tokens as the only masked-in ones. None when the batch keeps fewer
    than 2 tokens (then not whitened)."""
    kept = run.gather_rows(advantages[mask.bool()].to(run.device)).to(advantages.device)  # [K] all ranks
    if kept.numel() < 2:
        return None
    flat = advantages.reshape(1, -1)  # [1, n*C]
    stacked = torch.cat([kept[None, :], flat], dim=1)  # [1, K + n*C]
    chosen = torch.cat([torch.ones_like(kept[None, :]), torch.zeros_like(flat)], dim=1)  # [1, K + n*C]
    return whiten_advantages(stacked, chosen)[:, kept.numel() :].reshape(advantages.shape)  # [n, C]


class SPOChainRecipe:
    """SPO-chain in the loop's stages: GRPO's recipe (`base`) with its rollout followed by the continuations
    (`chain_values`) and its advantage replaced by the segment advantages. Every other stage and hook is GRPO's,
    reached through `__getattr__` (composition: the loop asks the recipe for optional hooks by name)."""

    def __init__(self, config: GRPOConfig, base):
        self.config, self.base = config, base

    def __getattr__(self, name: str):
        if name == "base":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def setup(self, run: Run):
        plan = self.base.setup(run)
        a, s = self.config.algorithm, self.config.sampling
        run.print(
            f"spo_chain: a cut at every k-th token with p < {a.spo_prob_threshold:g}, k = {a.spo_cut_every} (at most "
            f"{a.spo_max_cuts or 'all'} per completion), {a.spo_continuations} continuations of up to "
            f"{s.max_new_tokens} tokens each, advantages {'whitened' if a.spo_whiten else 'not whitened'}"
        )
        title = f"SPO-chain ({a.loss}) on {self.config.model.path}"
        return dataclasses.replace(plan, label=f"spo_chain[{a.loss}]", title=title)

    def rollout(self, iteration: int) -> SPOSample:
        base = self.base
        sampled = base.rollout(iteration)
        clock = time.perf_counter()
        measured = chain_values(base.run, self.config, base.model, base.tokenizer, base.rewards, sampled, base.engine)
        sampled.timings["time/spo_continuations"] = time.perf_counter() - clock
        sampled.generated += measured.generated  # train/generated_tokens: the continuations count
        base.generated_total += measured.generated  # and budget.max_generated_tokens
        return SPOSample(sampled, measured)

    def advantage(self, sample: SPOSample):
        """GRPO's advantage stage for what it decides (statistics, dropped samples, filters), then this rank's
        rows get the segment advantages [n, C] and the probability mask."""
        run, config, measured = self.base.run, self.config, sample.measured
        trained = self.base.advantage(sample.sampled)
        batch, G = sample.sampled.batch, sample.sampled.first_size
        total = sum(config.reward.weights[n] * v.nan_to_num(0.0) for n, v in batch.scores.items())  # [N]
        own = slice(batch.block.start * G, batch.block.stop * G)
        mask = batch.rollout.completion_mask.cpu()  # [n, C]
        advantages = spo_chain_advantages(measured.cuts, measured.values, total[own].double(), mask)  # [n, C]
        kept = measured.low * trained.trained_keep.cpu()[:, None].long()  # [n, C] the loss's tokens
        whitened = global_whiten(run, advantages, kept) if config.algorithm.spo_whiten else None
        advantages = advantages if whitened is None else whitened  # [n, C]
        trained.advantages = advantages.to(trained.advantages.dtype).to(run.device)  # [n, C]
        trained.token_mask = measured.low.to(run.device)  # [n, C]
        self.measured_log = {**measured.log, "train/spo_whitened": whitened is not None}
        return trained

    def record(self, trained, metrics: dict) -> dict:
        return {**self.base.record(trained, metrics), **self.measured_log}  # this iteration's (advantage stage)

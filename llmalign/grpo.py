"""GRPO for text reasoning on any transformers causal LM (grpo, dr_grpo, dapo, disco losses).

    llmalign grpo --config configs/llm/arith.yaml                       # embedded default
    llmalign grpo --config configs/llm/arith.yaml train.iterations=5 algorithm.loss=dapo
    llmalign grpo --config configs/llm/arith.yaml --resume              # continue the run
    accelerate launch --multi_gpu --num_processes 2 -m llmalign grpo --config configs/llm/arith.yaml

The run is `GRPORecipe` in the one loop (shared.loop: evaluation, cadence, budgets, checkpoints, progress). Each
iteration: rollout with its rewards (llmalign.rollout.sample_iteration: B prompts x G completions with `generate`,
scored by the configured functions, TRL's signature, and refill / second stage / rethinking), advantage
(`advantage_stage`: shared.advantages, broadcast to per-token advantages [n, C], and SSR replay), update
(`update`: num_iterations passes, each split into updates_per_pass optimizer steps of micro-batches, the loss of
algorithm.loss from llmalign.objectives.OBJECTIVES), log, checkpoint.

Over W processes (`shared.run.Run`): B counts over all of them, and rank r samples the r-th contiguous block of
B/W whole groups, from the seed (seed, iteration, rank). Every reward's values are gathered, so advantages (group
or batch std), the zero-variance filter and the logs see the global batch; each rank keeps its own rows. The loss
of an optimizer step is the global batch's (its denominators are sums over ranks) and `update` splits the rollout
into the same optimizer steps whatever W, so the update on given rollouts does not depend on the world size.
One departure from one process: a reward that compares groups within its batch (grpo_lambda's top fraction of
groups) compares the groups of one rank's block.

The rollout of an iteration is one sampling round, or under algorithm.filter_zero_std=refill up to
1 + max_refill_rounds of them (`refill`, DAPO dynamic sampling): each later round samples and scores about as
many new prompts as should give the missing informative groups (llmalign.rollout: `sample_round`), every rank deciding from the
gathered rewards alike, and `assemble_batch` moves the chosen groups so that each rank again holds its block of
B/W whole groups.

Where the rollouts go (issue 16), each off by default:
- rollout.schedule dars_et / dars_hw / gvm: a second stage on the batch's own prompts (`second_stage`), its counts
  from shared.allocation on the gathered first-stage pass rates (and, for gvm, gradient-norm estimates from
  `logit_gradient_norms`), so every rank computes the same counts; each rank samples its own block's extra
  rollouts. Groups then have unequal sizes and ranks hold unequal numbers of rows: the update splits optimizer
  steps by whole groups' global index (`Groups`), and ranks with fewer micro-batches repeat one with no gradient so
  every rank makes the same calls.
- algorithm.replay=ssr: after the advantages, too few informative samples are topped up from a replay buffer
  (shared.replay) that every rank holds identically (entries gathered from all ranks, draws from a seeded
  generator); replayed samples are groups of one, spread over the ranks. The buffer is saved in each checkpoint.
- rollout.rethink_fraction: Forced Rethinking of finished first-stage rollouts (llmalign.rollout: `rethink_round`, as
  VL-Rethinker's code: a correct rethought answer replaces its rollout; or `continue_after_trigger`).
- algorithm.full_batch_epochs: DARS-B's passes of one full-batch optimizer step each.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import random
import time
from collections.abc import Callable

import torch
from torch import Tensor

from llmalign.config import GRPOConfig
from llmalign.data import load_train_test, micro_batches, render_prompt, tokenize_prompts
from llmalign.evaluate import Rollout, describe_held_out, held_out_metrics
from llmalign.logprobs import completion_logprobs
from llmalign.objectives import OBJECTIVES, correct_labels, engine_mismatch, rollout_corrected_advantages
from llmalign.ppo import PPORecipe
from llmalign.t_ppo import TPPORecipe
from llmalign.policy import (
    enable_gradient_checkpointing,
    load_policy,
    reference_policy,
    restore_policy,
    save_policy_checkpoint,
)
from llmalign.rewards import build_reward
from llmalign.rollout import (
    IterationRollout,
    check_groupwise_rewards,
    check_rollout,
    derived_seed,
    replay_buffer,
    replay_entries,
    sample_iteration,
    start_engine,
    score,
    with_replayed,
)
from llmalign.spo import SPOChainRecipe
from llmalign.spo_tree import SPOTreeRecipe
from llmalign.toy import resolve_embedded
from shared.advantages import compose_rewards, sequence_to_tokens
from shared.config import ConfigError
from shared.filtering import zero_variance_group_mask
from shared.kl import kl_k3
from shared.loop import Plan, open_run, run_loop
from shared.ratio_check import METRIC as RATIO_METRIC
from shared.ratio_check import LLM_COMPARED, FirstUpdateRatioCheck, ratio_deviation
from shared.replay import ReplayBuffer
from shared.reward_calls import RewardError, with_deadline
from shared.run import Run
from shared.trackers import completions_table


@dataclasses.dataclass
class Groups:
    """This rank's groups when they have unequal sizes (a second stage, replayed samples): their sizes in row order
    and their global indices, which decide the optimizer step a group trains in (global index modulo
    updates_per_pass, so the steps do not depend on the world size)."""

    sizes: list[int]  # [b] completions of each local group
    ids: list[int]  # [b] global index of each local group

    def row_group(self, device=None) -> Tensor:
        """[n] the local group of each local row."""
        return torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes)).to(device)

    def parts(self, steps: int) -> list[list[int]]:
        """This rank's rows of each optimizer step of a pass: whole groups whose global index is p modulo `steps`."""
        starts = [0, *torch.tensor(self.sizes).cumsum(0).tolist()]
        return [
            [row for k, gid in enumerate(self.ids) if gid % steps == p for row in range(starts[k], starts[k + 1])]
            for p in range(steps)
        ]

    def micro_batches(self, rows: list[int], size: int, whole: bool) -> list[list[int]]:
        """`rows` (whole groups, in order) in micro-batches of at most `size` completions; `whole`: never split a
        group (Prefix Grouper, DisCO), so a group larger than `size` is one micro-batch of its own."""
        if not whole:
            return micro_batches(rows, size)
        row_group = self.row_group().tolist()
        chunks: list[list[int]] = []
        for row in rows:
            starts_group = not chunks or row_group[row] != row_group[chunks[-1][-1]]
            if starts_group and (not chunks or len(chunks[-1]) + self.sizes[row_group[row]] > size):
                chunks.append([])
            chunks[-1].append(row)
        return chunks


# ----------------------------------------------------------------------------- update


def uneven_logprobs(
    model, rollout: Rollout, rows: list[int], row_group: Tensor, shared_prefix: bool, temperature: float
) -> Tensor:
    """`policy_logprobs` for groups of unequal sizes (`row_group` [n]: the local group of each row): each row with
    its own copy of its prompt, or with shared_prefix (rows are whole groups) one Prefix Grouper call per run of
    consecutive groups of the same size."""
    rows_t = torch.tensor(rows)
    groups = row_group[rows_t].cpu()  # [m]
    if not shared_prefix:
        return completion_logprobs(
            model,
            rollout.prompt_ids[groups],
            rollout.prompt_mask[groups],
            rollout.completion_ids[rows_t],
            rollout.completion_mask[rows_t],
            1,
            temperature=temperature,
        )
    ids, counts = torch.unique_consecutive(groups, return_counts=True)  # the micro-batch's groups, in order
    pieces, start, k = [], 0, 0
    while k < len(ids):
        size, end = int(counts[k]), k
        while end + 1 < len(ids) and int(counts[end + 1]) == size:
            end += 1
        span = rows_t[start : start + size * (end - k + 1)]
        pieces.append(
            completion_logprobs(
                model,
                rollout.prompt_ids[ids[k : end + 1]],
                rollout.prompt_mask[ids[k : end + 1]],
                rollout.completion_ids[span],
                rollout.completion_mask[span],
                size,
                shared_prefix=True,
                temperature=temperature,
            )
        )  # [span, C]
        start += len(span)
        k = end + 1
    return torch.cat(pieces)  # [m, C]


def policy_logprobs(
    model, rollout: Rollout, rows: list[int], group_size: int, shared_prefix: bool, temperature: float
) -> Tensor:
    """Log-probs [n, C] of the completions `rows`; with shared_prefix, rows are whole groups."""
    rows_t = torch.tensor(rows)
    if shared_prefix:
        groups = rows_t[::group_size] // group_size  # [n/G]
        return completion_logprobs(
            model,
            rollout.prompt_ids[groups],
            rollout.prompt_mask[groups],
            rollout.completion_ids[rows_t],
            rollout.completion_mask[rows_t],
            group_size,
            shared_prefix=True,
            temperature=temperature,
        )
    prompts = rows_t // group_size  # [n] each completion with its own copy of the prompt
    return completion_logprobs(
        model,
        rollout.prompt_ids[prompts],
        rollout.prompt_mask[prompts],
        rollout.completion_ids[rows_t],
        rollout.completion_mask[rows_t],
        1,
        temperature=temperature,
    )


def micro_batch_loss(
    config: GRPOConfig,
    logp: Tensor,
    old: Tensor,
    ref: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    correct: Tensor,
    group_ids: Tensor,
    step: dict,
) -> tuple[Tensor, dict]:
    """This micro-batch's share of its optimizer step's global loss: the shares of all the step's micro-batches on
    all ranks sum to that loss, and so do their gradients. `step` holds the step's global normalisers
    (`Objective.normalisers`); the objective of algorithm.loss (llmalign.objectives) computes the share.
    `advantages` [m, T] per token."""
    a = config.algorithm
    objective = OBJECTIVES[a.loss]
    loss, metrics, weight = objective.loss(config, logp, old, advantages, mask, correct, group_ids, step)
    if ref is not None:  # k3 per token, aggregated as the objective aggregates its loss
        kl = torch.where(mask.bool(), kl_k3(logp, ref), torch.zeros_like(logp))  # [m, T]
        loss = loss + a.kl_beta * objective.kl_term(kl, mask, step, weight, config.sampling.max_new_tokens)
        metrics["kl"] = float(kl.detach().sum() / mask.sum().clamp(min=1))
    return loss, metrics


def trust_region_kl(run: Run, step: dict, local_kl_sum: float) -> float:
    """The step's KL(old || new) value from every rank's k1 sum over its kept tokens of the step."""
    return float(run.sum(local_kl_sum)) / max(step["tokens"], 1.0)


def update_parts(rows: int, parts: int, unit: int) -> list[list[int]]:
    """This rank's rows of each optimizer step of a pass: step p takes the units (rows, or whole groups of `unit`
    rows) whose index is p modulo `parts`. Each rank's block starts at a multiple of `parts` units (train refuses
    other sizes), so local and global unit indices agree modulo `parts`: step p trains on the same rows whatever
    the world size, and every rank holds rows / parts of them (the same number of forward calls everywhere)."""
    return [[i for i in range(rows) if (i // unit) % parts == p] for p in range(parts)]


@dataclasses.dataclass
class UpdateLayout:
    """How `update` walks this rank's rows: the log-prob forward, the optimizer steps' rows and their micro-batches,
    for groups of one size (`policy_logprobs`, `update_parts`) or of unequal sizes (`Groups`)."""

    logp_of: Callable[[object, list[int]], Tensor]  # (model, rows) -> [m, C]
    split: Callable[[list[int]], list[list[int]]]  # a step's rows -> micro-batches
    parts: list[list[int]]  # this rank's rows of each optimizer step of a pass
    group_size: int
    group_ids: Tensor  # [n] the group of each row (local)
    row_group: Tensor | None  # [n] on the CPU, for groups of unequal sizes
    uneven: bool

    def padded(self, run: Run, chunks: list[list[int]]) -> list[list[int]]:
        """With unequal groups, ranks hold unequal numbers of micro-batches: the last one again up to the busiest
        rank's count, so every rank makes the same calls (the repeats train on nothing)."""
        return chunks + chunks[-1:] * (run.most(len(chunks)) - len(chunks)) if self.uneven else chunks


def update_layout(config: GRPOConfig, rollout: Rollout, n: int, groups: Groups | None, device) -> UpdateLayout:
    t, a, s = config.train, config.algorithm, config.sampling
    G = t.group_size
    steps_per_pass = 1 if a.full_batch_epochs else a.updates_per_pass
    if groups is None:
        return UpdateLayout(
            lambda m, rows: policy_logprobs(m, rollout, rows, G, a.shared_prefix, s.temperature),
            lambda rows: micro_batches(rows, config.memory.micro_batch_size),
            update_parts(n, steps_per_pass, G if a.whole_groups else 1),
            G,
            torch.arange(n, device=device) // G,  # groups never straddle ranks
            None,
            False,
        )
    row_group = groups.row_group()  # [n] on the CPU
    return UpdateLayout(
        lambda m, rows: uneven_logprobs(m, rollout, rows, row_group, a.shared_prefix, s.temperature),
        lambda rows: groups.micro_batches(rows, config.memory.micro_batch_size, a.whole_groups),
        groups.parts(steps_per_pass),
        G,
        row_group.to(device),
        row_group,
        True,
    )


@dataclasses.dataclass
class StepRows:
    """The update's per-row tensors of this rank: the old and reference log-probs and what the loss takes."""

    old: Tensor | None  # [n, C] sampling policy; None: each micro-batch's own forward, detached (`update`)
    ref: Tensor | None  # [n, C] reference policy (kl_beta > 0)
    advantages: Tensor  # [n, C] per token
    mask: Tensor  # [n, C] kept completion tokens
    correct: Tensor  # [n] the objective's labels
    first_row: int  # this rank's first row in the global rollout, for messages


def optimizer_step(
    run: Run,
    config: GRPOConfig,
    model,
    optimizer,
    params,
    layout: UpdateLayout,
    part: list[int],
    rows: StepRows,
    totals: dict[str, list[float]],
) -> Tensor | None:
    """One optimizer step on this rank's rows `part` (see `update`); appends the micro-batches' metrics and the
    gradient norm to `totals` and returns the step's largest ratio deviation from 1 over its kept tokens (None
    when `rows.old` is None: the old log-probs are then each micro-batch's forward, detached, and the ratio is 1)."""
    a = config.algorithm
    objective = OBJECTIVES[a.loss]
    old, mask = rows.old, rows.mask
    micro = layout.split(part)
    real = len(micro)  # micro-batches past it repeat the last one with no gradient
    micro = layout.padded(run, micro)
    step = objective.normalisers(run, mask, part, layout.group_size, layout.row_group)
    hinge_needs_kl = objective.needs_step_kl(a)
    several = run.any(len(micro) > 1) if layout.uneven else len(micro) > 1  # decided alike on every rank
    # old = the step's own forward: its KL(old || new) is 0, the normalisers' value, and needs no pass
    if hinge_needs_kl and several and old is not None:  # a no-grad pass over the step, in the update's mode
        with torch.no_grad():
            local = sum(
                objective.step_kl_sum(layout.logp_of(model, chunk), old[chunk], mask[chunk]) * (k < real)
                for k, chunk in enumerate(micro)
            )
        step["kl"] = trust_region_kl(run, step, local)
    optimizer.zero_grad(set_to_none=True)
    failure, deviation = None, torch.zeros((), dtype=torch.float64)
    for index, chunk in enumerate(micro):
        with run.sync_gradients(model, last=index == len(micro) - 1):
            logp = layout.logp_of(model, chunk)  # [m, C]
            old_logp = logp.detach() if old is None else old[chunk]  # [m, C] the ratio's denominator
            if old is not None:
                deviation = torch.maximum(deviation, ratio_deviation(logp, old_logp, mask[chunk]))
            if hinge_needs_kl and not several:  # the step's KL from this forward itself
                step["kl"] = trust_region_kl(run, step, objective.step_kl_sum(logp.detach(), old_logp, mask[chunk]))
            loss, metrics = micro_batch_loss(
                config,
                logp,
                old_logp,
                rows.ref[chunk] if rows.ref is not None else None,
                rows.advantages[chunk],
                mask[chunk],
                rows.correct[chunk],
                layout.group_ids[chunk],
                step,
            )
            if failure is None and not torch.isfinite(loss):
                first, last = rows.first_row + chunk[0], rows.first_row + chunk[-1]
                failure = f"the loss is {loss.item()} (rows {first}..{last})"
            run.backward(loss if index < real else loss * 0.0)  # a repeat: the calls, no gradient
        if index >= real:
            continue
        for key, value in metrics.items():
            totals.setdefault(key, []).append(value)
    failure = run.first_failure(failure)
    if failure is not None:
        raise FloatingPointError(failure)
    totals.setdefault("grad_norm", []).append(run.clip_grad_norm(model, params, config.train.max_grad_norm))
    optimizer.step()
    return deviation if old is not None else None


def update(
    run: Run,
    config: GRPOConfig,
    model,
    optimizer,
    reference,
    rollout: Rollout,
    advantages: Tensor,
    keep: Tensor,
    correct: Tensor,
    groups: Groups | None = None,
    check_ratio: bool = True,
    token_mask: Tensor | None = None,
    logp_of: Callable[[object, list[int]], Tensor] | None = None,
) -> dict:
    """num_iterations passes over this rank's rows of the rollout, each updates_per_pass optimizer steps
    (algorithm.full_batch_epochs passes of one step each, DARS-B, when set; `optimizer_step`).

    `advantages`: [n, C] per token (the advantage stage's), or [n] per sequence, broadcast over the tokens.
    `token_mask`: [n, C] tokens the loss keeps besides the completion mask (SPO's probability mask; None: all).
    `logp_of`: (model, rows) -> [m, C] per-token log-probs in place of the causal forward (`update_layout`'s): the
    masked-diffusion estimate of coupled_grpo, for the old, reference and policy log-probs alike.
    `groups`: this rank's groups when their sizes differ (a second stage, replayed samples; None: all G). Step p
    then trains on the whole groups whose global index is p modulo the steps (`Groups.parts`), micro-batches never
    split a group where the loss needs whole ones, and a rank with fewer micro-batches than another repeats its
    last one with its loss times 0 (no gradient), so every rank makes the same forward and backward calls (DDP's
    collectives, DisCO's step KL).

    Each micro-batch's loss is its share of the step's global loss (`micro_batch_loss`): the dapo token mean over
    the global batch's tokens, dr_grpo's B * L_max with the global B, grpo's mean over the global sequences,
    DisCO's mean over the global questions and its trust region over the global tokens. `run.backward` then makes
    the synced gradient that of the global loss. Gradients sync on the last micro-batch only; a non-finite loss
    on any rank stops every rank before the optimizer step.

    The old log-probs are the ratio's denominator. With several optimizer steps per rollout
    (num_iterations * updates_per_pass > 1), or when `check_ratio` (log.ratio_check_every), they are computed
    first, in a no-grad pass in eval mode (the mode `generate` samples in); on the first optimizer step, whose
    weights are the rollout's, the ratio must then be 1, and its largest deviation over the step's kept tokens (all
    ranks), that no-grad recompute against the update's forward, is returned as `shared.ratio_check.METRIC`.
    Otherwise, with one optimizer step per rollout, the old log-probs are each micro-batch's own forward, detached
    (TRL does the same): the ratio is 1 exactly, the loss and gradient are those of the recomputed log-probs
    (equal to them wherever the check reads 0), one no-grad forward over the rollout fewer, and no metric.
    Replayed samples (algorithm.replay) store no old log-probs: theirs are the current policy's either way.

    When the rollout carries the engine's sampling log-probs (`Rollout.sampling_logprobs`) and the old log-probs
    were recomputed, the two are compared (`llmalign.objectives.engine_mismatch`, returned as mismatch/*: so on the
    iterations that check the ratio, or every iteration with several steps per rollout). algorithm.rollout_correction
    needs the old log-probs before the first step, so it recomputes them every iteration, and weights the per-token
    advantages by TIS/MIS (`rollout_corrected_advantages`).

    DisCO's squared hinge needs the value of the step's KL before the first backward: when a rank splits a step
    into several micro-batches, a no-grad pass over the step computes it first (one more forward over the
    step's rows); a step of one micro-batch per rank takes it from that micro-batch's own forward. With the old
    log-probs from the step's own forward, that KL is 0 and no pass is made.
    """
    a = config.algorithm
    mask = rollout.completion_mask * keep[:, None]  # [n, C] dropped samples/groups train on nothing
    if token_mask is not None:
        mask = mask * token_mask.to(mask.dtype)  # [n, C]
    if advantages.dim() == 1:  # one value per sequence: on each of its tokens
        advantages = sequence_to_tokens(advantages, mask.shape[1])  # [n, C]
    layout = update_layout(config, rollout, len(keep), groups, mask.device)
    if logp_of is not None:
        layout = dataclasses.replace(layout, logp_of=logp_of)
    # else: the one step's own forward, detached; a rollout correction weights the advantages before any step
    recompute_old = check_ratio or a.steps_per_rollout > 1 or a.rollout_correction != "none"
    with torch.no_grad():
        chunks = layout.split(list(range(len(keep))))
        chunks_run = layout.padded(run, chunks)  # as many forward calls as the busiest rank
        model.eval()  # the rollout's mode: a train-mode difference (dropout) shows in the first update's ratio
        old = None
        if recompute_old:
            old = torch.cat([layout.logp_of(model, c) for c in chunks_run][: len(chunks)])  # [n, C]
        ref = None
        if a.kl_beta > 0:
            with reference() as ref_model:
                ref_of = ref_model if ref_model is not None else model
                ref = torch.cat([layout.logp_of(ref_of, c) for c in chunks_run][: len(chunks)])  # [n, C]
    # the engine's sampling log-probs against the trainer's (both at the rollout's weights): logged, and with
    # algorithm.rollout_correction the per-token advantages weighted by TIS/MIS (llmalign.objectives)
    mismatch = {} if old is None else engine_mismatch(run, rollout.sampling_logprobs, old, rollout.completion_mask)
    if a.rollout_correction != "none":
        advantages, corrected = rollout_corrected_advantages(run, a, rollout.sampling_logprobs, old, advantages, mask)
        mismatch.update(corrected)
    rows = StepRows(old, ref, advantages, mask, correct, first_row=run.rank * len(keep))
    totals: dict[str, list[float]] = {}
    params = [p for p in model.parameters() if p.requires_grad]
    first_step_deviation = None
    model.train()
    for pass_index in range(a.passes):
        for part_index, part in enumerate(layout.parts):
            deviation = optimizer_step(run, config, model, optimizer, params, layout, part, rows, totals)
            if pass_index == 0 and part_index == 0:  # the rollout's weights: the ratio must be 1
                first_step_deviation = deviation
    model.eval()
    merged: dict[str, list[float]] = {}
    for rank_totals in run.gather_objects([totals]):  # every rank's micro-batches, for the log
        for key, values in rank_totals.items():
            merged.setdefault(key, []).extend(values)
    result = {k: sum(v) / len(v) for k, v in merged.items() if v and not any(math.isnan(x) for x in v)}
    if first_step_deviation is not None:  # checked this iteration
        result[RATIO_METRIC] = float(run.max(first_step_deviation))
    result.update(mismatch)  # mismatch/*: logged under their own names
    return result


# ----------------------------------------------------------------------------- train


def check_world_split(run: Run, config: GRPOConfig) -> None:
    """Refuse, before any model loads, a global batch that does not split into whole groups per rank, or a rank
    block that does not split into updates_per_pass equal optimizer steps (see `update_parts`)."""
    t, a = config.train, config.algorithm
    run.require_divisible(t.prompts_per_iteration, "train.prompts_per_iteration", "prompts")
    by_groups = a.whole_groups or config.uneven_groups  # unequal groups: steps split by whole groups
    units = t.prompts_per_iteration // run.world * (1 if by_groups else t.group_size)
    if units % a.updates_per_pass:
        what = "groups" if by_groups else "completions"
        raise ConfigError(
            f"config field 'algorithm.updates_per_pass': {a.updates_per_pass} does not divide the "
            f"{units} {what} of each of the {run.world} processes; use a divisor of {units}"
        )


@dataclasses.dataclass
class Advantaged:
    """What the advantage stage hands to the update: the rollout, its global statistics, and this rank's trained
    rows (replayed samples appended) with their per-token advantages."""

    sampled: IterationRollout
    reward_stats: dict[str, float]  # every reward's mean and std, and the weighted total's
    bad: Tensor  # [N] a dropped score (NaN) in any reward
    keep: Tensor  # [N] what takes part: not dropped, and the filters (zero std, overlong)
    zero_std_keep: Tensor  # [N] groups whose total reward varies
    lengths: Tensor  # [N] float completion lengths of the fresh rollouts, before any replay
    truncated: Tensor  # [N] completions cut at max_new_tokens
    rollout: Rollout  # this rank's trained rows: [n] (+ replayed)
    advantages: Tensor  # [n, C] per token; 0 for dropped samples
    trained_keep: Tensor  # [n]
    correct: Tensor  # [n] the objective's correct/incorrect labels (all False when it takes none)
    groups: Groups | None  # this rank's groups when their sizes differ (a second stage, replay)
    replay_log: dict  # train/replayed, ... under algorithm.replay=ssr
    token_mask: Tensor | None = None  # [n, C] tokens the loss keeps besides the completion mask (SPO); None: all


def advantage_stage(
    run: Run, config: GRPOConfig, sampled: IterationRollout, buffer: ReplayBuffer | None, pad_id: int
) -> Advantaged:
    """Advantages on the global batch (shared.advantages.compose_rewards, each sequence's value broadcast over its
    tokens) and what takes part (dropped samples, zero-variance groups, truncated completions); this rank keeps its
    own rows. Under algorithm.replay=ssr, too few informative samples are topped up from the buffer (`replay`)."""
    a = config.algorithm
    drop_bad = config.reward.on_bad_score == "drop"
    batch, sizes = sampled.batch, sampled.sizes
    scores, block, rollout = batch.scores, batch.block, batch.rollout  # scores: [N] each
    bad = torch.stack(list(scores.values())).isnan().any(dim=0)  # [N]
    group_ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # [N]
    advantages, reward_stats = compose_rewards(
        scores,
        config.reward.weights,
        group_ids,
        mode=config.reward.composition,  # normalize_then_sum: each reward on equal footing whatever its scale
        scale=a.scale,
        nan_policy="mask" if drop_bad else "raise",
    )  # [N]
    total = sum(config.reward.weights[n] * scores[n].nan_to_num(0.0) for n in scores)  # [N]
    truncated = run.gather_rows(rollout.truncated)  # [N]
    keep = ~bad  # [N]
    zero_std_keep, _ = zero_variance_group_mask(total, group_ids)
    if a.drops_zero_std:
        keep &= zero_std_keep
    if a.mask_overlong:
        keep &= ~truncated.cpu()
    correct = correct_labels(OBJECTIVES[a.loss], scores, a.correct_reward, a.correct_threshold)  # [N]
    own = slice(sum(sizes[: block.start]), sum(sizes[: block.stop]))
    on_device = lambda x: x[own].to(run.device)  # [n] this rank's rows
    lengths = run.gather_rows(rollout.lengths).float()  # [N] of the fresh rollouts, before any replay
    width = rollout.completion_ids.shape[1]
    trained = Advantaged(
        sampled,
        reward_stats,
        bad,
        keep,
        zero_std_keep,
        lengths,
        truncated,
        rollout,
        sequence_to_tokens(on_device(advantages.masked_fill(bad, 0.0)), width),  # [n, C]
        on_device(keep),
        on_device(correct),
        Groups(sizes[block.start : block.stop], list(block)) if config.uneven_groups else None,
        {},
    )
    if buffer is not None:
        stored = sequence_to_tokens((advantages * (keep & ~bad))[own], width)  # [n, C] this rank's, to store
        replay(run, config, buffer, trained, int((keep & (advantages != 0) & ~bad).sum()), stored, pad_id)
    return trained


def replay(
    run: Run, config: GRPOConfig, buffer: ReplayBuffer, trained: Advantaged, informative: int, stored: Tensor, pad_id
) -> None:
    """SSR: fill `trained` from the buffer when fewer than replay.min_informative samples (global count
    `informative`) carry an advantage, then store this iteration's (`stored` [n, C] this rank's advantages).
    The draws are the same on every rank; replayed group j (global index B + j) trains on rank j mod W."""
    batch, iteration = trained.sampled.batch, trained.sampled.iteration
    wanted = max(config.replay.min_informative - informative, 0)
    drawn = buffer.sample(
        min(wanted, len(buffer)), torch.Generator().manual_seed(derived_seed(config.train.seed, iteration, 3))
    )  # the same draws on every rank
    mine = drawn[run.rank :: run.world]
    block = batch.block
    own_sizes = trained.sampled.sizes[block.start : block.stop]
    buffer.add(replay_entries(run, batch.rollout, own_sizes, stored, batch.rows[block.start : block.stop]))
    trained.rollout, trained.advantages = with_replayed(batch.rollout, trained.advantages, mine, pad_id)
    device = trained.advantages.device
    trained.trained_keep = torch.cat([trained.trained_keep, torch.ones(len(mine), dtype=torch.bool, device=device)])
    trained.correct = torch.cat([trained.correct, torch.zeros(len(mine), dtype=torch.bool, device=device)])
    trained.groups = Groups(
        trained.groups.sizes + [1] * len(mine),
        trained.groups.ids + [len(batch.rows) + j for j in range(run.rank, len(drawn), run.world)],
    )
    trained.replay_log = {
        "train/replayed": len(drawn),
        "train/informative_samples": informative,
        "train/replay_buffer": len(buffer),
    }


def load_rewards(config: GRPOConfig) -> tuple[dict, dict]:
    """(training rewards, eval.rewards), each call bounded by reward.timeout_s (null: unbounded); a path that does
    not import, or kwargs its factory refuses, is a RewardError naming the reward (exit 3)."""
    rewards = {
        name: with_deadline(build_reward(name, config.reward.kwargs.get(name)), config.reward.timeout_s)
        for name in config.reward.weights
    }
    try:  # scored on the held-out greedy completions only
        eval_rewards = {
            name: with_deadline(build_reward(name, kwargs or None), config.reward.timeout_s)
            for name, kwargs in config.eval.rewards.items()
        }
    except RewardError as error:
        raise RewardError(f"eval.rewards: {error}") from None
    return rewards, eval_rewards


def restored_generated_tokens(run: Run, limit: int | None) -> int:
    """The completion tokens generated since the run started (budget.max_generated_tokens counts them; every recipe
    saves them in its checkpoints as "budget"): 0 for a new run, the checkpoint's count on --resume."""
    if run.checkpoint is None:
        return 0
    if (run.checkpoint / "budget.json").is_file():
        return int(run.load("budget")["generated_tokens"])
    if limit is not None:  # a checkpoint written before the count was saved
        run.print(
            "--resume: the checkpoint holds no generated-token count; budget.max_generated_tokens counts from here"
        )
    return 0


class GRPORecipe:
    """GRPO in the loop's stages (shared.loop): rollout (with its rewards), advantage, update."""

    def __init__(self, config: GRPOConfig, load=load_policy, engine=start_engine):
        self.config = config
        # how the policy loads and what samples it: (model config, device) -> (model, tokenizer), and
        # (run, config, tokenizer, train rows, test rows) -> an engine or None (generate); coupled_grpo passes its own
        self.load, self.start_engine = load, engine

    def setup(self, run: Run) -> Plan:
        config, t, a, d = self.config, self.config.train, self.config.algorithm, self.config.data
        self.run = run
        check_world_split(run, config)
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        # data, model, rewards, optimizer; the main process builds the embedded toy first if it is missing
        data_files = (d.train, d.test) if d.path is None else ()  # beside data.path they are not read
        run.main_first(lambda: [resolve_embedded(p) for p in (config.model.path, *data_files) if p])
        self.train_rows, test_rows = load_train_test(d, resolve=resolve_embedded)  # data.path, or train/test
        self.test_rows = test_rows[: d.eval_size]
        self.rewards, self.eval_rewards = load_rewards(config)
        check_groupwise_rewards(config, self.rewards, self.eval_rewards)
        model, self.tokenizer = self.load(config.model, run.device)
        if config.memory.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        texts = [render_prompt(self.tokenizer, row["prompt"]) for row in self.train_rows]
        prompt_ids, self.truncated_prompts = tokenize_prompts(
            self.tokenizer, texts, d.max_prompt_length, d.overlong_prompts
        )
        for index, (row, text, ids) in enumerate(zip(self.train_rows, texts, prompt_ids)):
            row["_text"], row["_ids"], row["_index"] = text, ids, index
        self.reference = reference_policy(model, config.model.lora) if a.kl_beta > 0 else None
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        self.model, self.optimizer = run.prepare(model, optimizer)
        start = restore_policy(run, self.model, self.optimizer)
        self.engine = self.start_engine(
            run, config, self.tokenizer, self.train_rows, self.test_rows
        )  # None: rollout.engine=hf
        self.first_iteration = start  # log.ratio_check_every: checked here, resumed or not
        run.write_config(config)
        per_rank = t.prompts_per_iteration // run.world
        run.print(
            f"{a.loss}: {t.prompts_per_iteration} prompts x {t.group_size} completions per iteration over "
            f"{run.world} process(es) ({per_rank} prompts = {per_rank * t.group_size} completions each, "
            f"{a.updates_per_pass} optimizer step(s) per pass), {len(self.train_rows)} training rows, "
            f"{sum(p.numel() for p in params):,} trainable parameters, {self.truncated_prompts} prompts truncated; "
            f"device {run.device}, mixed precision {config.memory.mixed_precision}; output {run.out}"
        )
        self.restore_state()
        self.ratio_check = FirstUpdateRatioCheck(LLM_COMPARED)  # warns once per run (per resumed run) about ratio != 1
        curves = ("reward/total/mean", "eval/accuracy", "eval/sampled_accuracy")
        curves += (*[f"eval/{name}" for name in self.eval_rewards], "completion/mean_length", "train/kl")
        title = f"GRPO ({a.loss}) on {config.model.path}"
        return Plan(start, t.iterations, f"grpo[{a.loss}]", config.budget.max_seconds, curves=curves, title=title)

    def restore_state(self) -> None:
        """The replay buffer (every rank holds the same) and the generated-token count, from the checkpoint."""
        run, config = self.run, self.config
        self.buffer = replay_buffer(self.config) if self.config.algorithm.replay == "ssr" else None
        if self.buffer is not None and run.checkpoint is not None:
            self.buffer.load_state_dict(run.load("replay"))
        self.generated_total = restored_generated_tokens(run, config.budget.max_generated_tokens)

    def evaluate(self, done: int) -> dict:
        """Held-out metrics after `done` iterations; eval.rewards score the greedy completions (a reward that
        fails stops the run as a training reward does; under reward.on_bad_score=drop its bad scores are left out)."""
        config, s, d = self.config, self.config.sampling, self.config.data
        score_fn = None
        if self.eval_rewards:
            score_fn = lambda prompts, rollout, rows: score(
                self.eval_rewards,
                prompts,
                rollout,
                rows,
                1,
                max(done - 1, 0),
                s.max_new_tokens,
                config.reward.on_bad_score == "drop",
            )
        with self.run.unwrapped_for_generation(self.model) as policy:
            if self.engine is not None and self.test_rows:  # it holds the last rollout's weights, maybe not these
                self.engine.push_policy(policy)
            return held_out_metrics(
                policy,
                self.tokenizer,
                self.test_rows,
                s.max_new_tokens,
                s.temperature,
                d.eval_samples,
                seed=config.train.seed + 12345,
                run=self.run,
                score_fn=score_fn,
                engine=self.engine,
            )

    def before_record(self) -> dict:
        return {"prompts_truncated": self.truncated_prompts}

    def report_before(self, before: dict) -> None:
        self.run.print(f"held-out accuracy before ({len(self.test_rows)} problems): {self.describe(before)}")

    def describe(self, result: dict) -> str:
        s, d = self.config.sampling, self.config.data
        return describe_held_out(result, s.temperature, d.eval_samples, len(self.test_rows))

    # ------------------------------------------------------------------------- stages

    def rollout(self, iteration: int) -> IterationRollout:
        clock = time.perf_counter()
        if self.engine is not None:  # colocate: the engine samples from the weights of the last optimizer step
            self.engine.push_policy(self.run.unwrap(self.model))
        pushed = time.perf_counter() - clock
        sampled = sample_iteration(
            self.run, self.config, self.model, self.tokenizer, self.rewards, self.train_rows, iteration, self.engine
        )
        if self.engine is not None:
            sampled.timings["time/weight_push"] = pushed
        self.generated_total += sampled.generated
        return sampled

    def advantage(self, sampled: IterationRollout) -> Advantaged:
        return advantage_stage(self.run, self.config, sampled, self.buffer, self.tokenizer.pad_token_id)

    def update(self, trained: Advantaged) -> dict:
        clock = time.perf_counter()
        metrics = update(
            self.run,
            self.config,
            self.model,
            self.optimizer,
            self.reference,
            trained.rollout,
            trained.advantages,
            trained.trained_keep,
            trained.correct,
            trained.groups,
            check_ratio=self.checks_ratio(trained.sampled.iteration),
            token_mask=trained.token_mask,
        )
        trained.sampled.timings["time/update"] = time.perf_counter() - clock
        iteration = trained.sampled.iteration
        if RATIO_METRIC in metrics:
            warning = self.ratio_check.warning(metrics[RATIO_METRIC], f"iteration {iteration + 1}")
            if warning is not None:
                self.run.print(warning)
        return metrics

    def checks_ratio(self, iteration: int) -> bool:
        """Whether this iteration (0-based) recomputes the old log-probs to check the first update's ratio: the run's
        first iteration (a resumed run's too), then every log.ratio_check_every (0: never again)."""
        every = self.config.log.ratio_check_every
        return iteration == self.first_iteration or (every > 0 and iteration % every == 0)

    def record(self, trained: Advantaged, metrics: dict) -> dict:
        sampled = trained.sampled
        plan, sizes, G0, timings = sampled.plan, sampled.sizes, sampled.first_size, sampled.timings
        checked = {RATIO_METRIC: metrics.pop(RATIO_METRIC)} if RATIO_METRIC in metrics else {}  # not as train/...
        mismatch = {key: metrics.pop(key) for key in [k for k in metrics if k.startswith("mismatch/")]}
        record = {
            **{f"reward/{k}": v for k, v in trained.reward_stats.items()},
            **{f"train/{k}": v for k, v in metrics.items()},
            **checked,  # only on iterations that checked the ratio (log.ratio_check_every)
            **mismatch,
            "train/zero_std_groups": plan.zero_std / plan.sampled,  # of the groups sampled this iteration
            "train/rollouts": plan.sampled * G0 + sum(sizes) - len(sizes) * G0,  # generated this iteration, all ranks
            "train/generated_tokens": sampled.generated,  # completion tokens generated this iteration, EOS included
            "train/generated_tokens_total": self.generated_total,
            "train/refill_rounds": plan.rounds,
            "train/informative_groups": plan.informative,  # in the trained batch
            "train/dropped": int(trained.bad.sum()),
            "train/kept": float(trained.keep.float().mean()),
            "completion/mean_length": float(trained.lengths.mean()),
            "completion/truncated": float(trained.truncated.float().mean()),
            "tokens_per_second": float(trained.lengths.sum()) / max(sum(timings.values()), 1e-9),
            **timings,
            **sampled.staged,
            **trained.replay_log,
        }
        if self.config.rollout.two_stage:
            record["train/second_stage_rollouts"] = sum(sizes) - len(sizes) * G0
            starts = [0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]]  # each trained group's first row
            record["train/zero_std_trained_groups"] = float((~trained.zero_std_keep[starts]).float().mean())
        record.update(sampled.rethink)
        fns = self.rewards.items()
        record.update({f"reward/{n}/budget": fn.budget(sampled.iteration) for n, fn in fns if hasattr(fn, "budget")})
        return record

    def stop_early(self) -> bool:
        limit = self.config.budget.max_generated_tokens
        return limit is not None and self.generated_total >= limit

    def logged(self, done: int, trained: Advantaged, record: dict) -> None:
        """The first group of each iteration (the main process's) to samples.jsonl, to read, and as a table where a
        tracker takes one."""
        batch, size = trained.sampled.batch, trained.sampled.sizes[0]
        sample = {
            "iteration": done,
            "prompt": batch.rows[0]["_text"],
            "completions": batch.rollout.texts[:size],
            "rewards": {n: v[:size].tolist() for n, v in batch.scores.items()},
        }
        self.run.append(sample, name="samples.jsonl")
        self.run.log_table("samples", *completions_table(sample), step=done)

    def postfix(self, record: dict) -> dict:
        metrics = {k[len("train/") :]: v for k, v in record.items() if k.startswith("train/")}
        return {
            "reward": f"{record['reward/total/mean']:.3f}",
            "length": f"{record['completion/mean_length']:.1f}",
            **OBJECTIVES[self.config.algorithm.loss].postfix(metrics),
        }

    def save(self, done: int, more_states: dict | None = None) -> None:
        """The policy's checkpoint; `more_states`: a composing recipe's own (the critic's), saved beside."""
        extra_states = {"budget": {"generated_tokens": self.generated_total}, **(more_states or {})}
        if self.buffer is not None:
            extra_states["replay"] = self.buffer.state_dict()
        save_policy_checkpoint(self.run, self.config, self.model, self.tokenizer, self.optimizer, done, extra_states)

    def closing(self) -> str:
        out = self.run.out
        return f"metrics {out / 'metrics.jsonl'}, curves {out / 'reward_curve.png'}, model {out / 'final'}"


# algorithm.name -> the recipe whose stages the loop runs (shared.loop); each takes the GRPOConfig. A recipe in its
# own module that imports this one is named by its import path 'module:function', loaded when chosen (importing it
# here would be an import cycle).
ALGORITHMS: dict[str, Callable[[GRPOConfig], object] | str] = {
    "grpo": GRPORecipe,
    "spo_chain": lambda config: SPOChainRecipe(config, GRPORecipe(config)),  # GRPO's stages, two of them changed
    "spo_tree": lambda config: SPOTreeRecipe(config, GRPORecipe(config)),
    "gigpo": "llmalign.gigpo:gigpo_recipe",
    "episode_grpo": "llmalign.gigpo:episode_grpo_recipe",
    "ppo": lambda config: PPORecipe(config, GRPORecipe(config)),  # GRPO's stages with a critic and GAE
    "t_ppo": lambda config: TPPORecipe(config, GRPORecipe(config)),  # PPO on windows of in-flight responses
    "coupled_grpo": "llmalign.coupled_grpo:coupled_grpo_recipe",  # a masked-diffusion LM
}


def algorithm_recipe(name: str) -> Callable[[GRPOConfig], object]:
    """The recipe factory of algorithm.name (`ALGORITHMS`), imported when it is an import path."""
    found = ALGORITHMS[name]
    if isinstance(found, str):
        module_name, _, attribute = found.partition(":")
        found = getattr(importlib.import_module(module_name), attribute)
    return found


def train(config: GRPOConfig, resume: bool = False, allow_config_change: bool = False) -> dict:
    check_rollout(config)  # before the run directory is written
    run = open_run(config, resume, allow_config_change, tag="[llmalign]")
    recipe = algorithm_recipe(config.algorithm.name)(config)
    try:
        return run_loop(recipe, run, config.log.eval_every, config.log.checkpoint_every)
    finally:
        if getattr(recipe, "engine", None) is not None:  # its process group and memory, for what runs next here
            recipe.engine.close()

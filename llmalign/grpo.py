"""GRPO for text reasoning on any transformers causal LM (grpo, dr_grpo, dapo, disco losses).

    llmalign grpo --config configs/llm/arith.yaml                       # embedded default
    llmalign grpo --config configs/llm/arith.yaml train.iterations=5 algorithm.loss=dapo
    llmalign grpo --config configs/llm/arith.yaml --resume              # continue the run
    accelerate launch --multi_gpu --num_processes 2 -m llmalign grpo --config configs/llm/arith.yaml

Each iteration: rollout (B prompts x G completions with `generate`), reward (the configured
functions, TRL's signature), advantage (shared.advantages), update (num_iterations passes, each
split into updates_per_pass optimizer steps of micro-batches), log, checkpoint.

Over W processes (`shared.run.Run`): B counts over all of them, and rank r samples the r-th contiguous block of
B/W whole groups, from the seed (seed, iteration, rank). Every reward's values are gathered, so advantages (group
or batch std), the zero-variance filter and the logs see the global batch; each rank keeps its own rows. The loss
of an optimizer step is the global batch's (its denominators are sums over ranks) and `update` splits the rollout
into the same optimizer steps whatever W, so the update on given rollouts does not depend on the world size.
One departure from one process: a reward that compares groups within its batch (grpo_lambda's top fraction of
groups) compares the groups of one rank's block.

The rollout of an iteration is one sampling round, or under algorithm.filter_zero_std=refill up to
1 + max_refill_rounds of them (`refill`, DAPO dynamic sampling): each later round samples and scores about as
many new prompts as should give the missing informative groups (`sample_round`), every rank deciding from the
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
- rollout.rethink_fraction: Forced Rethinking of finished first-stage rollouts before they are scored (`rethink`).
- train.full_batch_epochs: DARS-B's passes of one full-batch optimizer step each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from shared.reward_calls import RewardError, RewardTimeout, scores_as_floats, with_deadline
from llmalign.config import GRPOConfig
from llmalign.data import iteration_rows, load_train_test, micro_batches, render_prompt, tokenize_prompts
from llmalign.objectives import OBJECTIVES, correct_labels
from llmalign.evaluate import Rollout, describe_held_out, generate, held_out_metrics, pad_left
from llmalign.logprobs import completion_logprobs, real_token_positions
from llmalign.policy import (
    enable_gradient_checkpointing,
    load_policy,
    reference_policy,
    restore_policy,
    save_policy_checkpoint,
)
from llmalign.rewards import build_reward
from llmalign.toy import resolve_embedded
from shared.advantages import compose_rewards, sequence_to_tokens
from shared.allocation import dars_extra_rollouts, gvm_allocation
from shared.config import ConfigError
from shared.filtering import zero_variance_group_mask
from shared.kl import kl_k3
from shared.ratio_check import METRIC as RATIO_METRIC
from shared.ratio_check import FirstUpdateRatioCheck, ratio_deviation
from shared.replay import ReplayBuffer
from shared.run import Run
from shared.runlog import plot_curves
from shared.trackers import completions_table

RANK_SEED_STRIDE = 2**40  # rank r samples from seed + r * stride: rank 0 keeps the one-process seeds


# ----------------------------------------------------------------------------- reward


def score(
    rewards: dict,
    prompts: list[str],
    rollout: Rollout,
    rows: list[dict],
    group_size: int,
    step: int,
    max_new_tokens: int,
    drop_bad: bool,
    first_index: int = 0,
) -> dict[str, Tensor]:
    """name -> [B*G] scores; None/NaN/inf become NaN when drop_bad, else raise RewardError. Completions are
    named by their index in the global rollout, which starts at `first_index` on this rank. A reward past its
    reward.timeout_s (RewardTimeout) is a RewardError, or under drop_bad its whole batch becomes NaN (dropped)."""
    columns = {key: [row[key] for row in rows for _ in range(group_size)] for key in rows[0] if key != "prompt"}
    completions = rollout.texts
    expanded_prompts = [p for p in prompts for _ in range(group_size)]
    scores = {}
    for name, fn in rewards.items():
        try:
            values = fn(
                expanded_prompts,
                completions,
                completion_ids=rollout.token_lists(),
                group_size=group_size,
                step=step,
                max_completion_length=max_new_tokens,
                **columns,
            )
        except RewardTimeout as error:
            message = f"reward {name!r} {error} (iteration {step + 1}, first prompt {expanded_prompts[0][:60]!r})"
            if not drop_bad:
                raise RewardError(f"{message}; raise reward.timeout_s or fix the reward") from None
            print(f"warning: {message}; its {len(completions)} completions are dropped", file=sys.stderr, flush=True)
            scores[name] = torch.full((len(completions),), math.nan)  # [B*G] the whole batch dropped
            continue
        except Exception as error:
            raise RewardError(
                f"reward {name!r} raised {type(error).__name__}: {error} (iteration {step + 1}, "
                f"first prompt {expanded_prompts[0][:60]!r})"
            ) from error
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardError(
                f"reward {name!r} returned {got} scores for {len(completions)} completions "
                f"(iteration {step + 1}); return one float (or None) per completion"
            )
        try:
            tensor, _ = scores_as_floats(values)  # [B*G]; None -> NaN
        except ValueError as error:  # a str, dict, or an integer too large for a float: never dropped
            raise RewardError(
                f"reward {name!r} {error} (iteration {step + 1}); return one float (or None) per completion"
            ) from None
        bad = ~torch.isfinite(tensor)
        if bad.any() and not drop_bad:
            i = int(bad.nonzero()[0])
            raise RewardError(
                f"reward {name!r} gave {values[i]!r} for completion {first_index + i} (iteration "
                f"{step + 1}, {int(bad.sum())} bad in the batch): {completions[i][:80]!r}; fix the "
                f"reward or set reward.on_bad_score=drop to drop and count such samples"
            )
        scores[name] = tensor.masked_fill(bad, math.nan)
    return scores


def sample_round(
    run: Run,
    config: GRPOConfig,
    model,
    tokenizer,
    rewards: dict,
    rows: list[dict],
    iteration: int,
    round_: int,
    drop_bad: bool,
    timings: dict[str, float],
    group_size: int | None = None,
) -> RoundSample:
    """Sample round `round_` of an iteration on the global prompts `rows`: this rank generates `group_size`
    completions (None: train.group_size) for its block of them (from `rollout_seed`, for an exact resume), continues
    rollout.rethink_fraction of the finished ones after the trigger (`rethink`), and scores them; every reward's
    values are gathered over the round (a reward failure on any rank raises on all). Adds to time/rollout,
    time/reward."""
    t, s, r = config.train, config.sampling, config.rollout
    G = group_size or t.group_size
    clock = time.perf_counter()
    block = run.block(len(rows))
    mine = rows[block.start : block.stop]
    torch.manual_seed(rollout_seed(t.seed, iteration, run.rank, round_))
    rethought = eligible = 0
    with run.unwrapped_for_generation(model) as policy:
        rollout = generate(
            policy,
            tokenizer,
            [row["_ids"] for row in mine],
            G,
            s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
        )
        if r.rethink_fraction > 0:
            rollout, rethought, eligible = rethink(
                policy,
                tokenizer,
                rollout,
                G,
                r.rethink_fraction,
                r.rethink_trigger,
                s.max_new_tokens,
                s.temperature,
                s.top_p,
                derived_seed(t.seed, iteration, run.rank, round_, 4),
            )
    timings["time/rollout"] += time.perf_counter() - clock
    clock = time.perf_counter()
    columns = [{k: v for k, v in row.items() if not k.startswith("_")} for row in mine]
    local, failure = None, None
    try:
        local = score(
            rewards,
            [row["_text"] for row in mine],
            rollout,
            columns,
            G,
            iteration,
            s.max_new_tokens,
            drop_bad,
            first_index=block.start * G,
        )
    except RewardError as error:
        failure = str(error)
    scores = gathered_scores(run, local, failure)  # name -> [n*G]
    timings["time/reward"] += time.perf_counter() - clock
    return RoundSample(rows, block, rollout, scores, rethought=rethought, rethink_eligible=eligible)


def gathered_scores(
    run: Run, local: dict[str, Tensor] | None, failure: str | None, uneven: bool = False
) -> dict[str, Tensor]:
    """Every reward's [B*G] values over the global rollout (rank order is rollout order), or the RewardError of
    the first rank whose rewards failed, raised on every rank together. `uneven`: the ranks hold different
    numbers of completions (a second stage), gathered with `Run.gather_rows`."""
    failure = run.first_failure(failure)
    if failure is not None:
        raise RewardError(failure)
    gather = run.gather_rows if uneven else run.gather
    return {name: gather(values) for name, values in local.items()}


# ----------------------------------------------------------------------------- rollout rounds


@dataclasses.dataclass
class RoundSample:
    """One sampling round (or the assembled batch): the global rows, this rank's block of them, its rollout, and
    every reward's scores over the global rollout."""

    rows: list[dict]  # [n] global, in rollout order
    block: range  # this rank's rows of `rows`
    rollout: Rollout  # this rank's groups: [len(block) * G] completions (sum of its sizes under `sizes`)
    scores: dict[str, Tensor]  # name -> [n * G] global (sum(sizes) under `sizes`), NaN: dropped
    sizes: list[int] | None = None  # [n] global group sizes when they differ (a second stage); None: all G
    rethought: int = 0  # this rank's completions continued after rollout.rethink_trigger
    rethink_eligible: int = 0  # this rank's finished completions with room for the trigger


@dataclasses.dataclass
class RefillPlan:
    """What `refill` sampled and chose: the batch's groups as (round, group index in that round) in sampling order,
    how many of them are informative, the rounds after the first, and the groups sampled (zero-variance ones)."""

    chosen: list[tuple[int, int]]
    informative: int
    rounds: int
    sampled: int
    zero_std: int


def refill(sample_round: Callable[[int, int], Tensor], wanted: int, max_rounds: int, multiple: int = 1) -> RefillPlan:
    """DAPO dynamic sampling (Yu et al. 2025, arXiv:2503.14476, Sec. 3.2: over-sample and keep the groups that
    satisfy the constraint 0 < |{o_i | is_equivalent(a, o_i)}| < G of the DAPO objective, Eq. 8, until the batch
    is full). `sample_round(r, n)` samples round r of n prompts (round 0: the iteration's own `wanted`) and returns
    its groups' informative flags [n] bool, the same on every rank. Rounds go on while fewer than `wanted` groups
    are informative and fewer than `max_rounds` rounds followed the first.

    Departures from DAPO's code (verl, which samples a fixed gen_batch_size of prompts per round and stops with an
    error past max_num_gen_batches), both measured on the embedded task (README):
    - a refill round samples n = ceil(missing * sampled / informative) prompts, the missing groups over the
      informative fraction seen so far this iteration (all `wanted` when none was informative yet), at most
      `wanted`, rounded up to a multiple of `multiple` (the process count: whole groups per rank); a fixed round
      of `wanted` prompts spent 64 completions on one missing group of 8;
    - when the rounds run out the batch holds the informative groups found plus the earliest zero-variance ones
      (which train on nothing) up to `wanted` groups, so every rank keeps a block of the same size.
    The batch is the first `wanted` informative groups in sampling order; with max_rounds 0 it is the first round
    as sampled (the 'drop' filter)."""
    informative: list[tuple[int, int]] = []
    uninformative: list[tuple[int, int]] = []
    round_, count = 0, wanted
    while True:
        flags = sample_round(round_, count)  # [count]
        for group, flag in enumerate(flags.tolist()):
            (informative if flag else uninformative).append((round_, group))
        missing = wanted - len(informative)
        if missing <= 0 or round_ >= max_rounds:
            break
        round_ += 1
        sampled = len(informative) + len(uninformative)
        count = -(-missing * sampled // len(informative)) if informative else wanted  # ceil
        count = -(-min(count, wanted) // multiple) * multiple  # wanted is a multiple of it
    found = informative[:wanted]
    chosen = sorted(found + uninformative[: wanted - len(found)])  # (round, group): sampling order
    sampled = len(informative) + len(uninformative)
    return RefillPlan(chosen, len(found), round_, sampled, len(uninformative))


def informative_groups(scores: dict[str, Tensor], weights: dict[str, float], group_size: int) -> Tensor:
    """[n] whether each group's weighted total reward varies (`zero_variance_group_mask`, dropped samples as 0,
    the total the zero-std filter has always used)."""
    total = sum(weights[name] * scores[name].nan_to_num(0.0) for name in scores)  # [n*G]
    keep, _ = zero_variance_group_mask(total, torch.arange(len(total)) // group_size)  # [n*G]
    return keep[::group_size]  # [n]


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SHA-256), for streams that must not meet the trainer's other seeds."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def rollout_seed(seed: int, iteration: int, rank: int, round_: int) -> int:
    """The generation seed of a round on a rank: round 0 keeps the seed the trainer has always used (so drop and
    refill sample the same first round); later rounds have their own."""
    if round_ == 0:
        return seed * 1_000_003 + iteration + rank * RANK_SEED_STRIDE
    return derived_seed(seed, iteration, rank, round_, 1)


def refill_rows(rows: list[dict], iteration: int, start: int, count: int, seed: int, taken: set[int]) -> list[dict]:
    """Positions start .. start + count - 1 of an iteration's refill stream (each refill round takes the next
    ones): one seeded permutation of the training rows per iteration, leaving out the iteration's first-round rows
    (`taken`, by `_index`) while others remain, wrapping around. A function of (seed, iteration), the first
    round's rows and the round sizes, so a resumed run draws the same prompts with nothing saved (as
    `iteration_rows`)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, iteration, 2))
    order = torch.randperm(len(rows), generator=generator).tolist()
    candidates = [i for i in order if i not in taken] or order
    return [rows[candidates[(start + k) % len(candidates)]] for k in range(count)]


def assemble_batch(
    run: Run, rounds: list[RoundSample], chosen: list[tuple[int, int]], group_size: int, pad_id: int
) -> RoundSample:
    """The trained batch: the `chosen` (round, group) groups in that order, each rank holding its block of them
    (`Run.redistribute` moves a group from the rank that sampled it); prompts re-padded on the left as `generate`
    does, completions on the right to the longest. The first round itself when it is the whole choice."""
    G = group_size
    if chosen == [(0, group) for group in range(len(rounds[0].rows))]:
        return rounds[0]
    wanted, held = set(chosen), {}
    for round_, sample in enumerate(rounds):
        r = sample.rollout
        for local, group in enumerate(sample.block):
            if (round_, group) not in wanted:
                continue
            part = slice(local * G, (local + 1) * G)
            held[(round_, group)] = (
                r.completion_ids[part].cpu(),  # [G, C_round]
                r.completion_mask[part].cpu(),  # [G, C_round]
                r.truncated[part].cpu(),  # [G]
                r.texts[part],
            )
    pieces = run.redistribute(held, chosen)
    rows = [rounds[round_].rows[group] for round_, group in chosen]
    block = run.block(len(rows))
    prompt_ids, prompt_mask = pad_left([row["_ids"] for row in rows[block.start : block.stop]], pad_id)  # [b, P]
    width = max(int(mask.sum(dim=1).max()) for _, mask, _, _ in pieces)  # the longest chosen completion
    fit = lambda x, value: F.pad(x[:, :width], (0, width - min(x.shape[1], width)), value=value)  # [G, width]
    device = rounds[0].rollout.completion_ids.device
    rollout = Rollout(
        prompt_ids.to(device),
        prompt_mask.to(device),
        torch.cat([fit(ids, pad_id) for ids, _, _, _ in pieces]).to(device),  # [b*G, width]
        torch.cat([fit(mask, 0) for _, mask, _, _ in pieces]).to(device),  # [b*G, width]
        torch.cat([truncated for _, _, truncated, _ in pieces]).to(device),  # [b*G]
        [text for *_, texts in pieces for text in texts],
    )
    scores = {
        name: torch.cat([rounds[round_].scores[name][group * G : (group + 1) * G] for round_, group in chosen])
        for name in rounds[0].scores
    }  # name -> [B*G]
    return RoundSample(rows, block, rollout, scores)


# ----------------------------------------------------------------------------- Forced Rethinking


def rethink(
    policy,
    tokenizer,
    rollout: Rollout,
    group_size: int,
    fraction: float,
    trigger: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> tuple[Rollout, int, int]:
    """Forced Rethinking (Wang et al. 2025, VL-Rethinker, arXiv:2504.08837, Sec. 3): a fraction of the finished
    rollouts get `trigger` appended and generation continues from prompt + completion + trigger; the completion
    becomes completion (EOS dropped) + trigger + continuation, which is what is scored and trained.

    Eligible: completions that ended with EOS and leave room for the trigger and at least one more token within
    max_new_tokens (the continuation's budget is what is left, so no completion exceeds L_max and dr_grpo's
    denominator and the length rewards keep their meaning). round(fraction * eligible) of them, drawn by a
    generator from `seed` (a resumed run draws the same), are continued in one `generate` call; a continuation cut
    at its budget without EOS is truncated. Departure: VL-Rethinker appends the trigger to the rollouts of its
    training data (and rewards rethinking that fixes an answer); here the rollouts of the current policy are
    continued, as issue 16 asks. Returns (rollout, continued, eligible)."""
    trigger_ids = tokenizer(trigger, add_special_tokens=False)["input_ids"]
    lengths = rollout.lengths  # [n] EOS included
    room = max_new_tokens - (lengths - 1) - len(trigger_ids)  # [n] tokens left for the continuation
    eligible = torch.nonzero(~rollout.truncated & (room >= 1)).flatten().cpu()  # [e]
    count = math.floor(fraction * len(eligible) + 0.5)
    if count == 0:
        return rollout, 0, len(eligible)
    generator = torch.Generator().manual_seed(seed)
    chosen = eligible[torch.randperm(len(eligible), generator=generator)[:count]].sort().values.tolist()
    heads = []  # each chosen completion without its EOS, then the trigger
    for row in chosen:
        head = rollout.completion_ids[row, : int(lengths[row]) - 1].tolist()
        heads.append(head + trigger_ids)
    prefixes = []
    for row, head in zip(chosen, heads):
        prompt = rollout.prompt_ids[row // group_size][rollout.prompt_mask[row // group_size].bool()].tolist()
        prefixes.append(prompt + head)
    torch.manual_seed(derived_seed(seed, 1))
    continued = generate(
        policy, tokenizer, prefixes, 1, max(int(room[row]) for row in chosen), temperature=temperature, top_p=top_p
    )
    completions = [ids[: int(n)] for ids, n in zip(rollout.completion_ids.tolist(), lengths.tolist())]
    truncated = rollout.truncated.clone()  # [n]
    texts = list(rollout.texts)
    for k, (row, head) in enumerate(zip(chosen, heads)):
        budget = int(room[row])
        tail = continued.completion_ids[k, : int(continued.lengths[k])].tolist()  # EOS included when it ended
        ended = bool(not continued.truncated[k]) and len(tail) <= budget
        completions[row] = head + tail[:budget]
        truncated[row] = not ended
        texts[row] = tokenizer.decode(completions[row], skip_special_tokens=True)
    width = max(len(c) for c in completions)
    pad = tokenizer.pad_token_id
    device = rollout.completion_ids.device
    ids = torch.tensor([c + [pad] * (width - len(c)) for c in completions], device=device)  # [n, width]
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions], device=device)  # [n, width]
    return Rollout(rollout.prompt_ids, rollout.prompt_mask, ids, mask, truncated, texts), count, len(eligible)


# ----------------------------------------------------------------------------- second stage (DARS, GVM)


def pass_rates(scores: dict[str, Tensor], sizes: list[int], reward: str, threshold: float) -> Tensor:
    """[n] float64 fraction of each group's completions whose `reward` exceeds `threshold` (a dropped, NaN score
    counts as wrong); groups are consecutive, of `sizes`."""
    correct = (scores[reward].nan_to_num(0.0) > threshold).double()  # [sum(sizes)]
    group_ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # [sum(sizes)]
    totals = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, group_ids, correct)  # [n]
    return totals / torch.tensor(sizes, dtype=torch.float64)


@torch.no_grad()
def logit_gradient_norms(
    policy, rollout: Rollout, advantages: Tensor, group_size: int, temperature: float, chunk: int
) -> Tensor:
    """GVM's gradient-norm estimate G_i for this rank's groups [b] (float64): the exact norm of the gradient of the
    group's sequence-mean policy-gradient loss, -(1/G) sum_j A_j (1/L_j) sum_t log pi(o_jt), with respect to the
    logits z (temperature-scaled) of every completion token, from one no-grad forward:

        d log softmax(z)[o] / dz = e_o - pi,   so   G_i^2 = sum_j (A_j / (G L_j))^2 sum_t ||e_{o_jt} - pi_jt||^2

    (the positions are distinct variables, so the squared norms add). The parameter gradient is this vector times
    the network's Jacobian; the logit gradient is the cheap last-layer proxy of importance-sampling work
    (Katharopoulos & Fleuret 2018, arXiv:1803.00942, Sec. 3.3). Departure: GVM-RAFT (arXiv:2505.02391) estimates
    G_i from the parameter gradients of the accepted samples, one backward per prompt; we use this proxy to avoid
    that backward, and the group advantages A_j of the first stage (so all-correct and all-wrong groups, which
    carry no GRPO gradient, get G_i = 0 and gvm_allocation's min_count)."""
    lengths = rollout.lengths  # [n]
    squared = []  # [n] sum_t ||e_o - pi||^2 per completion
    for start in range(0, len(lengths), chunk):
        rows = torch.arange(start, min(start + chunk, len(lengths)))
        prompts = rows // group_size
        input_ids = torch.cat([rollout.prompt_ids[prompts], rollout.completion_ids[rows]], dim=1)  # [m, P+C]
        attention = torch.cat([rollout.prompt_mask[prompts], rollout.completion_mask[rows]], dim=1)  # [m, P+C]
        P, C = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
        logits = policy(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=real_token_positions(attention),
            use_cache=False,
        ).logits[:, P - 1 : P + C - 1]  # [m, C, V]
        probs = torch.softmax(logits.float() / temperature, dim=-1)  # [m, C, V] float32, as the training forward
        chosen = probs.gather(-1, rollout.completion_ids[rows][..., None]).squeeze(-1)  # [m, C]
        per_token = (1.0 - 2.0 * chosen + probs.pow(2).sum(-1)).double()  # [m, C] ||e_o - pi||^2
        squared.append((per_token * rollout.completion_mask[rows]).sum(dim=1).cpu())  # [m]
    weight = advantages.double().cpu() / (group_size * lengths.double().cpu())  # [n]
    per_row = weight.pow(2) * torch.cat(squared)  # [n]
    return per_row.reshape(-1, group_size).sum(dim=1).sqrt()  # [b]


def second_stage_counts(config: GRPOConfig, rates: Tensor, grad_norms: Tensor | None) -> Tensor:
    """[n] second-stage rollouts per prompt of the batch, the same on every rank (a function of gathered
    statistics): DARS's extra rollouts for the hard prompts or GVM's variance-minimising counts
    (shared.allocation), under the budget rollout.extra_budget * prompts_per_iteration * group_size.

    p_i is the fraction of the prompt's first-stage completions whose algorithm.correct_reward exceeds
    algorithm.correct_threshold; GVM's G_i is `logit_gradient_norms` on the same completions. Both come from this
    iteration's first stage only: statistics of earlier visits of a prompt (shared.stats.PromptStatTracker) are not
    used, since the policy has moved since and the first stage is cheap (gvm_first_stage samples per prompt)."""
    t, r = config.train, config.rollout
    budget = r.extra_rollouts(t.prompts_per_iteration, t.group_size)
    cap = r.max_total(t.group_size)
    if r.schedule == "gvm":
        first = r.gvm_first_stage
        return gvm_allocation(
            rates,
            grad_norms,
            budget,
            min_count=r.min_rollouts_per_prompt,
            max_count=None if cap is None else cap - first,
        )
    return dars_extra_rollouts(rates, r.dars_threshold, budget, r.schedule[-2:], t.group_size, max_rollouts=cap)


def second_stage(
    run: Run,
    config: GRPOConfig,
    model,
    tokenizer,
    rewards: dict,
    batch: RoundSample,
    extra: list[int],
    iteration: int,
    drop_bad: bool,
    timings: dict[str, float],
) -> RoundSample:
    """The batch with each prompt's `extra[g]` second-stage rollouts joined to its group: this rank generates its
    block's (one `generate` row per extra rollout, from a seed of (seed, iteration, rank)) and scores them (each
    reward call gets them as groups of 1); the scores are gathered (ranks hold unequal numbers). Every group is
    then its first-stage completions followed by its extra ones; `sizes` holds the group sizes."""
    t, s = config.train, config.sampling
    G = len(batch.scores[next(iter(batch.scores))]) // len(batch.rows)  # the first stage's group size
    block, first = batch.block, batch.rollout
    local = [g for g in block for _ in range(extra[g])]  # the global group of each extra rollout of this rank
    scores_local, failure, rollout = None, None, None
    if local:
        clock = time.perf_counter()
        torch.manual_seed(derived_seed(t.seed, iteration, run.rank, 3))
        with run.unwrapped_for_generation(model) as policy:
            rollout = generate(
                policy,
                tokenizer,
                [batch.rows[g]["_ids"] for g in local],
                1,
                s.max_new_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
            )
        timings["time/rollout"] += time.perf_counter() - clock
        clock = time.perf_counter()
        try:
            scores_local = score(
                rewards,
                [batch.rows[g]["_text"] for g in local],
                rollout,
                [{k: v for k, v in batch.rows[g].items() if not k.startswith("_")} for g in local],
                1,
                iteration,
                s.max_new_tokens,
                drop_bad,
                first_index=len(batch.scores[next(iter(batch.scores))]) + sum(extra[: block.start]),
            )
        except RewardError as error:
            failure = str(error)
        timings["time/reward"] += time.perf_counter() - clock
    else:  # nothing to generate here: empty scores, so the gather still lines up
        scores_local = {name: torch.zeros(0, dtype=values.dtype) for name, values in batch.scores.items()}
    extra_scores = gathered_scores(run, scores_local, failure, uneven=True)  # name -> [sum(extra)]
    sizes = [G + e for e in extra]
    ends = torch.tensor(extra).cumsum(0).tolist()  # [n]
    scores = {
        name: torch.cat(
            [
                torch.cat([batch.scores[name][g * G : (g + 1) * G], extra_scores[name][ends[g] - extra[g] : ends[g]]])
                for g in range(len(sizes))
            ]
        )
        for name in batch.scores
    }  # name -> [sum(sizes)]
    if rollout is None:
        return RoundSample(batch.rows, block, first, scores, sizes=sizes)
    # this rank's rows, group by group: the first stage's G, then its extra ones
    width = max(first.completion_ids.shape[1], rollout.completion_ids.shape[1])
    fit = lambda x, value: F.pad(x, (0, width - x.shape[1]), value=value)  # [m, width]
    ids, mask = fit(first.completion_ids, tokenizer.pad_token_id), fit(first.completion_mask, 0)
    more_ids, more_mask = fit(rollout.completion_ids, tokenizer.pad_token_id), fit(rollout.completion_mask, 0)
    order, texts, position = [], [], 0  # order: indices into cat(first rows, extra rows)
    for local_group, g in enumerate(block):
        order += list(range(local_group * G, (local_group + 1) * G))
        order += [len(first.texts) + position + k for k in range(extra[g])]
        texts += first.texts[local_group * G : (local_group + 1) * G] + rollout.texts[position : position + extra[g]]
        position += extra[g]
    order_t = torch.tensor(order, device=ids.device)
    merged = Rollout(
        first.prompt_ids,
        first.prompt_mask,
        torch.cat([ids, more_ids])[order_t],  # [sum(local sizes), width]
        torch.cat([mask, more_mask])[order_t],  # [sum(local sizes), width]
        torch.cat([first.truncated, rollout.truncated])[order_t],  # [sum(local sizes)]
        texts,
    )
    return RoundSample(batch.rows, block, merged, scores, sizes=sizes)


# ----------------------------------------------------------------------------- Selective Sample Replay

REPLAY_SCALARS = {"advantage": torch.float32, "truncated": torch.bool, "index": torch.int64}
REPLAY_SEQUENCES = {"prompt": torch.int64, "completion": torch.int64, "token_advantage": torch.float32}
REPLAY_CONSTANT = {"token_advantage": ("advantage", "completion")}  # saved as the scalar while it is constant


def replay_buffer(config: GRPOConfig) -> ReplayBuffer:
    """algorithm.replay=ssr's buffer: per sample its prompt and completion token ids (unpadded, EOS included), its
    advantages per completion token and as one value (which decides admission and the replay probability), whether
    it was truncated, and its training row's index (to read).

    A replayed sample trains with its stored advantages (from the batch it was sampled in) and old log-probs
    recomputed by the update under the current policy, like every row: its ratio starts at 1, so the clip bounds
    the step from the current policy, not from the older one that sampled it. Storing the sampling policy's
    log-probs instead was not done (what VL-Rethinker's code does here was not checked); recomputing keeps the
    buffer to token ids and advantages. While every entry's per-token advantages are its one value repeated (the
    sequence-level objectives), the saved state holds only that value (`ReplayBuffer` constant_fields)."""
    return ReplayBuffer(
        config.replay.size,
        REPLAY_SCALARS,
        REPLAY_SEQUENCES,
        "advantage",
        config.replay.alpha,
        constant_fields=REPLAY_CONSTANT,
    )


def replay_entries(
    run: Run, rollout: Rollout, sizes: list[int], token_advantages: Tensor, rows: list[dict]
) -> list[dict]:
    """Every rank's samples with their advantages (`token_advantages` [n, C] this rank's, 0 for what trains on
    nothing) as buffer entries, gathered in rank order so every rank's buffer receives the same; `rows` are this
    rank's prompt rows and `sizes` its group sizes. An entry's one advantage is its completion tokens' value when
    they all hold the same (a sequence-level advantage), else their mean."""
    entries = []
    row_group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).tolist()
    lengths = rollout.lengths.tolist()
    for i, length in enumerate(lengths):
        values = token_advantages[i, :length].cpu()  # [L_i]
        if not bool(values.any()):
            continue  # the buffer would refuse it anyway; nothing to pickle
        constant = bool((values == values[0]).all())
        g = row_group[i]
        entries.append(
            {
                "advantage": (values[0] if constant else values.double().mean()).to(torch.float32),
                "truncated": rollout.truncated[i].cpu().clone(),
                "index": torch.tensor(rows[g]["_index"], dtype=torch.int64),
                "prompt": rollout.prompt_ids[g][rollout.prompt_mask[g].bool()].cpu(),
                "completion": rollout.completion_ids[i, :length].cpu(),
                "token_advantage": values.to(torch.float32),
            }
        )
    return run.gather_objects(entries)


def with_replayed(rollout: Rollout, token_advantages: Tensor, drawn: list[dict], pad_id: int) -> tuple[Rollout, Tensor]:
    """This rank's rollout and its per-token advantages [n, C] with the replayed samples `drawn` appended, each as a
    group of one (its own prompt) with its stored advantages: ([n+k] rollout, [n+k, width])."""
    if not drawn:
        return rollout, token_advantages
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.prompt_ids.cpu(), rollout.prompt_mask.cpu())]
    prompt_ids, prompt_mask = pad_left(prompts + [entry["prompt"].tolist() for entry in drawn], pad_id)  # [b+k, P]
    width = max(rollout.completion_ids.shape[1], max(len(entry["completion"]) for entry in drawn))
    device = rollout.completion_ids.device
    grow = width - rollout.completion_ids.shape[1]
    ids = F.pad(rollout.completion_ids, (0, grow), value=pad_id)  # [n, width]
    mask = F.pad(rollout.completion_mask, (0, grow), value=0)  # [n, width]
    more_ids = torch.tensor(
        [e["completion"].tolist() + [pad_id] * (width - len(e["completion"])) for e in drawn], device=device
    )  # [k, width]
    more_mask = torch.tensor(
        [[1] * len(e["completion"]) + [0] * (width - len(e["completion"])) for e in drawn], device=device
    )  # [k, width]
    more_advantages = torch.stack(
        [F.pad(e["token_advantage"], (0, width - len(e["token_advantage"]))) for e in drawn]
    ).to(device)  # [k, width] 0 on padding
    replayed = Rollout(
        prompt_ids.to(device),
        prompt_mask.to(device),
        torch.cat([ids, more_ids]),
        torch.cat([mask, more_mask]),
        torch.cat([rollout.truncated, torch.stack([e["truncated"] for e in drawn]).to(device)]),
        list(rollout.texts) + ["<replayed>"] * len(drawn),
    )
    return replayed, torch.cat([F.pad(token_advantages, (0, grow)), more_advantages])  # [n+k, width]


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
) -> dict:
    """num_iterations passes over this rank's rows of the rollout, each updates_per_pass optimizer steps
    (train.full_batch_epochs passes of one step each, DARS-B, when set).

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

    The old log-probs are always computed, in a no-grad pass in eval mode (the mode `generate` samples in): they
    are the ratio's denominator, and on the first optimizer step, whose weights are the rollout's, the ratio must
    be 1. Its largest deviation over the step's kept tokens (all ranks) is returned as
    `shared.ratio_check.METRIC`. With num_iterations 1 and updates_per_pass 1 that pass is one extra no-grad
    forward over the rollout per iteration, spent on this check.

    DisCO's squared hinge needs the value of the step's KL before the first backward: when a rank splits a step
    into several micro-batches, a no-grad pass over the step computes it first (one more forward over the
    step's rows); a step of one micro-batch per rank takes it from that micro-batch's own forward.
    """
    t, a, s = config.train, config.algorithm, config.sampling
    G = t.group_size
    objective = OBJECTIVES[a.loss]
    steps_per_pass = 1 if t.full_batch_epochs else t.updates_per_pass
    mask = rollout.completion_mask * keep[:, None]  # [n, C] dropped samples/groups train on nothing
    if advantages.dim() == 1:  # one value per sequence: on each of its tokens
        advantages = sequence_to_tokens(advantages, mask.shape[1])  # [n, C]
    if groups is None:
        group_ids = torch.arange(len(keep), device=mask.device) // G  # [n] groups never straddle ranks
        logp_of = lambda m, rows: policy_logprobs(m, rollout, rows, G, a.shared_prefix, s.temperature)  # [m, C]
        parts = update_parts(len(keep), steps_per_pass, G if a.whole_groups else 1)
        split = lambda rows: micro_batches(rows, t.micro_batch_size)
        row_group = None
    else:
        row_group = groups.row_group()  # [n] on the CPU
        group_ids = row_group.to(mask.device)  # [n]
        logp_of = lambda m, rows: uneven_logprobs(m, rollout, rows, row_group, a.shared_prefix, s.temperature)
        parts = groups.parts(steps_per_pass)
        split = lambda rows: groups.micro_batches(rows, t.micro_batch_size, a.whole_groups)
    first_row = run.rank * len(keep)  # this rank's rows in the global rollout, for messages
    with torch.no_grad():
        chunks = split(list(range(len(keep))))
        if groups is not None:  # as many forward calls as the busiest rank: the last chunk again, dropped
            chunks_run = chunks + chunks[-1:] * (run.most(len(chunks)) - len(chunks))
        else:
            chunks_run = chunks
        model.eval()  # the rollout's mode: a train-mode difference (dropout) shows in the first update's ratio
        old = torch.cat([logp_of(model, c) for c in chunks_run][: len(chunks)])  # [n, C]
        ref = None
        if a.kl_beta > 0:
            with reference() as ref_model:
                ref_of = ref_model if ref_model is not None else model
                ref = torch.cat([logp_of(ref_of, c) for c in chunks_run][: len(chunks)])  # [n, C]
    totals: dict[str, list[float]] = {}
    params = [p for p in model.parameters() if p.requires_grad]
    first_step_deviation = torch.zeros((), dtype=torch.float64)
    model.train()
    for pass_index in range(t.passes):
        for part_index, part in enumerate(parts):
            first_step = pass_index == 0 and part_index == 0
            micro = split(part)
            real = len(micro)  # micro-batches past it repeat the last one with no gradient
            if groups is not None:
                micro = micro + micro[-1:] * (run.most(len(micro)) - len(micro))
            step = objective.normalisers(run, mask, part, G, row_group)
            hinge_needs_kl = objective.needs_step_kl(a)
            several = len(micro) > 1 if groups is None else run.any(len(micro) > 1)  # decided alike on every rank
            if hinge_needs_kl and several:  # a no-grad pass over the step, in the update's mode
                with torch.no_grad():
                    local = sum(
                        objective.step_kl_sum(logp_of(model, rows), old[rows], mask[rows]) * (k < real)
                        for k, rows in enumerate(micro)
                    )
                step["kl"] = trust_region_kl(run, step, local)
            optimizer.zero_grad(set_to_none=True)
            failure = None
            for index, rows in enumerate(micro):
                with run.sync_gradients(model, last=index == len(micro) - 1):
                    logp = logp_of(model, rows)  # [m, C]
                    if first_step:
                        first_step_deviation = torch.maximum(
                            first_step_deviation, ratio_deviation(logp, old[rows], mask[rows])
                        )
                    if hinge_needs_kl and not several:  # the step's KL from this forward itself
                        local = objective.step_kl_sum(logp.detach(), old[rows], mask[rows])
                        step["kl"] = trust_region_kl(run, step, local)
                    loss, metrics = micro_batch_loss(
                        config,
                        logp,
                        old[rows],
                        ref[rows] if ref is not None else None,
                        advantages[rows],
                        mask[rows],
                        correct[rows],
                        group_ids[rows],
                        step,
                    )
                    if failure is None and not torch.isfinite(loss):
                        failure = f"the loss is {loss.item()} (rows {first_row + rows[0]}..{first_row + rows[-1]})"
                    run.backward(loss if index < real else loss * 0.0)  # a repeat: the calls, no gradient
                if index >= real:
                    continue
                for key, value in metrics.items():
                    totals.setdefault(key, []).append(value)
            failure = run.first_failure(failure)
            if failure is not None:
                raise FloatingPointError(failure)
            totals.setdefault("grad_norm", []).append(run.clip_grad_norm(model, params, t.max_grad_norm))
            optimizer.step()
    model.eval()
    merged: dict[str, list[float]] = {}
    for rank_totals in run.gather_objects([totals]):  # every rank's micro-batches, for the log
        for key, values in rank_totals.items():
            merged.setdefault(key, []).extend(values)
    result = {k: sum(v) / len(v) for k, v in merged.items() if v and not any(math.isnan(x) for x in v)}
    result[RATIO_METRIC] = float(run.max(first_step_deviation))
    return result


# ----------------------------------------------------------------------------- train


def check_world_split(run: Run, config: GRPOConfig) -> None:
    """Refuse, before any model loads, a global batch that does not split into whole groups per rank, or a rank
    block that does not split into updates_per_pass equal optimizer steps (see `update_parts`)."""
    t, a = config.train, config.algorithm
    run.require_divisible(t.prompts_per_iteration, "train.prompts_per_iteration", "prompts")
    by_groups = a.whole_groups or config.uneven_groups  # unequal groups: steps split by whole groups
    units = t.prompts_per_iteration // run.world * (1 if by_groups else t.group_size)
    if units % t.updates_per_pass:
        what = "groups" if by_groups else "completions"
        raise ConfigError(
            f"config field 'train.updates_per_pass': {t.updates_per_pass} does not divide the "
            f"{units} {what} of each of the {run.world} processes; use a divisor of {units}"
        )


def train(config: GRPOConfig, resume: bool = False, allow_config_change: bool = False) -> dict:
    t, a, s = config.train, config.algorithm, config.sampling
    run = Run(
        config.log.output_dir,
        resume,
        tag="[llmalign]",
        mixed_precision=t.mixed_precision,
        config=config,
        allow_config_change=allow_config_change,
        trackers=config.log.report_to,
    )
    check_world_split(run, config)
    torch.manual_seed(t.seed)
    random.seed(t.seed)

    # setup: data, model, rewards, optimizer; the main process builds the embedded toy first if it is missing
    d = config.data
    data_files = (d.train, d.test) if d.path is None else ()  # beside data.path they are not read
    run.main_first(lambda: [resolve_embedded(p) for p in (config.model.path, *data_files) if p])
    train_rows, test_rows = load_train_test(d, resolve=resolve_embedded)  # data.path, or data.train/data.test
    test_rows = test_rows[: d.eval_size]
    model, tokenizer = load_policy(config.model, run.device)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    texts = [render_prompt(tokenizer, row["prompt"]) for row in train_rows]
    prompt_ids, truncated_prompts = tokenize_prompts(tokenizer, texts, d.max_prompt_length, d.overlong_prompts)
    for index, (row, text, ids) in enumerate(zip(train_rows, texts, prompt_ids)):
        row["_text"], row["_ids"], row["_index"] = text, ids, index
    # each call bounded by reward.timeout_s (null: unbounded); a path that does not import, or kwargs its factory
    # refuses, is a RewardError naming the reward (exit 3)
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
    reference = reference_policy(model, config.model.lora) if a.kl_beta > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    model, optimizer = run.prepare(model, optimizer)
    start = restore_policy(run, model, optimizer)
    run.write_config(config)
    per_rank = t.prompts_per_iteration // run.world
    run.print(
        f"{a.loss}: {t.prompts_per_iteration} prompts x {t.group_size} completions per iteration over "
        f"{run.world} process(es) ({per_rank} prompts = {per_rank * t.group_size} completions each, "
        f"{t.updates_per_pass} optimizer step(s) per pass), {len(train_rows)} training rows, "
        f"{sum(p.numel() for p in params):,} trainable parameters, {truncated_prompts} prompts truncated; "
        f"device {run.device}, mixed precision {t.mixed_precision}; output {run.out}"
    )

    def evaluate(done: int) -> dict:
        """Held-out metrics after `done` iterations; eval.rewards score the greedy completions (a reward that
        fails stops the run as a training reward does; under reward.on_bad_score=drop its bad scores are left out)."""
        score_fn = None
        if eval_rewards:
            score_fn = lambda prompts, rollout, rows: score(
                eval_rewards,
                prompts,
                rollout,
                rows,
                1,
                max(done - 1, 0),
                s.max_new_tokens,
                config.reward.on_bad_score == "drop",
            )
        with run.unwrapped_for_generation(model) as policy:
            return held_out_metrics(
                policy,
                tokenizer,
                test_rows,
                s.max_new_tokens,
                s.temperature,
                d.eval_samples,
                seed=t.seed + 12345,
                run=run,
                score_fn=score_fn,
            )

    before = {}
    if start == 0:
        before = evaluate(0)
        run.append({"iteration": 0, **before, "prompts_truncated": truncated_prompts})
        if before:
            run.print(
                f"held-out accuracy before ({len(test_rows)} problems): "
                f"{describe_held_out(before, s.temperature, d.eval_samples, len(test_rows))}"
            )

    drop_bad = config.reward.on_bad_score == "drop"
    r = config.rollout
    G0 = r.first_stage_size(t.group_size)  # rollouts per prompt of the first stage
    buffer = replay_buffer(config) if a.replay == "ssr" else None
    if buffer is not None and run.checkpoint is not None:
        buffer.load_state_dict(run.load("replay"))  # every rank holds the same buffer
    generated_total = 0  # completion tokens generated since the run started (train.max_generated_tokens)
    if run.checkpoint is not None:
        if (run.checkpoint / "budget.json").is_file():
            generated_total = int(run.load("budget")["generated_tokens"])
        elif t.max_generated_tokens is not None:  # a checkpoint written before the count was saved
            run.print(
                "--resume: the checkpoint holds no generated-token count; train.max_generated_tokens counts from here"
            )
    ratio_check = FirstUpdateRatioCheck()  # warns once per run (per resumed run) about on-policy ratio != 1
    progress = tqdm(
        range(start, t.iterations), desc=f"grpo[{a.loss}]", initial=start, total=t.iterations, disable=not run.is_main
    )
    record = {}
    for iteration in progress:
        # rollout and reward: one round of B prompts, or more under refill (`refill`), each rank sampling its block
        # of whole groups and every reward's values gathered; then each rank's block of the chosen groups
        timings = {"time/rollout": 0.0, "time/reward": 0.0}
        rounds: list[RoundSample] = []
        taken: set[int] = set()  # the first round's rows, which later rounds leave out

        def sample(round_: int, count: int) -> Tensor:
            if round_ == 0:
                rows = iteration_rows(train_rows, iteration, count, t.seed)  # the global batch
                taken.update(row["_index"] for row in rows)
            else:
                drawn = sum(len(earlier.rows) for earlier in rounds[1:])  # by the earlier refill rounds
                rows = refill_rows(train_rows, iteration, drawn, count, t.seed, taken)
            rounds.append(
                sample_round(run, config, model, tokenizer, rewards, rows, iteration, round_, drop_bad, timings, G0)
            )
            return informative_groups(rounds[-1].scores, config.reward.weights, G0)  # [count]

        plan = refill(sample, t.prompts_per_iteration, a.refill_rounds, multiple=run.world)
        generated = sum(int(one.rollout.lengths.sum()) for one in rounds)  # this rank's tokens, every round
        batch = assemble_batch(run, rounds, plan.chosen, G0, tokenizer.pad_token_id)
        staged = {}  # the second stage's statistics, logged
        if r.two_stage:  # DARS / GVM: more rollouts on the batch's own prompts, decided from gathered statistics
            rates = pass_rates(batch.scores, [G0] * len(batch.rows), a.correct_reward, a.correct_threshold)  # [B]
            grad_norms = None
            if r.schedule == "gvm":
                first_advantages, _ = compose_rewards(
                    batch.scores,
                    config.reward.weights,
                    torch.arange(len(batch.rows) * G0) // G0,
                    scale=a.scale,
                    nan_policy="mask" if drop_bad else "raise",
                )  # [B*G0]
                own_first = slice(batch.block.start * G0, batch.block.stop * G0)
                with run.unwrapped_for_generation(model) as policy:
                    local_norms = logit_gradient_norms(
                        policy,
                        batch.rollout,
                        first_advantages[own_first].to(run.device),
                        G0,
                        s.temperature,
                        t.micro_batch_size,
                    )  # [b]
                grad_norms = run.gather(local_norms.to(run.device)).cpu()  # [B] float64
                staged["rollout/grad_norms"] = grad_norms.tolist()
            extra = second_stage_counts(config, rates, grad_norms).tolist()  # [B]
            staged.update({"rollout/pass_rates": rates.tolist(), "rollout/extra": extra})
            first_stage_tokens = int(batch.rollout.lengths.sum())  # this rank's, redistributed under refill
            batch = second_stage(run, config, model, tokenizer, rewards, batch, extra, iteration, drop_bad, timings)
            generated += int(batch.rollout.lengths.sum()) - first_stage_tokens  # its second-stage tokens
        generated = int(run.sum(generated))  # all ranks
        generated_total += generated
        rows, block, rollout, scores = batch.rows, batch.block, batch.rollout, batch.scores  # scores: [N] each
        sizes = batch.sizes or [t.group_size] * len(rows)  # [B] global group sizes
        bad = torch.stack(list(scores.values())).isnan().any(dim=0)  # [N]
        if a.filter_zero_std == "refill" and plan.informative < t.prompts_per_iteration:
            run.print(
                f"iteration {iteration + 1}: refill found {plan.informative} informative groups of "
                f"{t.prompts_per_iteration} in {plan.rounds} more round(s) (algorithm.max_refill_rounds); "
                f"training on those"
            )

        # advantage on the global batch (and what takes part: dropped samples, zero-variance groups, truncated
        # completions); this rank keeps its own rows
        group_ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # [N]
        advantages, reward_stats = compose_rewards(
            scores, config.reward.weights, group_ids, scale=a.scale, nan_policy="mask" if drop_bad else "raise"
        )
        total = sum(config.reward.weights[n] * scores[n].nan_to_num(0.0) for n in scores)  # [B*G]
        truncated = run.gather_rows(rollout.truncated)  # [N]
        keep = ~bad  # [B*G]
        zero_std_keep, _ = zero_variance_group_mask(total, group_ids)
        if a.drops_zero_std:
            keep &= zero_std_keep
        if a.mask_overlong:
            keep &= ~truncated.cpu()
        correct = correct_labels(OBJECTIVES[a.loss], scores, a.correct_reward, a.correct_threshold)  # [N]
        own = slice(sum(sizes[: block.start]), sum(sizes[: block.stop]))
        on_device = lambda x: x[own].to(run.device)  # [n] this rank's rows
        lengths = run.gather_rows(rollout.lengths).float()  # [N] of the fresh rollouts, before any replay
        trained_advantages = sequence_to_tokens(
            on_device(advantages.masked_fill(bad, 0.0)), rollout.completion_ids.shape[1]
        )  # [n, C]
        trained_keep, trained_correct, trained_rollout = on_device(keep), on_device(correct), rollout
        groups = Groups(sizes[block.start : block.stop], list(block)) if config.uneven_groups else None
        replay_log = {}
        if buffer is not None:  # SSR: fill from the buffer when too few samples carry an advantage, then store ours
            informative = int((keep & (advantages != 0) & ~bad).sum())  # global
            wanted = max(config.replay.min_informative - informative, 0)
            drawn = buffer.sample(
                min(wanted, len(buffer)), torch.Generator().manual_seed(derived_seed(t.seed, iteration, 3))
            )  # the same draws on every rank
            mine = drawn[run.rank :: run.world]  # replayed group j (global index B + j) trains on rank j mod W
            own_rows = rows[block.start : block.stop]
            stored = sequence_to_tokens((advantages * (keep & ~bad))[own], rollout.completion_ids.shape[1])  # [n, C]
            buffer.add(replay_entries(run, rollout, sizes[block.start : block.stop], stored, own_rows))
            trained_rollout, trained_advantages = with_replayed(
                rollout, trained_advantages, mine, tokenizer.pad_token_id
            )  # [n+k, width]
            device = trained_advantages.device
            trained_keep = torch.cat([trained_keep, torch.ones(len(mine), dtype=torch.bool, device=device)])
            trained_correct = torch.cat([trained_correct, torch.zeros(len(mine), dtype=torch.bool, device=device)])
            groups = Groups(
                groups.sizes + [1] * len(mine),
                groups.ids + [len(rows) + j for j in range(run.rank, len(drawn), run.world)],
            )
            replay_log = {
                "train/replayed": len(drawn),
                "train/informative_samples": informative,
                "train/replay_buffer": len(buffer),
            }

        # update
        clock = time.perf_counter()
        try:
            metrics = update(
                run,
                config,
                model,
                optimizer,
                reference,
                trained_rollout,
                trained_advantages,
                trained_keep,
                trained_correct,
                groups,
            )
        except FloatingPointError as error:
            raise run.nan_stop(f"iteration {iteration + 1}", error) from None
        timings["time/update"] = time.perf_counter() - clock
        first_update_deviation = metrics.pop(RATIO_METRIC)  # logged under its own name, not as train/...
        warning = ratio_check.warning(first_update_deviation, f"iteration {iteration + 1}")
        if warning is not None:
            run.print(warning)

        # log
        done = iteration + 1
        record = {
            "iteration": done,
            **{f"reward/{k}": v for k, v in reward_stats.items()},
            **{f"train/{k}": v for k, v in metrics.items()},
            RATIO_METRIC: first_update_deviation,
            "train/zero_std_groups": plan.zero_std / plan.sampled,  # of the groups sampled this iteration
            "train/rollouts": plan.sampled * G0 + sum(sizes) - len(sizes) * G0,  # generated this iteration, all ranks
            "train/generated_tokens": generated,  # completion tokens generated this iteration, EOS included
            "train/generated_tokens_total": generated_total,
            "train/refill_rounds": plan.rounds,
            "train/informative_groups": plan.informative,  # in the trained batch
            "train/dropped": int(bad.sum()),
            "train/kept": float(keep.float().mean()),
            "completion/mean_length": float(lengths.mean()),
            "completion/truncated": float(truncated.float().mean()),
            "tokens_per_second": float(lengths.sum()) / max(sum(timings.values()), 1e-9),
            **timings,
            **staged,
            **replay_log,
        }
        if r.two_stage:
            record["train/second_stage_rollouts"] = sum(sizes) - len(sizes) * G0
            starts = [0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]]  # each trained group's first row
            record["train/zero_std_trained_groups"] = float((~zero_std_keep[starts]).float().mean())  # after stage 2
        if r.rethink_fraction > 0:  # over the iteration's first-stage rounds, all ranks
            record["train/rethought"] = int(run.sum(sum(one.rethought for one in rounds)))
            record["train/rethink_eligible"] = int(run.sum(sum(one.rethink_eligible for one in rounds)))
        record.update(
            {f"reward/{n}/budget": fn.budget(iteration) for n, fn in rewards.items() if hasattr(fn, "budget")}
        )
        out_of_tokens = t.max_generated_tokens is not None and generated_total >= t.max_generated_tokens
        last = run.is_last(done, t.iterations, t.max_seconds) or out_of_tokens
        if run.due(done, config.log.eval_every, last):
            record.update(evaluate(done))
        run.append(record)
        sample = {
            "iteration": done,
            "prompt": rows[0]["_text"],
            "completions": rollout.texts[: sizes[0]],
            "rewards": {n: v[: sizes[0]].tolist() for n, v in scores.items()},
        }
        run.append(sample, name="samples.jsonl")  # the first group of each iteration (the main process's), to read
        run.log_table("samples", *completions_table(sample), step=done)  # and as a table, where a tracker takes one
        progress.set_postfix(
            reward=f"{reward_stats['total/mean']:.3f}",
            length=f"{record['completion/mean_length']:.1f}",
            **OBJECTIVES[a.loss].postfix(metrics),
        )

        # checkpoint
        if run.due(done, config.log.checkpoint_every, last):
            extra_states = {"budget": {"generated_tokens": generated_total}}
            if buffer is not None:
                extra_states["replay"] = buffer.state_dict()
            save_policy_checkpoint(run, config, model, tokenizer, optimizer, done, extra_states)
        if last:
            break

    after = {k: v for k, v in record.items() if k.startswith("eval/")}
    out = run.out
    curves = [
        "reward/total/mean",
        "eval/accuracy",
        "eval/sampled_accuracy",
        *[f"eval/{name}" for name in eval_rewards],
        "completion/mean_length",
        "train/kl",
    ]
    run.main_only(
        lambda: plot_curves(
            out / "metrics.jsonl", out / "reward_curve.png", curves, f"GRPO ({a.loss}) on {config.model.path}"
        )
    )
    if before and after:
        for label, result in (("before", before), ("after ", after)):
            run.print(
                f"held-out accuracy {label}: {describe_held_out(result, s.temperature, d.eval_samples, len(test_rows))}"
            )
    run.print(f"metrics {out / 'metrics.jsonl'}, curves {out / 'reward_curve.png'}, model {out / 'final'}")
    run.close()
    return {"before": before, "after": after}

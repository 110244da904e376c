"""The rollout stage of `llmalign grpo`: an iteration's completions and their rewards, and the samples replayed.

`sample_iteration` returns the iteration's `IterationRollout`:
- one sampling round of B prompts x G completions (`sample_round`: `generate` on this rank's block of whole
  groups, `score` with every reward's values gathered, Forced Rethinking of finished ones: `forced_rethinking`
  and `rethink_keep` as VL-Rethinker's code, or `continue_after_trigger`), or under
  algorithm.filter_zero_std=refill up to 1 + max_refill_rounds of them (`refill`, DAPO dynamic sampling), the
  chosen groups moved so each rank holds its block (`assemble_batch`);
- under rollout.schedule dars_et / dars_hw / gvm, a second stage on the batch's own prompts (`second_stage`, its
  counts from the gathered first-stage statistics, `second_stage_counts`).
Rewards are scored inside the rounds because refill decides from them. Selective Sample Replay (`replay_buffer`,
`replay_entries`, `with_replayed`) needs the advantages and is called by the advantage stage.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from llmalign.config import GRPOConfig
from llmalign.data import iteration_rows, render_prompt
from llmalign.engines import HFEngine, RolloutEngine, VLLMEngine, as_engine, require_vllm
from llmalign.toy import resolve_embedded
from llmalign.evaluate import Rollout, derived_seed, pad_left
from llmalign.logprobs import real_token_positions
from shared.advantages import compose_rewards
from shared.allocation import DARS_MAX_THRESHOLD, dars_extra_rollouts, gvm_allocation
from shared.config import need
from shared.filtering import zero_variance_group_mask
from shared.replay import ReplayBuffer
from shared.reward_calls import (
    GroupOutputError,
    RewardError,
    RewardTimeout,
    is_groupwise,
    score_groups,
    scores_as_floats,
)
from shared.run import Run

RANK_SEED_STRIDE = 2**40  # rank r samples from seed + r * stride: rank 0 keeps the one-process seeds


# ----------------------------------------------------------------------------- checks


def check_rollout(config: GRPOConfig) -> None:
    """Refuse, before the run directory is written (`llmalign.grpo.train`, and the dry run's plan), what the
    rollout stage cannot do with a config that its section's own check lets through:

    - rollout.dars_threshold above 1/2 under dars_et / dars_hw (the official DARS schedules add no rollouts at a
      pass rate >= 1/2; `shared.allocation.dars_extra_rollouts`);
    - Forced Rethinking in the vl_rethinker style without algorithm.correct_reward among the rewards (its keep rule
      and triggers need the answers' correctness), with grpo_lambda (the continued completions reach the rewards
      as groups of 1, which it cannot rank), or with a negative rollout.rethink_min_tokens;
    - rollout.engine=vllm without the vllm package (`llmalign.engines.require_vllm`)."""
    r, a, weights = config.rollout, config.algorithm, config.reward.weights
    if r.engine == "vllm":
        require_vllm()
    if r.schedule in ("dars_et", "dars_hw"):
        need(
            r.dars_threshold <= DARS_MAX_THRESHOLD,
            "rollout.dars_threshold",
            f"{r.dars_threshold} is above {DARS_MAX_THRESHOLD:g}: DARS adds no rollouts at a pass rate >= 1/2 "
            "(the official schedule_ET / schedule_HW; ET's target is symmetric about 1/2); use 0.5 or lower",
        )
    if r.rethink_fraction > 0 and r.rethink_style == "vl_rethinker":
        need(
            a.correct_reward in weights,
            "algorithm.correct_reward",
            f"{a.correct_reward!r} is not among the configured rewards {sorted(weights)}; Forced Rethinking "
            "(rollout.rethink_style=vl_rethinker) keeps only correct rethought answers: name the reward that scores "
            "correctness, or use rollout.rethink_style=continue",
        )
        need(
            "grpo_lambda" not in weights,
            "rollout.rethink_style",
            "vl_rethinker: the rethought completions reach the rewards as groups of 1, which grpo_lambda (it ranks "
            "whole groups) cannot score; drop grpo_lambda or use rollout.rethink_style=continue",
        )
        need(
            r.rethink_min_tokens >= 0,
            "rollout.rethink_min_tokens",
            f"{r.rethink_min_tokens} is negative; use 0 or more (VL-Rethinker: 30)",
        )


def start_engine(
    run: Run, config: GRPOConfig, tokenizer, train_rows: list[dict], test_rows: list[dict] = ()
) -> RolloutEngine | None:
    """rollout.engine=vllm: a `VLLMEngine` on model.path, its max_model_len the longest training or held-out
    prompt + sampling.max_new_tokens (every generation of the stage fits: refill draws from the same rows, and
    Forced Rethinking's continuations stay within the completion budget); None under rollout.engine=hf. Each process holds
    its own engine, every rank starting it together (vLLM's groups are made over the launcher's process group)."""
    r = config.rollout
    if r.engine == "hf":
        return None
    longest = max(len(row["_ids"]) for row in train_rows)
    for row in test_rows:  # the held-out evaluation generates with the engine too
        longest = max(
            longest, len(tokenizer(render_prompt(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"])
        )
    return VLLMEngine(
        resolve_embedded(config.model.path),
        tokenizer,
        max_model_len=longest + config.sampling.max_new_tokens,
        kv_cache_mib=r.vllm_kv_cache_mib,
        gpu_memory_utilization=r.vllm_gpu_memory_utilization,
        dtype=config.model.dtype,
        seed=config.train.seed,
    )


# ----------------------------------------------------------------------------- reward


def call_text_reward(
    fn, prompts: list[str], completions: list[str], columns: dict, group_size: int, step: int, max_new_tokens: int
) -> list:
    """One text reward's values for the batch: a batch reward is called once with every completion; a groupwise
    one (shared.reward_calls) once per group of `group_size` consecutive completions, with that group's prompt and
    its slice of every column, its output checked (GroupOutputError)."""
    common = {"group_size": group_size, "step": step, "max_completion_length": max_new_tokens}
    if not is_groupwise(fn):
        return fn(prompts, completions, **columns, **common)

    def call_group(members: list[int]):
        part = slice(members[0], members[-1] + 1)  # a group is contiguous
        return fn(prompts[members[0]], completions[part], **{k: v[part] for k, v in columns.items()}, **common)

    return score_groups([i // group_size for i in range(len(completions))], call_group)


GROUPWISE_ALGORITHMS = ("grpo",)  # algorithm.name values whose every reward call holds whole groups


def check_groupwise_rewards(config: GRPOConfig, rewards: dict, eval_rewards: dict) -> None:
    """A groupwise reward where a call would not hold a prompt's whole group is refused (one line, exit 2): it
    would compare a completion with itself alone. Training calls score groups of train.group_size under
    GROUPWISE_ALGORITHMS with no second sampling stage; Forced Rethinking rescores single completions, and
    eval.rewards score one greedy completion per prompt."""
    a, r = config.algorithm, config.rollout
    for name, fn in rewards.items():
        if not is_groupwise(fn):
            continue
        where = f"reward {name!r} is groupwise (it compares the completions of one prompt)"
        need(
            a.name in GROUPWISE_ALGORITHMS,
            "algorithm.name",
            f"{a.name}: {where}, but {a.name} also scores completions outside their groups; use "
            f"{' or '.join(GROUPWISE_ALGORITHMS)}, or a reward that scores each completion alone",
        )
        need(
            not r.two_stage,
            "rollout.schedule",
            f"{r.schedule}: {where}, but a second stage scores its extra "
            "rollouts apart from the first; set rollout.schedule=none",
        )
        need(
            r.rethink_fraction == 0,
            "rollout.rethink_fraction",
            f"{r.rethink_fraction}: {where}, but a rethought completion is rescored alone; set 0",
        )
    for name, fn in eval_rewards.items():
        need(
            not is_groupwise(fn),
            "eval.rewards",
            f"{name!r} is groupwise, but the held-out evaluation scores one greedy completion per prompt; judge "
            "held-out completions with a reward that scores each alone",
        )


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
    columns["completion_ids"] = rollout.token_lists()
    completions = rollout.texts
    expanded_prompts = [p for p in prompts for _ in range(group_size)]
    scores = {}
    for name, fn in rewards.items():
        try:
            values = call_text_reward(fn, expanded_prompts, completions, columns, group_size, step, max_new_tokens)
        except RewardTimeout as error:
            message = f"reward {name!r} {error} (iteration {step + 1}, first prompt {expanded_prompts[0][:60]!r})"
            if not drop_bad:
                raise RewardError(f"{message}; raise reward.timeout_s or fix the reward") from None
            print(f"warning: {message}; its {len(completions)} completions are dropped", file=sys.stderr, flush=True)
            scores[name] = torch.full((len(completions),), math.nan)  # [B*G] the whole batch dropped
            continue
        except GroupOutputError as error:
            raise RewardError(f"reward {name!r} {error} (iteration {step + 1})") from None
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
    engine: RolloutEngine | None = None,
) -> RoundSample:
    """Sample round `round_` of an iteration on the global prompts `rows`: this rank generates `group_size`
    completions (None: train.group_size) for its block of them (from `rollout_seed`, for an exact resume), and scores
    them; every reward's values are gathered over the round (a reward failure on any rank raises on all). Forced
    Rethinking (rollout.rethink_fraction > 0) of the finished ones: under rethink_style=continue before the scoring
    (`continue_after_trigger`), under vl_rethinker after it, from the first answers' correctness (`rethink_round`).
    `engine` (rollout.engine=vllm) generates instead of the policy itself, with `completion_seeds`. Adds to
    time/rollout, time/reward."""
    t, s, r = config.train, config.sampling, config.rollout
    G = group_size or t.group_size
    clock = time.perf_counter()
    block = run.block(len(rows))
    mine = rows[block.start : block.stop]
    torch.manual_seed(rollout_seed(t.seed, iteration, run.rank, round_))
    rethinking = r.rethink_fraction > 0
    counts = {"continued": 0, "eligible": 0, "kept": 0, "generated": 0}
    with run.unwrapped_for_generation(model) as policy:
        sampler = engine or HFEngine(policy, tokenizer)
        rollout = sampler.generate(
            [row["_ids"] for row in mine],
            G,
            s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            sampling_logprobs=True,  # the engine's, for the mismatch metrics and algorithm.rollout_correction
            seeds=None if engine is None else completion_seeds(t.seed, iteration, round_, block.start, len(mine), G),
        )
        generated = int(rollout.lengths.sum())  # this rank's tokens, EOS included
        if rethinking and r.rethink_style == "continue":
            rollout, continued, eligible, more = continue_after_trigger(
                sampler,
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
            counts = {"continued": continued, "eligible": eligible, "kept": continued, "generated": more}
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
    timings["time/reward"] += time.perf_counter() - clock
    if rethinking and r.rethink_style == "vl_rethinker":  # it needs every rank's first scores
        failure = run.first_failure(failure)
        if failure is not None:
            raise RewardError(failure)
        rollout, local, failure, counts = rethink_round(
            run,
            config,
            model,
            tokenizer,
            rewards,
            mine,
            block.start * G,
            rollout,
            local,
            G,
            iteration,
            round_,
            drop_bad,
            timings,
            engine,
        )
    clock = time.perf_counter()
    scores = gathered_scores(run, local, failure)  # name -> [n*G]
    timings["time/reward"] += time.perf_counter() - clock
    return RoundSample(
        rows,
        block,
        rollout,
        scores,
        rethought=counts["continued"],
        rethink_eligible=counts["eligible"],
        rethink_kept=counts["kept"],
        generated=generated + counts["generated"],
    )


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
    rethought: int = 0  # this rank's completions continued after a Forced Rethinking trigger
    rethink_eligible: int = 0  # this rank's completions Forced Rethinking could continue
    rethink_kept: int = 0  # this rank's continued completions that replaced their first one
    generated: int = 0  # this rank's tokens generated for the round, EOS included, rethinking's continuations too


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
    error past max_num_gen_batches), both measured on the embedded task (docs/llmalign.md):
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


def rollout_seed(seed: int, iteration: int, rank: int, round_: int) -> int:
    """The generation seed of a round on a rank: round 0 keeps the seed the trainer has always used (so drop and
    refill sample the same first round); later rounds have their own."""
    if round_ == 0:
        return seed * 1_000_003 + iteration + rank * RANK_SEED_STRIDE
    return derived_seed(seed, iteration, rank, round_, 1)


def completion_seeds(
    seed: int, iteration: int, round_: int, first_prompt: int, prompts: int, group_size: int
) -> list[int]:
    """One sampling seed per completion for an engine that takes them (rollout.engine=vllm): completion k of the
    round's global prompt p gets derived_seed(seed, iteration, round_, p, k, 5), prompt-major over this rank's
    prompts first_prompt .. first_prompt + prompts - 1. No rank in it, so the rollout is the same whatever the
    world size."""
    return [
        derived_seed(seed, iteration, round_, p, k, 5)
        for p in range(first_prompt, first_prompt + prompts)
        for k in range(group_size)
    ]


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
                None if r.sampling_logprobs is None else r.sampling_logprobs[part].cpu(),  # [G, C_round]
            )
    pieces = run.redistribute(held, chosen)
    rows = [rounds[round_].rows[group] for round_, group in chosen]
    block = run.block(len(rows))
    prompt_ids, prompt_mask = pad_left([row["_ids"] for row in rows[block.start : block.stop]], pad_id)  # [b, P]
    width = max(int(mask.sum(dim=1).max()) for _, mask, *_ in pieces)  # the longest chosen completion
    fit = lambda x, value: F.pad(x[:, :width], (0, width - min(x.shape[1], width)), value=value)  # [G, width]
    device = rounds[0].rollout.completion_ids.device
    logprobs = [piece[4] for piece in pieces]  # the engine's, [G, C_round] each, or None
    rollout = Rollout(
        prompt_ids.to(device),
        prompt_mask.to(device),
        torch.cat([fit(ids, pad_id) for ids, *_ in pieces]).to(device),  # [b*G, width]
        torch.cat([fit(mask, 0) for _, mask, *_ in pieces]).to(device),  # [b*G, width]
        torch.cat([truncated for _, _, truncated, *_ in pieces]).to(device),  # [b*G]
        [text for _, _, _, texts, _ in pieces for text in texts],
        None if any(lp is None for lp in logprobs) else torch.cat([fit(lp, 0.0) for lp in logprobs]).to(device),
    )
    scores = {
        name: torch.cat([rounds[round_].scores[name][group * G : (group + 1) * G] for round_, group in chosen])
        for name in rounds[0].scores
    }  # name -> [B*G]
    return RoundSample(rows, block, rollout, scores)


# ----------------------------------------------------------------------------- Forced Rethinking

# VL-Rethinker's training code, which rollout.rethink_style=vl_rethinker follows: github.com/TIGER-AI-Lab/VL-Rethinker
# at dd2c17d, openrlhf/trainer/ppo_utils/experience_maker.py, the data_version "force_append_wait" branch of the
# vLLM generation (its Forced Rethinking, Wang et al. 2025, arXiv:2504.08837, Sec. 3). Its four triggers, in order:
VL_RETHINKER_TRIGGERS = (
    "\n\nWait",
    "\n\nWait, does it seem right?",
    "\n\nWait, let's double check",
    "\n\nWait, there might be a mistake",
)
RETHINK_CUT_PROBABILITY = 0.5  # a continued rollout is first cut before its answer with this probability
RETHINK_SKIP_WRONG_ABOVE = 0.7  # a wrong rollout is not continued when its group's pass rate is above this
RETHINK_PER_PROMPT = 2  # at most this many rethought completions kept per prompt
RETHINK_MAX_WAITS = 4  # a kept continuation holds at most this many rethinking markers, its trigger's included


def cut_before_answer(text: str) -> int:
    """How many leading characters of a finished response VL-Rethinker keeps when it cuts the response back before
    its answer (half of the continued rollouts): the text before its last "Wait", then before its last "\\boxed",
    then before its first "answer" in any case, then before its last blank line ("\\n\\n") with trailing whitespace
    removed; each step only where its marker occurs. E.g. "Sum 3+4.\\n\\nSo 7. The answer is 7" -> "Sum 3+4." (8)."""
    kept = text
    for find in (
        lambda s: s.rfind("Wait"),
        lambda s: s.rfind("\\boxed"),
        lambda s: s.lower().find("answer"),
    ):
        at = find(kept)
        if at >= 0:
            kept = kept[:at]
    at = kept.rfind("\n\n")
    if at >= 0:
        kept = kept[:at].rstrip()
    return len(kept)


def token_prefix_length(tokenizer, ids: list[int], chars: int) -> int:
    """The most leading tokens of `ids` whose decoded text is at most `chars` characters long (binary search: the
    decoded length grows with the prefix). The cut is made on tokens so the kept head is what the policy sampled;
    VL-Rethinker cuts the text and has vLLM tokenize it again."""
    low, high = 0, len(ids)
    while low < high:
        middle = (low + high + 1) // 2
        if len(tokenizer.decode(ids[:middle])) <= chars:
            low = middle
        else:
            high = middle - 1
    return low


def vl_rethinker_trigger(correct: bool, u_style: float, u_pick: float) -> int:
    """The index into VL_RETHINKER_TRIGGERS of a continued rollout, from two uniform draws: when u_style < 1/2 one
    of the first two ("Wait" when u_pick < 0.4, else "Wait, does it seem right?"), otherwise by the first answer:
    "Wait, let's double check" when it was correct, "Wait, there might be a mistake" when wrong."""
    if u_style < 0.5:
        return 0 if u_pick < 0.4 else 1
    return 2 if correct else 3


def wait_count(continuation: str) -> int:
    """VL-Rethinker's count of rethinking markers in a rethought answer: 1 (its trigger's "Wait") + the
    continuation's "wait," + "wait a" + "alternatively", in lower case."""
    lower = continuation.lower()
    return 1 + lower.count("wait,") + lower.count("wait a") + lower.count("alternatively")


def rethink_eligible(
    lengths: Tensor, truncated: Tensor, correct: Tensor, group_size: int, room: Tensor, needed: int
) -> Tensor:
    """[n] bool: the rollouts Forced Rethinking may continue (VL-Rethinker's candidates): ended with EOS, `room`
    [n] tokens left for trigger + continuation of at least `needed`, and not a wrong answer in a group whose
    pass rate is above RETHINK_SKIP_WRONG_ABOVE. `lengths` [n] (EOS included), `truncated` [n], `correct` [n] bool
    of the first answers; groups are consecutive, of `group_size`."""
    rates = correct.double().reshape(-1, group_size).mean(dim=1).repeat_interleave(group_size)  # [n]
    skip_wrong = ~correct & (rates > RETHINK_SKIP_WRONG_ABOVE)  # [n]
    return ~truncated & (room >= needed) & ~skip_wrong  # [n]


def rethink_keep(
    prompts: list[int],
    correct: list[bool],
    lengths: list[int],
    finished: list[bool],
    waits: list[int],
    min_tokens: int,
) -> list[bool]:
    """Which rethought completions replace their first rollout, VL-Rethinker's rule over them in rollout order
    (each list holds one entry per continued rollout: its prompt, whether the rethought answer is correct, its
    continuation's length in tokens after the trigger and EOS included, whether that continuation ended with EOS
    within sampling.max_new_tokens, and its `wait_count`):

      1. length: finished, and longer than `min_tokens` tokens;     else dropped
      2. correct;                                                   else dropped
      3. fewer than RETHINK_PER_PROMPT kept so far for its prompt;  else dropped (this one then counts)
      4. at most RETHINK_MAX_WAITS rethinking markers;              else dropped, though it counted at 3,
         as in VL-Rethinker's code.

    Departure: VL-Rethinker keeps continuations of 31 to 1023 tokens under a 2048-token budget (its candidates
    are at most 1024 long); ours must finish within what sampling.max_new_tokens leaves, so no completion
    exceeds L_max (dr_grpo's denominator and the length rewards keep their meaning)."""
    kept, taken = [], {}
    for prompt, right, length, done, count in zip(prompts, correct, lengths, finished, waits):
        if not (done and length > min_tokens) or not right or taken.get(prompt, 0) >= RETHINK_PER_PROMPT:
            kept.append(False)
            continue
        taken[prompt] = taken.get(prompt, 0) + 1
        kept.append(count <= RETHINK_MAX_WAITS)
    return kept


@dataclasses.dataclass
class RethinkDraft:
    """The continued rollouts of one rank's round before the keep rule: `rows` index its rollout (ascending); each
    completion is its head (the first completion without EOS, cut or whole) + trigger + continuation, within
    sampling.max_new_tokens."""

    rows: list[int]
    completions: list[list[int]]  # token ids, EOS included when the continuation ended
    continuation_lengths: list[int]  # tokens after the trigger, EOS included
    finished: list[bool]  # the continuation ended with EOS within its budget
    continuation_texts: list[str]  # decoded, special tokens skipped
    triggers: list[int]  # index into the trigger list used
    eligible: int  # rollouts that could be continued
    generated: int  # tokens the continuation call generated (EOS included), kept or not
    logprobs: list[Tensor | None] | None = None  # the engine's log-probs of each completion (`rethought_logprobs`)


def continue_rollouts(
    policy,
    tokenizer,
    rollout: Rollout,
    group_size: int,
    rows: list[int],
    heads: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> tuple[list[list[int]], list[bool], int, list[Tensor] | None]:
    """Generation continued from prompt + head for each of `rows` (one `generate` call, seeded by `seed`; `policy` is the model or a rollout engine, which gets the seeds (seed, row)); each
    continuation is cut at its budget max_new_tokens - len(head). Returns the continuations (EOS included when it
    ended within the budget), whether each ended there, the tokens generated, and the engine's log-probs of each
    continuation's tokens ([len(tail)] each; None when the engine reports none)."""
    prefixes = []
    for row, head in zip(rows, heads):
        prompt = rollout.prompt_ids[row // group_size][rollout.prompt_mask[row // group_size].bool()].tolist()
        prefixes.append(prompt + head)
    budgets = [max_new_tokens - len(head) for head in heads]
    torch.manual_seed(seed)
    continued = as_engine(policy, tokenizer).generate(
        prefixes,
        1,
        max(budgets),
        temperature,
        top_p,
        seeds=[derived_seed(seed, row) for row in rows],
        sampling_logprobs=True,
    )
    tails, ended = [], []
    for k, budget in enumerate(budgets):
        tail = continued.completion_ids[k, : int(continued.lengths[k])].tolist()  # EOS included when it ended
        tails.append(tail[:budget])
        ended.append(bool(not continued.truncated[k]) and len(tail) <= budget)
    logprobs = None
    if continued.sampling_logprobs is not None:
        logprobs = [continued.sampling_logprobs[k, : len(tail)] for k, tail in enumerate(tails)]  # [len(tail)] each
    return tails, ended, int(continued.lengths.sum()), logprobs


def rethought_logprobs(rollout: Rollout, row: int, head: int, trigger: int, tail: Tensor | None) -> Tensor | None:
    """[head + trigger + len(tail)] the engine's log-probs of a continued completion: the first `head` tokens of
    `row`'s, NaN on the `trigger` tokens (appended, not sampled), then the continuation's `tail`; None when either
    sampling reported none."""
    if rollout.sampling_logprobs is None or tail is None:
        return None
    forced = torch.full((trigger,), math.nan, dtype=tail.dtype, device=tail.device)  # [trigger]
    return torch.cat([rollout.sampling_logprobs[row, :head].to(tail.device), forced, tail])


def with_rows_replaced(
    rollout: Rollout,
    tokenizer,
    replaced: dict[int, tuple[list[int], bool]],
    logprobs: dict[int, Tensor | None] | None = None,
) -> Rollout:
    """`rollout` with the completions of the rows in `replaced` (row -> (ids, truncated)) swapped, re-padded on the
    right to the longest. The engine's log-probs of a replaced row are `logprobs[row]` ([len(ids)]; missing or None:
    NaN, unknown)."""
    lengths = rollout.lengths.tolist()
    completions = [ids[:n] for ids, n in zip(rollout.completion_ids.tolist(), lengths)]
    truncated = rollout.truncated.clone()  # [n]
    texts = list(rollout.texts)
    for row, (ids, cut) in replaced.items():
        completions[row], truncated[row] = ids, cut
        texts[row] = tokenizer.decode(ids, skip_special_tokens=True)
    width = max(len(c) for c in completions)
    pad, device = tokenizer.pad_token_id, rollout.completion_ids.device
    ids = torch.tensor([c + [pad] * (width - len(c)) for c in completions], device=device)  # [n, width]
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions], device=device)  # [n, width]
    sampled = None
    if rollout.sampling_logprobs is not None:
        old = rollout.sampling_logprobs
        sampled = torch.zeros(len(completions), width, dtype=old.dtype, device=device)  # [n, width]
        sampled[:, : min(width, old.shape[1])] = old[:, :width]
        for row, (row_ids, _) in replaced.items():
            values = (logprobs or {}).get(row)
            sampled[row] = 0.0
            sampled[row, : len(row_ids)] = math.nan if values is None else values.to(device)
    return Rollout(rollout.prompt_ids, rollout.prompt_mask, ids, mask, truncated, texts, sampled)


def forced_rethinking(
    policy,
    tokenizer,
    rollout: Rollout,
    correct: Tensor,
    group_size: int,
    fraction: float,
    min_tokens: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> RethinkDraft:
    """Forced Rethinking as VL-Rethinker's code does it (Wang et al. 2025, arXiv:2504.08837, Sec. 3; the code at
    VL_RETHINKER_TRIGGERS' comment), up to the keep rule (`rethink_keep`, applied once the continuations are scored):

    - candidates (`rethink_eligible`): first rollouts that ended with EOS, leave room for the longest trigger and
      more than `min_tokens` continuation tokens, and are not wrong answers (`correct` [n], algorithm.correct_reward
      over algorithm.correct_threshold) of a group with pass rate above 0.7;
    - round(fraction * candidates) of them are continued, drawn by a generator from `seed` (a resumed run draws the
      same). Departure: VL-Rethinker continues each candidate with probability 0.65; a fixed fraction has the same
      expectation and a count the logs can check;
    - each continued rollout, EOS dropped, is first cut before its answer with probability 1/2 (`cut_before_answer`,
      on tokens: `token_prefix_length`), then gets the trigger `vl_rethinker_trigger` picks, and generation
      continues from prompt + head + trigger with the tokens max_new_tokens leaves.

    Departure: the continuation samples at sampling.temperature (VL-Rethinker's code sets 0.9 for it, its first
    round at the script's 1.0), so every trained token comes from the distribution the update's temperature-scaled
    log-probs describe."""
    triggers = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in VL_RETHINKER_TRIGGERS]
    lengths = rollout.lengths  # [n] EOS included
    room = max_new_tokens - (lengths - 1)  # [n] tokens left after the first completion without its EOS
    needed = max(len(t) for t in triggers) + min_tokens + 1
    candidates = rethink_eligible(lengths.cpu(), rollout.truncated.cpu(), correct.cpu(), group_size, room.cpu(), needed)
    eligible = torch.nonzero(candidates).flatten()  # [e]
    count = math.floor(fraction * len(eligible) + 0.5)
    if count == 0:
        return RethinkDraft([], [], [], [], [], [], len(eligible), 0)
    generator = torch.Generator().manual_seed(seed)
    rows = eligible[torch.randperm(len(eligible), generator=generator)[:count]].sort().values.tolist()
    draws = torch.rand(len(rows), 3, generator=generator, dtype=torch.float64).tolist()  # cut, style, pick
    heads, picked, kept_heads = [], [], []
    for row, (u_cut, u_style, u_pick) in zip(rows, draws):
        head = rollout.completion_ids[row, : int(lengths[row]) - 1].tolist()  # without its EOS
        if u_cut < RETHINK_CUT_PROBABILITY:
            head = head[: token_prefix_length(tokenizer, head, cut_before_answer(tokenizer.decode(head)))]
        picked.append(vl_rethinker_trigger(bool(correct[row]), u_style, u_pick))
        kept_heads.append(len(head))
        heads.append(head + triggers[picked[-1]])
    tails, finished, generated, tail_logprobs = continue_rollouts(
        policy, tokenizer, rollout, group_size, rows, heads, max_new_tokens, temperature, top_p, derived_seed(seed, 1)
    )
    logprobs = [
        rethought_logprobs(rollout, row, kept, len(triggers[pick]), tail)
        for row, kept, pick, tail in zip(rows, kept_heads, picked, tail_logprobs or [None] * len(rows))
    ]
    return RethinkDraft(
        rows,
        [head + tail for head, tail in zip(heads, tails)],
        [len(tail) for tail in tails],
        finished,
        tokenizer.batch_decode(tails, skip_special_tokens=True),
        picked,
        len(eligible),
        generated,
        logprobs,
    )


def continue_after_trigger(
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
) -> tuple[Rollout, int, int, int]:
    """rollout.rethink_style=continue (issue 16's Forced Rethinking, before the rollouts are scored): a fraction of
    the finished rollouts get `trigger` appended and generation continues from prompt + completion + trigger; the
    completion becomes completion (EOS dropped) + trigger + continuation, which is what is scored and trained,
    whether right or wrong (so it serves rewards without a correctness check).

    Eligible: completions that ended with EOS and leave room for the trigger and at least one more token within
    max_new_tokens (the continuation's budget is what is left, so no completion exceeds L_max). round(fraction *
    eligible) of them, drawn by a generator from `seed` (a resumed run draws the same), are continued in one
    `generate` call; a continuation cut at its budget without EOS is truncated. Departures from VL-Rethinker (see
    `forced_rethinking`, the default style): no cut before the answer, one fixed trigger, no keep rule. Returns
    (rollout, continued, eligible, tokens generated by the continuation call)."""
    trigger_ids = tokenizer(trigger, add_special_tokens=False)["input_ids"]
    lengths = rollout.lengths  # [n] EOS included
    room = max_new_tokens - (lengths - 1) - len(trigger_ids)  # [n] tokens left for the continuation
    eligible = torch.nonzero(~rollout.truncated & (room >= 1)).flatten().cpu()  # [e]
    count = math.floor(fraction * len(eligible) + 0.5)
    if count == 0:
        return rollout, 0, len(eligible), 0
    generator = torch.Generator().manual_seed(seed)
    rows = eligible[torch.randperm(len(eligible), generator=generator)[:count]].sort().values.tolist()
    heads = [rollout.completion_ids[row, : int(lengths[row]) - 1].tolist() + trigger_ids for row in rows]
    tails, ended, generated, tail_logprobs = continue_rollouts(
        policy, tokenizer, rollout, group_size, rows, heads, max_new_tokens, temperature, top_p, derived_seed(seed, 1)
    )
    replaced = {row: (head + tail, not done) for row, head, tail, done in zip(rows, heads, tails, ended)}
    logprobs = {
        row: rethought_logprobs(rollout, row, int(lengths[row]) - 1, len(trigger_ids), tail)
        for row, tail in zip(rows, tail_logprobs or [None] * len(rows))
    }
    return with_rows_replaced(rollout, tokenizer, replaced, logprobs), count, len(eligible), generated


def rethink_round(
    run: Run,
    config: GRPOConfig,
    model,
    tokenizer,
    rewards: dict,
    mine: list[dict],
    first_index: int,
    rollout: Rollout,
    local: dict[str, Tensor],
    group_size: int,
    iteration: int,
    round_: int,
    drop_bad: bool,
    timings: dict[str, float],
    engine: RolloutEngine | None = None,
) -> tuple[Rollout, dict[str, Tensor], str | None, dict[str, int]]:
    """rollout.rethink_style=vl_rethinker on this rank's scored round (`mine`: its rows; `rollout`: their
    completions; `local`: their scores [b*G]): `forced_rethinking` from the first answers' correctness, the
    continued completions scored (each reward call gets them as groups of 1), and those `rethink_keep` keeps
    replace their completion and scores. Every rank calls it (it enters the generation context). Returns the
    rollout, the local scores, a reward failure (or None) and the counts (continued, eligible, kept, generated)."""
    t, s, r, a = config.train, config.sampling, config.rollout, config.algorithm
    G = group_size
    clock = time.perf_counter()
    correct = local[a.correct_reward].nan_to_num(0.0) > a.correct_threshold  # [b*G] a dropped score: wrong
    with run.unwrapped_for_generation(model) as policy:
        draft = forced_rethinking(
            engine or policy,
            tokenizer,
            rollout,
            correct,
            G,
            r.rethink_fraction,
            r.rethink_min_tokens,
            s.max_new_tokens,
            s.temperature,
            s.top_p,
            derived_seed(t.seed, iteration, run.rank, round_, 4),
        )
    timings["time/rollout"] += time.perf_counter() - clock
    counts = {"continued": len(draft.rows), "eligible": draft.eligible, "kept": 0, "generated": draft.generated}
    if not draft.rows:
        return rollout, local, None, counts
    clock = time.perf_counter()
    groups = [row // G for row in draft.rows]
    width = max(len(c) for c in draft.completions)
    pad, device = tokenizer.pad_token_id, rollout.completion_ids.device
    drafted = Rollout(
        rollout.prompt_ids[groups],
        rollout.prompt_mask[groups],
        torch.tensor([c + [pad] * (width - len(c)) for c in draft.completions], device=device),  # [k, width]
        torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in draft.completions], device=device),  # [k, width]
        torch.tensor([not done for done in draft.finished], device=device),  # [k]
        tokenizer.batch_decode(draft.completions, skip_special_tokens=True),
    )
    failure = None
    try:
        rescored = score(
            rewards,
            [mine[g]["_text"] for g in groups],
            drafted,
            [{k: v for k, v in mine[g].items() if not k.startswith("_")} for g in groups],
            1,
            iteration,
            s.max_new_tokens,
            drop_bad,
            first_index=first_index,  # an error names a rethought completion by its place in this call
        )
    except RewardError as error:
        failure = str(error)
    timings["time/reward"] += time.perf_counter() - clock
    if failure is not None:
        return rollout, local, failure, counts
    right = (rescored[a.correct_reward].nan_to_num(0.0) > a.correct_threshold).tolist()  # [k]
    waits = [wait_count(text) for text in draft.continuation_texts]
    keep = rethink_keep(groups, right, draft.continuation_lengths, draft.finished, waits, r.rethink_min_tokens)
    kept = [k for k, flag in enumerate(keep) if flag]
    counts["kept"] = len(kept)
    if not kept:
        return rollout, local, None, counts
    rollout = with_rows_replaced(
        rollout,
        tokenizer,
        {draft.rows[k]: (draft.completions[k], False) for k in kept},
        {draft.rows[k]: draft.logprobs[k] for k in kept} if draft.logprobs is not None else None,
    )
    rows, taken = torch.tensor([draft.rows[k] for k in kept]), torch.tensor(kept)
    local = {name: values.clone().index_put_((rows,), rescored[name][taken]) for name, values in local.items()}
    return rollout, local, None, counts


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
    engine: RolloutEngine | None = None,
) -> RoundSample:
    """The batch with each prompt's `extra[g]` second-stage rollouts joined to its group: this rank generates its
    block's (one `generate` row per extra rollout, from a seed of (seed, iteration, rank)) and scores them (each
    reward call gets them as groups of 1); the scores are gathered (ranks hold unequal numbers). Every group is
    then its first-stage completions followed by its extra ones; `sizes` holds the group sizes. With `engine`
    (rollout.engine=vllm), extra rollout k of global group g is seeded by (seed, iteration, 3, g, k): no rank in it."""
    t, s = config.train, config.sampling
    G = len(batch.scores[next(iter(batch.scores))]) // len(batch.rows)  # the first stage's group size
    block, first = batch.block, batch.rollout
    local = [g for g in block for _ in range(extra[g])]  # the global group of each extra rollout of this rank
    scores_local, failure, rollout = None, None, None
    if local:
        clock = time.perf_counter()
        torch.manual_seed(derived_seed(t.seed, iteration, run.rank, 3))
        seeds = [derived_seed(t.seed, iteration, 3, g, k) for g in block for k in range(extra[g])]
        with run.unwrapped_for_generation(model) as policy:
            rollout = (engine or HFEngine(policy, tokenizer)).generate(
                [batch.rows[g]["_ids"] for g in local],
                1,
                s.max_new_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                sampling_logprobs=True,
                seeds=None if engine is None else seeds,
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
    logprobs = None
    if first.sampling_logprobs is not None and rollout.sampling_logprobs is not None:
        logprobs = torch.cat([fit(first.sampling_logprobs, 0.0), fit(rollout.sampling_logprobs, 0.0)])[order_t]
    merged = Rollout(
        first.prompt_ids,
        first.prompt_mask,
        torch.cat([ids, more_ids])[order_t],  # [sum(local sizes), width]
        torch.cat([mask, more_mask])[order_t],  # [sum(local sizes), width]
        torch.cat([first.truncated, rollout.truncated])[order_t],  # [sum(local sizes)]
        texts,
        logprobs,  # [sum(local sizes), width] or None
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

    A replayed sample trains with its stored advantages (from the batch it was sampled in) and the current policy's
    old log-probs, like every row (recomputed by the update, or its forward detached; llmalign.grpo.update): its
    ratio starts at 1, so the clip bounds
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
    logprobs = None
    if rollout.sampling_logprobs is not None:  # a replayed sample was drawn by an earlier policy: unknown, NaN
        unknown = torch.full((len(drawn), width), math.nan, dtype=rollout.sampling_logprobs.dtype, device=device)
        logprobs = torch.cat([F.pad(rollout.sampling_logprobs, (0, grow)), unknown])  # [n+k, width]
    replayed = Rollout(
        prompt_ids.to(device),
        prompt_mask.to(device),
        torch.cat([ids, more_ids]),
        torch.cat([mask, more_mask]),
        torch.cat([rollout.truncated, torch.stack([e["truncated"] for e in drawn]).to(device)]),
        list(rollout.texts) + ["<replayed>"] * len(drawn),
        logprobs,
    )
    return replayed, torch.cat([F.pad(token_advantages, (0, grow)), more_advantages])  # [n+k, width]


# ----------------------------------------------------------------------------- the stage


@dataclasses.dataclass
class IterationRollout:
    """What the rollout stage of an iteration hands to the advantage stage: the trained batch and how it was made."""

    iteration: int
    batch: RoundSample  # global rows, this rank's block and rollout, every reward's global scores, group sizes
    sizes: list[int]  # [B] global group sizes (all the first stage's G0 without a second stage)
    first_size: int  # G0, completions per prompt of the first stage
    plan: RefillPlan  # the rounds sampled and the groups chosen
    generated: int  # completion tokens generated this iteration on all ranks, EOS included
    timings: dict[str, float]  # time/rollout, time/reward (time/update added by the update stage)
    staged: dict  # the second stage's statistics, logged (empty without one)
    rethink: dict  # train/rethought, train/rethink_eligible, train/rethink_kept over all ranks (empty without it)


def sample_iteration(
    run: Run,
    config: GRPOConfig,
    model,
    tokenizer,
    rewards: dict,
    train_rows: list[dict],
    iteration: int,
    engine: RolloutEngine | None = None,
) -> IterationRollout:
    """The rollout stage: one round of B prompts, or more under refill (`refill`), each rank sampling its block of
    whole groups and every reward's values gathered; then each rank's block of the chosen groups (`assemble_batch`),
    and the second stage when rollout.schedule asks for one (`staged_batch`). Every generation goes to `engine`
    when given (rollout.engine=vllm, its weights already the policy's), else to the policy's `generate`.

    The batch's rollout carries the engine's token log-probs (`Rollout.sampling_logprobs`) through refill and the second
    stage; Forced Rethinking's replaced completions (triggers not sampled) and replayed samples leave it None."""
    t, a, r = config.train, config.algorithm, config.rollout
    drop_bad = config.reward.on_bad_score == "drop"
    G0 = r.first_stage_size(t.group_size)  # rollouts per prompt of the first stage
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
            sample_round(run, config, model, tokenizer, rewards, rows, iteration, round_, drop_bad, timings, G0, engine)
        )
        return informative_groups(rounds[-1].scores, config.reward.weights, G0)  # [count]

    plan = refill(sample, t.prompts_per_iteration, a.refill_rounds, multiple=run.world)
    generated = sum(one.generated for one in rounds)  # this rank's tokens, every round
    batch = assemble_batch(run, rounds, plan.chosen, G0, tokenizer.pad_token_id)
    staged = {}
    if r.two_stage:
        first_stage_tokens = int(batch.rollout.lengths.sum())  # this rank's, redistributed under refill
        batch, staged = staged_batch(run, config, model, tokenizer, rewards, batch, iteration, timings, G0, engine)
        generated += int(batch.rollout.lengths.sum()) - first_stage_tokens  # its second-stage tokens
    generated = int(run.sum(generated))  # all ranks
    if a.filter_zero_std == "refill" and plan.informative < t.prompts_per_iteration:
        run.print(
            f"iteration {iteration + 1}: refill found {plan.informative} informative groups of "
            f"{t.prompts_per_iteration} in {plan.rounds} more round(s) (algorithm.max_refill_rounds); "
            f"training on those"
        )
    rethink = {}
    if r.rethink_fraction > 0:  # over the iteration's first-stage rounds, all ranks
        rethink["train/rethought"] = int(run.sum(sum(one.rethought for one in rounds)))
        rethink["train/rethink_eligible"] = int(run.sum(sum(one.rethink_eligible for one in rounds)))
        rethink["train/rethink_kept"] = int(run.sum(sum(one.rethink_kept for one in rounds)))
    sizes = batch.sizes or [t.group_size] * len(batch.rows)  # [B] global group sizes
    return IterationRollout(iteration, batch, sizes, G0, plan, generated, timings, staged, rethink)


def staged_batch(
    run: Run,
    config: GRPOConfig,
    model,
    tokenizer,
    rewards: dict,
    batch: RoundSample,
    iteration: int,
    timings: dict[str, float],
    G0: int,
    engine: RolloutEngine | None = None,
) -> tuple[RoundSample, dict]:
    """DARS / GVM: more rollouts on the batch's own prompts (`second_stage`), their counts decided from gathered
    statistics (`second_stage_counts`); returns the batch and the statistics logged."""
    a, r, s = config.algorithm, config.rollout, config.sampling
    drop_bad = config.reward.on_bad_score == "drop"
    rates = pass_rates(batch.scores, [G0] * len(batch.rows), a.correct_reward, a.correct_threshold)  # [B]
    grad_norms, staged = None, {}
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
                config.memory.micro_batch_size,
            )  # [b]
        grad_norms = run.gather(local_norms.to(run.device)).cpu()  # [B] float64
        staged["rollout/grad_norms"] = grad_norms.tolist()
    extra = second_stage_counts(config, rates, grad_norms).tolist()  # [B]
    staged.update({"rollout/pass_rates": rates.tolist(), "rollout/extra": extra})
    batch = second_stage(run, config, model, tokenizer, rewards, batch, extra, iteration, drop_bad, timings, engine)
    return batch, staged

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
"""

from __future__ import annotations

import math
import random
import sys
import time

import torch
from torch import Tensor
from tqdm.auto import tqdm

from shared.reward_calls import RewardError, RewardTimeout, scores_as_floats, with_deadline
from llmalign.config import GRPOConfig
from llmalign.data import iteration_rows, load_train_test, micro_batches, render_prompt, tokenize_prompts
from llmalign.evaluate import Rollout, describe_held_out, generate, held_out_metrics
from llmalign.logprobs import completion_logprobs
from llmalign.policy import (
    enable_gradient_checkpointing,
    load_policy,
    reference_policy,
    restore_policy,
    save_policy_checkpoint,
)
from llmalign.rewards import build_reward
from llmalign.toy import resolve_embedded
from shared.advantages import compose_rewards
from shared.config import ConfigError
from shared.disco import disco_kl_sum, disco_loss
from shared.filtering import zero_variance_group_mask
from shared.kl import kl_k3
from shared.losses import LOSS_AGGREGATIONS, aggregation_denominator, clipped_policy_loss
from shared.ratio_check import METRIC as RATIO_METRIC
from shared.ratio_check import FirstUpdateRatioCheck, ratio_deviation
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


def gathered_scores(run: Run, local: dict[str, Tensor] | None, failure: str | None) -> dict[str, Tensor]:
    """Every reward's [B*G] values over the global rollout (rank order is rollout order), or the RewardError of
    the first rank whose rewards failed, raised on every rank together."""
    failure = run.first_failure(failure)
    if failure is not None:
        raise RewardError(failure)
    return {name: run.gather(values) for name, values in local.items()}


# ----------------------------------------------------------------------------- update


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
    (`step_normalisers`): a clipped loss is normalised as its own batch and weighted by its denominator over the
    step's; DisCO's questions, tokens and batch KL go to `disco_loss`, which returns its share itself."""
    a = config.algorithm
    if a.loss == "disco":
        loss, metrics = disco_loss(
            logp,
            old,
            mask,
            correct,
            group_ids,
            score=a.disco_score,
            tau=a.disco_tau,
            delta=a.disco_delta,
            penalty=a.disco_penalty,
            questions=step["questions"],
            kl_tokens=step["tokens"],
            batch_kl=step["kl"],
        )
        weight = 1.0
    else:
        loss, metrics = clipped_policy_loss(
            logp,
            old,
            advantages,
            mask,
            eps_low=a.clip_range,
            eps_high=a.effective_clip_range_high,
            aggregation=a.loss,
            max_length=config.sampling.max_new_tokens,
        )
        weight = aggregation_denominator(a.loss, mask) / step["denominator"]
        loss = loss * weight
    if ref is not None:  # k3 per token, aggregated like the policy loss (the aggregations are linear)
        kl = torch.where(mask.bool(), kl_k3(logp, ref), torch.zeros_like(logp))  # [n, C]
        if a.loss == "disco":  # a token mean over the step, like the trust region
            loss = loss + a.kl_beta * kl.sum() / max(step["tokens"], 1.0)
        else:
            loss = loss + a.kl_beta * weight * LOSS_AGGREGATIONS[a.loss](
                kl, mask.bool(), config.sampling.max_new_tokens
            )
        metrics["kl"] = float(kl.detach().sum() / mask.sum().clamp(min=1))
    return loss, metrics


def step_normalisers(run: Run, config: GRPOConfig, mask: Tensor, part: list[int]) -> dict:
    """The global normalisers of the optimizer step on rows `part` (sums over ranks): a clipped loss's denominator
    (shared.losses.aggregation_denominator: rows for grpo and dr_grpo, tokens for dapo); for DisCO the questions
    (groups with a kept completion) and the kept tokens, with "kl", the step's trust-region KL, 0 until
    `trust_region_kl` sets it."""
    a, G = config.algorithm, config.train.group_size
    if a.loss != "disco":
        return {"denominator": max(float(run.sum(aggregation_denominator(a.loss, mask[part]))), 1.0)}
    step_mask = mask[part]  # [p, C]
    questions = int(step_mask.reshape(-1, G * step_mask.shape[1]).any(dim=1).sum())  # parts hold whole groups
    return {"questions": float(run.sum(questions)), "tokens": float(run.sum(float(step_mask.sum()))), "kl": 0.0}


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
) -> dict:
    """num_iterations passes over this rank's rows of the rollout, each updates_per_pass optimizer steps.

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
    mask = rollout.completion_mask * keep[:, None]  # [n, C] dropped samples/groups train on nothing
    group_ids = torch.arange(len(keep), device=mask.device) // G  # [n] groups never straddle ranks
    first_row = run.rank * len(keep)  # this rank's rows in the global rollout, for messages
    logp_of = lambda m, rows: policy_logprobs(m, rollout, rows, G, a.shared_prefix, s.temperature)  # [m, C]
    with torch.no_grad():
        chunks = micro_batches(list(range(len(keep))), t.micro_batch_size)
        model.eval()  # the rollout's mode: a train-mode difference (dropout) shows in the first update's ratio
        old = torch.cat([logp_of(model, c) for c in chunks])  # [n, C]
        ref = None
        if a.kl_beta > 0:
            with reference() as ref_model:
                ref = torch.cat([logp_of(ref_model if ref_model is not None else model, c) for c in chunks])  # [n, C]
    totals: dict[str, list[float]] = {}
    params = [p for p in model.parameters() if p.requires_grad]
    first_step_deviation = torch.zeros((), dtype=torch.float64)
    model.train()
    for pass_index in range(t.num_iterations):
        for part_index, part in enumerate(update_parts(len(keep), t.updates_per_pass, G if a.whole_groups else 1)):
            first_step = pass_index == 0 and part_index == 0
            micro = micro_batches(part, t.micro_batch_size)
            step = step_normalisers(run, config, mask, part)
            hinge_needs_kl = a.loss == "disco" and a.disco_penalty > 0
            if hinge_needs_kl and len(micro) > 1:  # a no-grad pass over the step, in the update's mode
                with torch.no_grad():
                    local = sum(float(disco_kl_sum(logp_of(model, rows), old[rows], mask[rows])) for rows in micro)
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
                    if hinge_needs_kl and len(micro) == 1:  # the step's KL from this forward itself
                        local = float(disco_kl_sum(logp.detach(), old[rows], mask[rows]))
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
                    run.backward(loss)
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
    units = t.prompts_per_iteration // run.world * (1 if a.whole_groups else t.group_size)
    if units % t.updates_per_pass:
        what = "groups" if a.whole_groups else "completions"
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
    for row, text, ids in zip(train_rows, texts, prompt_ids):
        row["_text"], row["_ids"] = text, ids
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
                f"{describe_held_out(before, s.temperature, d.eval_samples)}"
            )

    drop_bad = config.reward.on_bad_score == "drop"
    ratio_check = FirstUpdateRatioCheck()  # warns once per run (per resumed run) about on-policy ratio != 1
    progress = tqdm(
        range(start, t.iterations), desc=f"grpo[{a.loss}]", initial=start, total=t.iterations, disable=not run.is_main
    )
    record = {}
    for iteration in progress:
        timings = {}

        # rollout: this rank's block of whole groups
        clock = time.perf_counter()
        rows = iteration_rows(train_rows, iteration, t.prompts_per_iteration, t.seed)  # the global batch
        block = run.block(len(rows))
        mine = rows[block.start : block.stop]
        torch.manual_seed(t.seed * 1_000_003 + iteration + run.rank * RANK_SEED_STRIDE)  # exact resume
        with run.unwrapped_for_generation(model) as policy:
            rollout = generate(
                policy,
                tokenizer,
                [row["_ids"] for row in mine],
                t.group_size,
                s.max_new_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
            )
        timings["time/rollout"] = time.perf_counter() - clock

        # reward: this rank's completions, every reward's values gathered over the global rollout
        clock = time.perf_counter()
        columns = [{k: v for k, v in row.items() if not k.startswith("_")} for row in mine]
        local, failure = None, None
        try:
            local = score(
                rewards,
                [row["_text"] for row in mine],
                rollout,
                columns,
                t.group_size,
                iteration,
                s.max_new_tokens,
                drop_bad,
                first_index=block.start * t.group_size,
            )
        except RewardError as error:
            failure = str(error)
        scores = gathered_scores(run, local, failure)  # name -> [B*G]
        bad = torch.stack(list(scores.values())).isnan().any(dim=0)  # [B*G]
        timings["time/reward"] = time.perf_counter() - clock

        # advantage on the global batch (and what takes part: dropped samples, zero-variance groups, truncated
        # completions); this rank keeps its own rows
        group_ids = torch.arange(len(bad)) // t.group_size  # [B*G]
        advantages, reward_stats = compose_rewards(
            scores, config.reward.weights, group_ids, scale=a.scale, nan_policy="mask" if drop_bad else "raise"
        )
        total = sum(config.reward.weights[n] * scores[n].nan_to_num(0.0) for n in scores)  # [B*G]
        truncated = run.gather(rollout.truncated)  # [B*G]
        keep = ~bad  # [B*G]
        zero_std_keep, zero_std_fraction = zero_variance_group_mask(total, group_ids)
        if a.filter_zero_std:
            keep &= zero_std_keep
        if a.mask_overlong:
            keep &= ~truncated.cpu()
        correct = torch.zeros_like(bad)  # [B*G] DisCO's o+ / o-: its named reward above the threshold
        if a.loss == "disco":  # the config refuses a correct_reward that is not a configured reward
            correct = scores[a.correct_reward].nan_to_num(0.0) > a.correct_threshold  # [B*G]
        own = slice(block.start * t.group_size, block.stop * t.group_size)
        on_device = lambda x: x[own].to(run.device)  # [n] this rank's rows

        # update
        clock = time.perf_counter()
        try:
            metrics = update(
                run,
                config,
                model,
                optimizer,
                reference,
                rollout,
                on_device(advantages.masked_fill(bad, 0.0)),
                on_device(keep),
                on_device(correct),
            )
        except FloatingPointError as error:
            raise run.nan_stop(f"iteration {iteration + 1}", error) from None
        timings["time/update"] = time.perf_counter() - clock
        first_update_deviation = metrics.pop(RATIO_METRIC)  # logged under its own name, not as train/...
        warning = ratio_check.warning(first_update_deviation, f"iteration {iteration + 1}")
        if warning is not None:
            run.print(warning)
        lengths = run.gather(rollout.lengths).float()  # [B*G]

        # log
        done = iteration + 1
        record = {
            "iteration": done,
            **{f"reward/{k}": v for k, v in reward_stats.items()},
            **{f"train/{k}": v for k, v in metrics.items()},
            RATIO_METRIC: first_update_deviation,
            "train/zero_std_groups": zero_std_fraction,
            "train/dropped": int(bad.sum()),
            "train/kept": float(keep.float().mean()),
            "completion/mean_length": float(lengths.mean()),
            "completion/truncated": float(truncated.float().mean()),
            "tokens_per_second": float(lengths.sum()) / max(sum(timings.values()), 1e-9),
            **timings,
        }
        record.update(
            {f"reward/{n}/budget": fn.budget(iteration) for n, fn in rewards.items() if hasattr(fn, "budget")}
        )
        last = run.is_last(done, t.iterations, t.max_seconds)
        if run.due(done, config.log.eval_every, last):
            record.update(evaluate(done))
        run.append(record)
        sample = {
            "iteration": done,
            "prompt": rows[0]["_text"],
            "completions": rollout.texts[: t.group_size],
            "rewards": {n: v[: t.group_size].tolist() for n, v in scores.items()},
        }
        run.append(sample, name="samples.jsonl")  # the first group of each iteration (the main process's), to read
        run.log_table("samples", *completions_table(sample), step=done)  # and as a table, where a tracker takes one
        progress.set_postfix(
            reward=f"{reward_stats['total/mean']:.3f}",
            length=f"{record['completion/mean_length']:.1f}",
            **(
                {"clip": f"{metrics['clip_frac']:.2f}"}
                if "clip_frac" in metrics
                # DisCO: no clip
                else {"kl": f"{metrics.get('trust_region_kl', 0):.1e}"}
            ),
        )

        # checkpoint
        if run.due(done, config.log.checkpoint_every, last):
            save_policy_checkpoint(run, config, model, tokenizer, optimizer, done)
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
            run.print(f"held-out accuracy {label}: {describe_held_out(result, s.temperature, d.eval_samples)}")
    run.print(f"metrics {out / 'metrics.jsonl'}, curves {out / 'reward_curve.png'}, model {out / 'final'}")
    run.close()
    return {"before": before, "after": after}

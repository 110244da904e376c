"""GRPO for text reasoning on any transformers causal LM (grpo, dr_grpo, dapo, disco losses).

    llmalign grpo --config configs/llm/arith.yaml                       # embedded default
    llmalign grpo --config configs/llm/arith.yaml train.iterations=5 algorithm.loss=dapo
    llmalign grpo --config configs/llm/arith.yaml --resume              # continue the run
    accelerate launch -m llmalign grpo --config ...                     # several processes

Each iteration: rollout (B prompts x G completions with `generate`), reward (the configured
functions, TRL's signature), advantage (shared.advantages), update (num_iterations passes, each
split into updates_per_pass optimizer steps of micro-batches), log, checkpoint.
"""

from __future__ import annotations

import copy
import contextlib
import json
import math
import random
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from llmalign.config import GRPOConfig, LMModelConfig
from llmalign.data import load_rows, render_prompt, tokenize_prompts
from llmalign.evaluate import Rollout, describe_held_out, generate, held_out_metrics
from llmalign.logprobs import completion_logprobs
from llmalign.rewards import build_reward
from llmalign.toy import resolve_embedded
from shared.advantages import compose_rewards
from shared.checkpoint import (latest_checkpoint, load_state, load_trainable_state, open_output_dir, rng_state,
                               save_checkpoint, set_rng_state, trainable_state)
from shared.config import to_dict
from shared.disco import disco_loss
from shared.filtering import zero_variance_group_mask
from shared.kl import kl_k3
from shared.losses import LOSS_AGGREGATIONS, aggregation_denominator, clipped_policy_loss
from shared.runlog import append_metrics, plot_curves, truncate_metrics


class RewardError(RuntimeError):
    """A reward function failed or returned unusable scores; the message names it and the batch."""


# ----------------------------------------------------------------------------- setup


def load_policy(config: LMModelConfig, device: torch.device | str = "cpu"):
    """(model, tokenizer) from a directory or hub id, with a LoRA adapter when config.lora."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_embedded(config.path)
    remote = {"trust_remote_code": True} if config.allow_remote_code else {}  # off unless the config says so
    tokenizer = AutoTokenizer.from_pretrained(path, **remote)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked everywhere; any id will do
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, config.dtype), **remote).to(device)
    if config.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=config.lora_targets,
                          task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lora)
        except ValueError as error:
            raise ValueError(f"model.lora_targets {config.lora_targets}: {error}") from None
    return model, tokenizer


def reference_policy(model, lora: bool):
    """A context manager factory giving the KL reference: the base model under a disabled LoRA
    adapter (no extra memory), or a frozen copy of the initial weights for full fine-tuning."""
    if lora:
        return model.disable_adapter
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    return lambda: contextlib.nullcontext(frozen)


def resume_training(checkpoint: Path | None, out: Path, model, optimizer) -> int:
    """Load `checkpoint` (trainable weights, optimizer, RNG), trim metrics.jsonl back to it and return
    its step; 0 when there is none yet."""
    if checkpoint is None:
        print(f"[llmalign] --resume: no checkpoint in {out / 'checkpoints'}, starting fresh")
        return 0
    load_trainable_state(model, load_state(checkpoint, "trainable"))
    optimizer.load_state_dict(load_state(checkpoint, "optimizer"))
    set_rng_state(load_state(checkpoint, "rng"))
    start = load_state(checkpoint, "trainer")["iteration"]
    truncate_metrics(out / "metrics.jsonl", start)
    print(f"[llmalign] resumed from {checkpoint} at step {start}")
    return start


def iteration_rows(rows: list[dict], iteration: int, count: int, seed: int) -> list[dict]:
    """The prompts of an iteration: epochs of a seeded permutation, so the data position is a
    function of the iteration alone (resume needs nothing else)."""
    picked = []
    for k in range(iteration * count, (iteration + 1) * count):
        epoch, index = divmod(k, len(rows))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        picked.append(rows[int(order[index])])
    return picked


# ----------------------------------------------------------------------------- reward


def score(rewards: dict, prompts: list[str], rollout: Rollout, rows: list[dict], group_size: int, step: int,
          max_new_tokens: int, drop_bad: bool) -> dict[str, Tensor]:
    """name -> [B*G] scores; None/NaN/inf become NaN when drop_bad, else raise RewardError."""
    columns = {key: [row[key] for row in rows for _ in range(group_size)] for key in rows[0] if key != "prompt"}
    completions = rollout.texts
    expanded_prompts = [p for p in prompts for _ in range(group_size)]
    scores = {}
    for name, fn in rewards.items():
        try:
            values = fn(expanded_prompts, completions, completion_ids=rollout.token_lists(), group_size=group_size,
                        step=step, max_completion_length=max_new_tokens, **columns)
        except Exception as error:
            raise RewardError(f"reward {name!r} raised {type(error).__name__}: {error} (iteration {step + 1}, "
                              f"first prompt {expanded_prompts[0][:60]!r})") from error
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardError(f"reward {name!r} returned {got} scores for {len(completions)} completions "
                              f"(iteration {step + 1}); return one float (or None) per completion")
        tensor = torch.tensor([math.nan if v is None else float(v) for v in values])  # [B*G]
        bad = ~torch.isfinite(tensor)
        if bad.any() and not drop_bad:
            i = int(bad.nonzero()[0])
            raise RewardError(f"reward {name!r} gave {values[i]!r} for completion {i} (iteration {step + 1}, "
                              f"{int(bad.sum())} bad in the batch): {completions[i][:80]!r}; fix the reward or set "
                              f"reward.on_bad_score=drop to drop and count such samples")
        scores[name] = tensor.masked_fill(bad, math.nan)
    return scores


# ----------------------------------------------------------------------------- update


def micro_batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def policy_logprobs(model, rollout: Rollout, rows: list[int], group_size: int, shared_prefix: bool,
                    temperature: float) -> Tensor:
    """Log-probs [n, C] of the completions `rows`; with shared_prefix, rows are whole groups."""
    rows_t = torch.tensor(rows)
    if shared_prefix:
        groups = rows_t[::group_size] // group_size  # [n/G]
        return completion_logprobs(model, rollout.prompt_ids[groups], rollout.prompt_mask[groups],
                                   rollout.completion_ids[rows_t], rollout.completion_mask[rows_t], group_size,
                                   shared_prefix=True, temperature=temperature)
    prompts = rows_t // group_size  # [n] each completion with its own copy of the prompt
    return completion_logprobs(model, rollout.prompt_ids[prompts], rollout.prompt_mask[prompts],
                               rollout.completion_ids[rows_t], rollout.completion_mask[rows_t], 1,
                               temperature=temperature)


def micro_batch_loss(config: GRPOConfig, logp: Tensor, old: Tensor, ref: Tensor | None, advantages: Tensor,
                     mask: Tensor, correct: Tensor, group_ids: Tensor) -> tuple[Tensor, dict]:
    """The configured loss of one micro-batch, normalised as its own batch (weights come later)."""
    a = config.algorithm
    if a.loss == "disco":
        loss, metrics = disco_loss(logp, old, mask, correct, group_ids, score=a.disco_score, tau=a.disco_tau,
                                   delta=a.disco_delta, penalty=a.disco_penalty)
    else:
        loss, metrics = clipped_policy_loss(logp, old, advantages, mask, eps_low=a.eps_low, eps_high=a.clip_high,
                                            aggregation=a.loss, max_length=config.sampling.max_new_tokens)
    if ref is not None:  # k3 per token, aggregated like the policy loss (the aggregations are linear)
        kl = torch.where(mask.bool(), kl_k3(logp, ref), torch.zeros_like(logp))  # [n, C]
        aggregation = "dapo" if a.loss == "disco" else a.loss
        loss = loss + a.beta * LOSS_AGGREGATIONS[aggregation](kl, mask.bool(), config.sampling.max_new_tokens)
        metrics["kl"] = float(kl.detach().sum() / mask.sum().clamp(min=1))
    return loss, metrics


def weight_of(config: GRPOConfig, mask: Tensor, part_mask: Tensor, groups: int, part_groups: int) -> float:
    """Share of a micro-batch in its optimizer step, so accumulation equals one big batch."""
    if config.algorithm.loss == "disco":
        return groups / max(part_groups, 1)
    total = aggregation_denominator(config.algorithm.loss, part_mask)
    return aggregation_denominator(config.algorithm.loss, mask) / max(total, 1)


def update(config: GRPOConfig, model, optimizer, reference, rollout: Rollout, advantages: Tensor, keep: Tensor,
           correct: Tensor) -> dict:
    """num_iterations passes over the rollout, each updates_per_pass optimizer steps."""
    t, a, s = config.train, config.algorithm, config.sampling
    G = t.group_size
    mask = rollout.completion_mask * keep[:, None]  # [N, C] dropped samples/groups train on nothing
    group_ids = torch.arange(len(keep)) // G  # [N]
    rows_all = list(range(len(keep)))
    step_size = len(rows_all) // t.updates_per_pass
    needs_old = t.num_iterations > 1 or t.updates_per_pass > 1
    with torch.no_grad():
        chunks = micro_batches(rows_all, t.micro_batch_size)
        logp_of = lambda m: torch.cat([policy_logprobs(m, rollout, c, G, a.shared_prefix, s.temperature) for c in chunks])
        old = logp_of(model) if needs_old else None  # [N, C]
        ref = None
        if a.beta > 0:
            with reference() as ref_model:
                ref = logp_of(ref_model if ref_model is not None else model)  # [N, C]
    totals: dict[str, list[float]] = {}
    model.train()
    for _ in range(t.num_iterations):
        for start in range(0, len(rows_all), step_size):
            part = rows_all[start:start + step_size]
            part_mask = mask[part]
            optimizer.zero_grad(set_to_none=True)
            for rows in micro_batches(part, t.micro_batch_size):
                logp = policy_logprobs(model, rollout, rows, G, a.shared_prefix, s.temperature)  # [n, C]
                old_rows = old[rows] if old is not None else logp.detach()  # mu = 1: ratio 1, gradient of the GRPO loss
                loss, metrics = micro_batch_loss(config, logp, old_rows, ref[rows] if ref is not None else None,
                                                 advantages[rows], mask[rows], correct[rows], group_ids[rows])
                weight = weight_of(config, mask[rows], part_mask, len(rows) // G, len(part) // G)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss is {loss.item()} (rows {rows[0]}..{rows[-1]})")
                (loss * weight).backward()
                for key, value in metrics.items():
                    totals.setdefault(key, []).append(value)
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       t.max_grad_norm)
            totals.setdefault("grad_norm", []).append(float(grad_norm))
            optimizer.step()
    model.eval()
    return {k: sum(v) / len(v) for k, v in totals.items() if v and not any(math.isnan(x) for x in v)}


# ----------------------------------------------------------------------------- train


def train(config: GRPOConfig, resume: bool = False) -> dict:
    t, a, s = config.train, config.algorithm, config.sampling
    out = Path(config.log.output_dir)
    checkpoint = open_output_dir(out, resume)
    torch.manual_seed(t.seed)
    random.seed(t.seed)

    # setup: data, model, rewards, optimizer
    train_rows = load_rows(resolve_embedded(config.data.train), split=config.data.split)
    test_rows = load_rows(resolve_embedded(config.data.test))[: config.data.eval_size] if config.data.test else []
    model, tokenizer = load_policy(config.model)
    texts = [render_prompt(tokenizer, row["prompt"]) for row in train_rows]
    prompt_ids, truncated_prompts = tokenize_prompts(tokenizer, texts, config.data.max_prompt_length,
                                                     config.data.overlong_prompts)
    for row, text, ids in zip(train_rows, texts, prompt_ids):
        row["_text"], row["_ids"] = text, ids
    rewards = {name: build_reward(name, config.reward.params.get(name)) for name in config.reward.weights}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    reference = reference_policy(model, config.model.lora) if a.beta > 0 else None
    print(f"[llmalign] {a.loss}: {t.prompts_per_iteration} prompts x {t.group_size} completions, "
          f"{len(train_rows)} training rows, {sum(p.numel() for p in params):,} trainable parameters, "
          f"{truncated_prompts} prompts truncated; output {out}")

    start = resume_training(checkpoint, out, model, optimizer) if resume else 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(config), indent=2))

    def evaluate() -> dict:
        return held_out_metrics(model, tokenizer, test_rows, s.max_new_tokens, s.temperature,
                                config.data.eval_samples, seed=t.seed + 12345)

    before = {}
    if start == 0:
        before = evaluate()
        append_metrics(out / "metrics.jsonl", {"iteration": 0, **before, "prompts_truncated": truncated_prompts})
        if before:
            print(f"[llmalign] held-out accuracy before ({len(test_rows)} problems): "
                  f"{describe_held_out(before, s.temperature, config.data.eval_samples)}")

    drop_bad = config.reward.on_bad_score == "drop"
    progress = tqdm(range(start, t.iterations), desc=f"grpo[{a.loss}]", initial=start, total=t.iterations)
    started, record = time.perf_counter(), {}
    for iteration in progress:
        timings = {}

        # rollout
        clock = time.perf_counter()
        torch.manual_seed(t.seed * 1_000_003 + iteration)  # sampling depends on the iteration only: exact resume
        rows = iteration_rows(train_rows, iteration, t.prompts_per_iteration, t.seed)
        rollout = generate(model, tokenizer, [row["_ids"] for row in rows], t.group_size, s.max_new_tokens,
                           temperature=s.temperature, top_p=s.top_p)
        timings["time/rollout"] = time.perf_counter() - clock

        # reward
        clock = time.perf_counter()
        columns = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
        scores = score(rewards, [row["_text"] for row in rows], rollout, columns, t.group_size, iteration,
                       s.max_new_tokens, drop_bad)
        bad = torch.stack(list(scores.values())).isnan().any(dim=0)  # [N]
        timings["time/reward"] = time.perf_counter() - clock

        # advantage (and what takes part: dropped samples, zero-variance groups, truncated completions)
        group_ids = torch.arange(len(bad)) // t.group_size  # [N]
        advantages, reward_stats = compose_rewards(scores, config.reward.weights, group_ids, scale=a.scale,
                                                   nan_policy="mask" if drop_bad else "raise")
        total = sum(config.reward.weights[n] * scores[n].nan_to_num(0.0) for n in scores)  # [N]
        keep = ~bad  # [N]
        zero_std_keep, zero_std_fraction = zero_variance_group_mask(total, group_ids)
        if a.filter_zero_std:
            keep &= zero_std_keep
        if a.mask_overlong:
            keep &= ~rollout.truncated
        first = scores[next(iter(scores))]  # DisCO's correctness: the first reward above a threshold
        correct = first.nan_to_num(0.0) > a.correct_threshold  # [N]

        # update
        clock = time.perf_counter()
        try:
            metrics = update(config, model, optimizer, reference, rollout, advantages.masked_fill(bad, 0.0), keep, correct)
        except FloatingPointError as error:
            last = latest_checkpoint(out / "checkpoints")
            raise FloatingPointError(f"iteration {iteration + 1}: {error}; the last good checkpoint is "
                                     f"{last or 'none (none written yet)'}, and --resume starts from it") from None
        timings["time/update"] = time.perf_counter() - clock
        tokens = int(rollout.completion_mask.sum())

        # log
        record = {"iteration": iteration + 1, **{f"reward/{k}": v for k, v in reward_stats.items()},
                  **{f"train/{k}": v for k, v in metrics.items()},
                  "train/zero_std_groups": zero_std_fraction, "train/dropped": int(bad.sum()),
                  "train/kept": float(keep.float().mean()), "completion/mean_length": float(rollout.lengths.float().mean()),
                  "completion/truncated": float(rollout.truncated.float().mean()),
                  "tokens_per_second": tokens / max(sum(timings.values()), 1e-9), **timings}
        record.update({f"reward/{n}/budget": fn.budget(iteration) for n, fn in rewards.items() if hasattr(fn, "budget")})
        done = iteration + 1
        last = done == t.iterations or (t.max_seconds is not None and time.perf_counter() - started > t.max_seconds)
        if (config.log.eval_every and done % config.log.eval_every == 0) or last:
            record.update(evaluate())
        append_metrics(out / "metrics.jsonl", record)
        append_metrics(out / "samples.jsonl", {  # the first group of each iteration, to read
            "iteration": done, "prompt": rows[0]["_text"], "completions": rollout.texts[: t.group_size],
            "rewards": {n: v[: t.group_size].tolist() for n, v in scores.items()}})
        progress.set_postfix(reward=f"{reward_stats['total/mean']:.3f}", length=f"{record['completion/mean_length']:.1f}",
                             clip=f"{metrics.get('clip_frac', 0):.2f}")

        # checkpoint
        if (config.log.checkpoint_every and done % config.log.checkpoint_every == 0) or last:
            save_training_checkpoint(config, model, tokenizer, optimizer, done, out)
        if last:
            break

    after = {k: v for k, v in record.items() if k.startswith("eval/")}
    plot_curves(out / "metrics.jsonl", out / "reward_curve.png",
                ["reward/total/mean", "eval/accuracy", "eval/sampled_accuracy", "completion/mean_length", "train/kl"],
                f"GRPO ({a.loss}) on {config.model.path}")
    if before and after:
        for label, result in (("before", before), ("after ", after)):
            print(f"[llmalign] held-out accuracy {label}: {describe_held_out(result, s.temperature, config.data.eval_samples)}")
    print(f"[llmalign] metrics {out / 'metrics.jsonl'}, curves {out / 'reward_curve.png'}, model {out / 'final'}")
    return {"before": before, "after": after}


def save_training_checkpoint(config: GRPOConfig, model, tokenizer, optimizer, iteration: int, out: Path) -> None:
    """Training state (shared.checkpoint) plus the model in from_pretrained form: the LoRA adapter
    (PeftModel.from_pretrained) or the full model and tokenizer (AutoModelForCausalLM)."""
    def write_model(directory: Path) -> None:
        model.save_pretrained(directory / "model")
        tokenizer.save_pretrained(directory / "model")

    states = {"trainable": trainable_state(model), "optimizer": optimizer.state_dict(), "rng": rng_state(),
              "trainer": {"iteration": iteration, "config": to_dict(config)}}
    final = save_checkpoint(out / "checkpoints", iteration, states, keep_last=config.log.keep_last,
                            extra_writer=write_model)
    pointer = out / "final"  # the newest model, for `llmalign eval --model RUN/final`
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    pointer.symlink_to(Path("checkpoints") / final.name / "model")

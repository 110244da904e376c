"""GiGPO and GRPO over whole episodes on multi-turn environments (`algorithm.name: gigpo | episode_grpo`).

    llmalign grpo --config configs/llm/arith_env_gigpo.yaml
    llmalign grpo --config configs/llm/arith_env_episode_grpo.yaml          # the baseline: episode advantage alone
    accelerate launch --multi_gpu --num_processes 2 -m llmalign grpo --config configs/llm/arith_env_gigpo.yaml

Group-in-Group Policy Optimization (Feng et al. 2025, arXiv:2505.10978; official code verl-agent,
gigpo/core_gigpo.py). Each iteration, in the loop's stages (shared.loop):
- rollout: B = train.prompts_per_iteration tasks, G = train.group_size trajectories each, played turn by turn in
  the environment section's environment (llmalign.environments.run_episodes); one training row per turn, its
  prompt the observation and its completion the action, so no environment token is ever in the loss;
- advantage (`step_row_advantages`, shared.gigpo on the gathered rows): the episode score R (the trajectory's
  total reward) and the discounted step return G_t (gamma), each less environment.invalid_penalty on a row whose
  action was invalid; A = A^E + omega A^S, A^E over the episode group, A^S over the rows of the group with the
  same observation (anchor state); every token of a row's action gets its row's A ([n, C]);
- update: `llmalign.grpo.update` on this rank's rows, each row a group of one (`llmalign.grpo.Groups`), with
  algorithm.loss, clip ranges, kl_beta and num_iterations as in GRPO.

episode_grpo is the same recipe with omega = 0: GRPO's group advantage on whole episodes (mean_norm: R - mean,
Dr. GRPO's form; the GiGPO paper's GRPO baseline) spread over every turn; environment.step_weight is not read.

Over W processes: rank r plays the r-th block of B/W groups. A trajectory's sampling is seeded by (seed,
iteration, group, turn) and each group generates on its own (`run_episodes`), so the rollout does not depend on W;
the advantages are computed on every rank's rows gathered; the update's loss is the global batch's. Nothing
random is kept between iterations, so --resume repeats an uninterrupted run.

Departures from verl-agent: the observation is the whole prompt (verl-agent builds prompts from a history
window and anchors on the raw observation; here an environment that wants history writes it into the
observation, which is then the anchor too); a trajectory not done after environment.max_turns is cut there
(reward as far as it got); algorithm.updates_per_pass is 1 (ranks hold unequal numbers of rows).
"""

from __future__ import annotations

import dataclasses
import random
import time

import torch
from torch import Tensor

from llmalign.config import GRPOConfig
from llmalign.environments import (
    Episodes,
    StepRow,
    checked_reset,
    environment_factory,
    episode_returns,
    run_episodes,
    task_id,
)
from llmalign.evaluate import derived_seed
from llmalign.grpo import Groups, restored_generated_tokens, update
from llmalign.policy import (
    enable_gradient_checkpointing,
    load_policy,
    reference_policy,
    restore_policy,
    save_policy_checkpoint,
)
from llmalign.toy import resolve_embedded
from shared.advantages import sequence_to_tokens
from shared.gigpo import anchor_state_groups, gigpo_advantages, penalize_invalid_actions, step_discounted_returns
from shared.loop import Plan
from shared.ratio_check import METRIC as RATIO_METRIC
from shared.ratio_check import LLM_COMPARED, FirstUpdateRatioCheck
from shared.run import Run

EVAL_STREAM = -1  # the task stream of the held-out evaluation, apart from every iteration's


def step_row_advantages(steps: list[StepRow], env, step_weight: float) -> Tensor:
    """GiGPO's advantage (arXiv:2505.10978, Eq. 8) of every step row [N], from shared.gigpo: the rows of all
    ranks, each trajectory's in time order. `env`: the environment section (gamma, mode, episode_statistics,
    invalid_penalty); `step_weight`: omega (0: the episode advantage alone)."""
    group_ids, traj_ids, rewards, totals, valid = episode_returns(steps)  # [N] each
    scores = penalize_invalid_actions(totals, valid, env.invalid_penalty)  # [N] R_i less the row's penalty
    returns = step_discounted_returns(rewards, traj_ids, env.gamma)  # [N]
    returns = penalize_invalid_actions(returns, valid, env.invalid_penalty)  # after discounting, as verl-agent
    step_groups = anchor_state_groups([s.anchor for s in steps], group_ids)  # [N]
    return gigpo_advantages(
        scores,
        returns,
        group_ids,
        traj_ids,
        step_groups,
        step_weight=step_weight,
        mode=env.mode,
        statistics=env.episode_statistics,
    )  # [N]


@dataclasses.dataclass
class Trained:
    """The advantage stage's hand-over: this rank's episodes, their per-token advantages and global statistics."""

    iteration: int
    episodes: Episodes
    advantages: Tensor  # [n, C] per token of this rank's rows
    first_row: int  # this rank's first row in the global batch
    stats: dict  # reward/..., env/... over the global batch
    timings: dict


def episode_statistics(steps: list[StepRow], advantages: Tensor) -> dict:
    """Per trajectory (mean reward, success, turns) and per row (invalid actions, rows in shared step groups)."""
    group_ids, traj_ids, _, totals, valid = episode_returns(steps)
    first = torch.ones(len(steps), dtype=torch.bool)
    first[1:] = traj_ids[1:] != traj_ids[:-1]  # [N] each trajectory's first row
    episode = totals[first]  # [T]
    step_groups = anchor_state_groups([s.anchor for s in steps], group_ids)  # [N]
    shared = torch.bincount(step_groups)[step_groups] > 1  # [N]
    return {
        "reward/episode/mean": float(episode.mean()),
        "reward/episode/std": float(episode.std()) if len(episode) > 1 else 0.0,
        "env/success": float((episode > 0).double().mean()),
        "env/turns": len(steps) / len(episode),
        "env/invalid": float((~valid).double().mean()),
        "env/shared_step_rows": float(shared.double().mean()),
        "train/advantage_abs": float(advantages.abs().mean()),
    }


class EnvironmentRecipe:
    """The environment recipes in the loop's stages (shared.loop): rollout, advantage, update (see the module
    docstring). `step_weight` None: environment.step_weight (gigpo); 0: episode_grpo."""

    def __init__(self, config: GRPOConfig, step_weight: float | None = None):
        self.config = config
        self.step_weight = config.environment.step_weight if step_weight is None else step_weight

    def setup(self, run: Run) -> Plan:
        config, t, e = self.config, self.config.train, self.config.environment
        run.require_divisible(t.prompts_per_iteration, "train.prompts_per_iteration", "tasks")
        self.run = run
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        self.make = environment_factory(e.name, e.kwargs)
        checked_reset(e.name, self.make(), 0)  # a factory or reset that fails does so before any weights load
        run.main_first(lambda: resolve_embedded(config.model.path))
        model, self.tokenizer = load_policy(config.model, run.device)
        if config.memory.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.reference = reference_policy(model, config.model.lora) if config.algorithm.kl_beta > 0 else None
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        self.model, self.optimizer = run.prepare(model, optimizer)
        start = restore_policy(run, self.model, self.optimizer)
        self.engine = self.start_engine()
        self.generated_total = restored_generated_tokens(run, config.budget.max_generated_tokens)
        self.first_iteration = start
        self.ratio_check = FirstUpdateRatioCheck(LLM_COMPARED)
        run.write_config(config)
        name = config.algorithm.name
        run.print(
            f"{name} on environment {e.name}: {t.prompts_per_iteration} tasks x {t.group_size} trajectories per "
            f"iteration over {run.world} process(es), at most {e.max_turns} turns each (one row per turn), "
            f"omega {self.step_weight}, gamma {e.gamma}, {e.mode}; {sum(p.numel() for p in params):,} trainable "
            f"parameters; device {run.device}; output {run.out}"
        )
        curves = ("reward/episode/mean", "env/success", "eval/episode_reward", "env/turns")
        title = f"{name} on {e.name} ({config.model.path})"
        return Plan(start, t.iterations, name, config.budget.max_seconds, curves=curves, title=title)

    def start_engine(self):
        """rollout.engine=vllm: a VLLMEngine on model.path whose max_model_len is data.max_prompt_length +
        sampling.max_new_tokens (an observation longer than the former is refused); None under hf."""
        config = self.config
        if config.rollout.engine == "hf":
            return None
        from llmalign.engines import VLLMEngine

        r = config.rollout
        return VLLMEngine(
            resolve_embedded(config.model.path),
            self.tokenizer,
            max_model_len=config.data.max_prompt_length + config.sampling.max_new_tokens,
            kv_cache_mib=r.vllm_kv_cache_mib,
            gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            dtype=config.model.dtype,
            seed=config.train.seed,
        )

    def episodes(self, groups: range, size: int, stream: int, greedy: bool) -> Episodes:
        """This rank's `groups` of `size` trajectories, tasks and seeds from (train.seed, stream)."""
        config, s, seed = self.config, self.config.sampling, self.config.train.seed
        sampling = {
            "max_turns": config.environment.max_turns,
            "max_prompt_length": config.data.max_prompt_length,
            "max_new_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "greedy": greedy,
        }
        with self.run.unwrapped_for_generation(self.model) as policy:
            if self.engine is not None:
                self.engine.push_policy(policy)
            return run_episodes(
                self.run,
                self.make,
                config.environment.name,
                policy,
                self.tokenizer,
                groups,
                size,
                lambda group: task_id(seed, stream, group),
                lambda group, traj, turn: derived_seed(seed, stream, group, traj, turn, 9),
                sampling,
                self.engine,
            )

    def evaluate(self, done: int) -> dict:
        """environment.eval_tasks fixed tasks played greedily, one trajectory each, split over the ranks."""
        tasks = self.config.environment.eval_tasks
        if tasks == 0:
            return {}
        run = self.run
        episodes = self.episodes(range(run.rank, tasks, run.world), 1, EVAL_STREAM, greedy=True)
        steps = sorted(run.gather_objects(episodes.steps), key=lambda s: (s.group, s.turn))
        _, _, _, totals, _ = episode_returns(steps)
        first = [i for i, s in enumerate(steps) if s.turn == 0]
        return {
            "eval/episode_reward": float(totals[first].mean()),
            "eval/success": float((totals[first] > 0).double().mean()),
            "eval/turns": len(steps) / tasks,
        }

    def describe(self, result: dict) -> str:
        return (
            f"mean episode reward {result['eval/episode_reward']:.3f}, success {result['eval/success']:.3f}, "
            f"{result['eval/turns']:.2f} turns ({self.config.environment.eval_tasks} greedy episodes)"
        )

    def report_before(self, before: dict) -> None:
        self.run.print(f"held-out episodes before: {self.describe(before)}")

    # ------------------------------------------------------------------------- stages

    def rollout(self, iteration: int) -> Trained:
        clock = time.perf_counter()
        t = self.config.train
        episodes = self.episodes(self.run.block(t.prompts_per_iteration), t.group_size, iteration, greedy=False)
        timings = {"time/rollout": time.perf_counter() - clock}
        return Trained(iteration, episodes, torch.empty(0), 0, {}, timings)

    def advantage(self, trained: Trained) -> Trained:
        run, steps = self.run, trained.episodes.steps
        everything = run.gather_objects(steps)  # rank order: the global batch, trajectories in time order
        counts = [int(c) for c in run.gather_objects([len(steps)])]
        first = sum(counts[: run.rank])
        advantages = step_row_advantages(everything, self.config.environment, self.step_weight)  # [N]
        own = advantages[first : first + len(steps)].float().to(run.device)  # [n]
        width = trained.episodes.rollout.completion_ids.shape[1]
        trained.advantages = sequence_to_tokens(own, width)  # [n, C] every action token its row's value
        trained.first_row = first
        lengths = run.gather_rows(trained.episodes.rollout.lengths.float())  # [N]
        trained.stats = {
            **episode_statistics(everything, advantages),
            "completion/mean_length": float(lengths.mean()),
            "train/rows": len(everything),
            "train/generated_tokens": int(run.sum(trained.episodes.generated)),
        }
        self.generated_total += trained.stats["train/generated_tokens"]
        trained.stats["train/generated_tokens_total"] = self.generated_total
        return trained

    def update(self, trained: Trained) -> dict:
        clock = time.perf_counter()
        n = len(trained.episodes.steps)
        device = self.run.device
        rollout = trained.episodes.rollout
        moved = {f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)}
        rollout = type(rollout)(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in moved.items()})
        iteration = trained.iteration
        check = iteration == self.first_iteration or (
            self.config.log.ratio_check_every > 0 and iteration % self.config.log.ratio_check_every == 0
        )
        metrics = update(
            self.run,
            self.config,
            self.model,
            self.optimizer,
            self.reference,
            rollout,
            trained.advantages,
            torch.ones(n, dtype=torch.bool, device=device),
            torch.zeros(n, dtype=torch.bool, device=device),  # no correctness labels
            Groups([1] * n, list(range(trained.first_row, trained.first_row + n))),  # each row a group of one
            check_ratio=check,
        )
        trained.timings["time/update"] = time.perf_counter() - clock
        if RATIO_METRIC in metrics:
            warning = self.ratio_check.warning(metrics[RATIO_METRIC], f"iteration {iteration + 1}")
            if warning is not None:
                self.run.print(warning)
        return metrics

    def record(self, trained: Trained, metrics: dict) -> dict:
        checked = {RATIO_METRIC: metrics.pop(RATIO_METRIC)} if RATIO_METRIC in metrics else {}
        mismatch = {key: metrics.pop(key) for key in [k for k in metrics if k.startswith("mismatch/")]}
        return {
            **trained.stats,
            **{f"train/{k}": v for k, v in metrics.items()},
            **checked,
            **mismatch,
            **trained.timings,
        }

    def logged(self, done: int, trained: Trained, record: dict) -> None:
        """The main process's first trajectory to samples.jsonl: its observations, actions and rewards."""
        steps, texts = trained.episodes.steps, trained.episodes.rollout.texts
        first = [i for i, s in enumerate(steps) if s.traj == steps[0].traj]
        turns = [{"observation": steps[i].anchor, "action": texts[i], "reward": steps[i].reward} for i in first]
        self.run.append({"iteration": done, "turns": turns}, name="samples.jsonl")

    def postfix(self, record: dict) -> dict:
        return {"reward": f"{record['reward/episode/mean']:.3f}", "turns": f"{record['env/turns']:.2f}"}

    def stop_early(self) -> bool:
        limit = self.config.budget.max_generated_tokens
        return limit is not None and self.generated_total >= limit

    def save(self, done: int) -> None:
        budget = {"budget": {"generated_tokens": self.generated_total}}
        save_policy_checkpoint(self.run, self.config, self.model, self.tokenizer, self.optimizer, done, budget)

    def closing(self) -> str:
        out = self.run.out
        return f"metrics {out / 'metrics.jsonl'}, curves {out / 'reward_curve.png'}, model {out / 'final'}"


def gigpo_recipe(config: GRPOConfig) -> EnvironmentRecipe:
    """algorithm.name gigpo: A = A^E + environment.step_weight * A^S."""
    return EnvironmentRecipe(config)


def episode_grpo_recipe(config: GRPOConfig) -> EnvironmentRecipe:
    """algorithm.name episode_grpo: the episode advantage alone (omega = 0), GRPO over whole episodes."""
    return EnvironmentRecipe(config, step_weight=0.0)

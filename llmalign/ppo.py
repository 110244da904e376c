"""PPO with a critic and GAE for text (algorithm.name: ppo): Schulman et al. 2017 (arXiv:1707.06347) with GAE
(Schulman et al. 2016, arXiv:1506.02438), as OpenRLHF and TRL's PPO run it on LLMs.

    llmalign grpo --config configs/llm/arith_ppo.yaml
    accelerate launch --multi_gpu --num_processes 2 -m llmalign grpo --config configs/llm/arith_ppo.yaml

`PPORecipe` composes a `GRPORecipe` (llmalign.grpo, which builds both: `ALGORITHMS`): the same rollout stage (llmalign.rollout.sample_iteration; group
size may be 1), the same policy update (`llmalign.grpo.update`, the PPO-clip loss of algorithm.loss on per-token
advantages [n, C]), the same record, evaluation and checkpoint, plus a critic (llmalign.critic). Per iteration:

- rewards: the weighted sum of the configured rewards per completion, put on its last token
  (shared.gae.last_token_rewards); a dropped score (reward.on_bad_score=drop) trains neither model;
- values: the critic's V(s_t) of every completion token, before either update;
- advantages: GAE (shared.gae.gae_advantages, algorithm.gamma and algorithm.gae_lambda), whitened over the global
  batch's kept tokens when algorithm.whiten_advantages (OpenRLHF's and TRL's default); the returns A + V (before
  the whitening) are the critic's targets;
- update: the policy's (num_iterations x updates_per_pass steps), then the critic's on the clipped value loss
  (critic.value_clip) with the same passes and steps, its own AdamW at critic.learning_rate.

`critic_targets` and `ppo_update` are also T-PPO's (llmalign.t_ppo), which passes windows and EGAE's `finished`.

Departures: no KL-in-reward (InstructGPT's per-token KL penalty): algorithm.kl_beta adds the k3 KL to the loss as in
GRPO; one lambda for the policy and the critic (VC-PPO, arXiv:2503.01491, decouples them: not done); the critic
starts from the policy's checkpoint with a zero head (llmalign.critic), not from a reward model.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from llmalign.config import GRPOConfig
from llmalign.critic import Critic, check_critic_source
from llmalign.evaluate import Rollout
from shared.gae import egae_advantages, gae_advantages, last_token_rewards, whitened
from shared.loop import Plan
from shared.run import Run


@dataclasses.dataclass
class CriticTargets:
    """What GAE gives both updates, this rank's rows."""

    advantages: Tensor  # [n, C] the policy's, whitened when algorithm.whiten_advantages
    critic_rollout: Rollout  # what the critic trains on (the policy's rollout, or T-PPO's finished responses)
    critic_values: Tensor  # [n, C] V_old on critic_rollout
    returns: Tensor  # [n, C] the critic's targets
    critic_mask: Tensor  # [n, C] the tokens the critic trains on
    critic_group_size: int  # completions per prompt of critic_rollout
    metrics: dict  # value and advantage statistics over all ranks


def global_mean_var(run: Run, x: Tensor, mask: Tensor) -> tuple[float, float]:
    """Mean and (population) variance of `x` [n, C] over every rank's kept tokens (two passes)."""
    kept = mask.bool()  # [n, C]
    count = max(float(run.sum(kept.sum())), 1.0)
    mean = float(run.sum(x[kept].double().sum())) / count
    var = float(run.sum(((x[kept].double() - mean) ** 2).sum())) / count
    return mean, var


def critic_targets(
    run: Run,
    config: GRPOConfig,
    critic: Critic,
    rollout: Rollout,
    group_size: int,
    rewards: Tensor,
    keep: Tensor,
    finished: Tensor | None = None,
    critic_side: tuple[Rollout, Tensor] | None = None,
) -> CriticTargets:
    """GAE (or EGAE where `finished` [n] is given: unfinished rows bootstrap from V(s_{l-1})) on this rank's rows.

    rewards [n] each completion's reward (0 for an unfinished window), keep [n] rows that train. The critic trains
    on `rollout` with GAE's returns, or on `critic_side` = (rollout, mask rows [n]): T-PPO's whole finished
    responses, whose returns are plain GAE on values computed here (before either update)."""
    a = config.algorithm
    mask = rollout.completion_mask * keep[:, None]  # [n, C]
    values = critic.values(rollout, group_size)  # [n, C]
    token_rewards = last_token_rewards(rewards.to(values.device, values.dtype), mask)  # [n, C]
    gae = dict(gamma=a.gamma, lam=a.gae_lambda)
    if finished is None:
        advantages, returns = gae_advantages(token_rewards, values, mask, **gae)  # [n, C] each
    else:
        advantages, returns = egae_advantages(token_rewards, values, mask, finished.to(values.device), **gae)
    mean, var = global_mean_var(run, advantages, mask)
    value_mean, _ = global_mean_var(run, values, mask)
    metrics = {"advantage_mean": mean, "advantage_std": var**0.5, "value_mean": value_mean}
    policy_advantages = whitened(advantages, mask, mean, var) if a.whiten_advantages else advantages * mask
    if critic_side is None:
        return CriticTargets(policy_advantages, rollout, values, returns, mask, group_size, metrics)
    full, rows = critic_side
    full_mask = full.completion_mask * rows[:, None]  # [n, C']
    full_values = critic.values(full, 1)  # [n, C']
    full_rewards = last_token_rewards(rewards.to(full_values.device, full_values.dtype), full_mask)  # [n, C']
    _, full_returns = gae_advantages(full_rewards, full_values, full_mask, **gae)  # [n, C']
    return CriticTargets(policy_advantages, full, full_values, full_returns, full_mask, 1, metrics)


def ppo_update(recipe, critic: Critic, trained, targets: CriticTargets) -> dict:
    """The policy's update (`GRPORecipe.update`: num_iterations x updates_per_pass PPO-clip steps on the per-token
    advantages), then the critic's on its targets."""
    metrics = recipe.update(trained)
    t = targets
    metrics.update(critic.update(t.critic_rollout, t.critic_group_size, t.critic_values, t.returns, t.critic_mask))
    return {**metrics, **targets.metrics}


@dataclasses.dataclass
class PPOBatch:
    trained: object  # llmalign.grpo.Advantaged: GRPO's advantage stage's output, its advantages replaced by GAE's
    targets: CriticTargets


def total_rewards(config: GRPOConfig, scores: dict[str, Tensor]) -> Tensor:
    """[N] the weighted sum of the configured rewards (a dropped score counts 0; its row does not train)."""
    return sum(config.reward.weights[name] * scores[name].nan_to_num(0.0) for name in scores)


class PPORecipe:
    """PPO in the loop's stages: GRPO's rollout, GAE advantages from the critic, the policy's and critic's updates."""

    def __init__(self, config: GRPOConfig, grpo):
        self.config = config
        self.grpo = grpo  # a llmalign.grpo.GRPORecipe on the same config

    def setup(self, run: Run) -> Plan:
        self.run = run
        check_critic_source(self.config)  # before the policy loads
        plan = self.grpo.setup(run)
        self.critic = Critic.setup(run, self.config)
        c = self.config.critic
        run.print(f"critic: {self.config.critic.path or self.config.model.path}, learning rate {c.learning_rate}")
        loss = self.config.algorithm.loss
        return dataclasses.replace(plan, label=f"ppo[{loss}]", title=f"PPO ({loss}) on {self.config.model.path}")

    def rollout(self, iteration: int):
        return self.grpo.rollout(iteration)

    def advantage(self, sampled) -> PPOBatch:
        run, config = self.run, self.config
        # GRPO's advantage stage gives the batch's filters, statistics and this rank's rows; its group advantages
        # (0 for groups of one) are replaced by GAE's
        trained = self.grpo.advantage(sampled)
        batch = sampled.batch
        G = config.train.group_size
        own = slice(batch.block.start * G, batch.block.stop * G)  # this rank's rows of the global batch
        rewards = total_rewards(config, batch.scores)[own]  # [n]
        targets = critic_targets(run, config, self.critic, trained.rollout, G, rewards, trained.trained_keep)
        trained.advantages = targets.advantages
        return PPOBatch(trained, targets)

    def update(self, batch: PPOBatch) -> dict:
        return ppo_update(self.grpo, self.critic, batch.trained, batch.targets)

    def record(self, batch: PPOBatch, metrics: dict) -> dict:
        return self.grpo.record(batch.trained, metrics)

    def save(self, done: int) -> None:
        self.grpo.save(done, self.critic.states())

    def logged(self, done: int, batch: PPOBatch, record: dict) -> None:
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
        return {**self.grpo.postfix(record), "vloss": f"{record.get('train/value_loss', float('nan')):.3f}"}

    def closing(self) -> str:
        return self.grpo.closing()

    @property
    def engine(self):  # llmalign.grpo.train closes it
        return self.grpo.engine

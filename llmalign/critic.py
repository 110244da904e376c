"""The critic of algorithm.name ppo and t_ppo: a value head on a transformers backbone, its own AdamW, and its update
on GAE's returns with PPO's clipped value loss (shared.gae.clipped_value_loss).

    critic = Critic.setup(run, config)                        # loaded, prepared (DDP/FSDP), restored from --resume
    values = critic.values(rollout, rows)                     # [m, C] V(s_t) of each completion token's state
    metrics = critic.update(rollout, old_values, returns, mask)
    states = critic.states()                                  # into the checkpoint beside the policy's

The model is transformers' AutoModelForTokenClassification with num_labels=1 on critic.path (default model.path):
the backbone's weights come from the checkpoint, the head (`score` for Qwen2/Llama) is new and set to 0, so every
value starts at 0 and the first advantages are GAE on the rewards alone. A zero head also makes the start a
function of the checkpoint only (no random head on each rank). OpenRLHF and TRL initialise their critic from a
reward model; we have none for rule-based rewards, and a policy checkpoint is what the task gives.
V(s_t), the state before completion token t, is read at the position of the last token of s_t: the position whose
logits give token t's log-prob (llmalign.logprobs), so the value and the log-prob of a token see the same context.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from llmalign.config import GRPOConfig
from llmalign.data import micro_batches
from llmalign.evaluate import Rollout
from llmalign.logprobs import real_token_positions
from llmalign.policy import disable_dropout
from llmalign.toy import resolve_embedded
from shared.config import ConfigError, local_path_problem
from shared.gae import clipped_value_loss
from shared.run import Run


def load_critic(config: GRPOConfig, device) -> torch.nn.Module:
    """AutoModelForTokenClassification(num_labels=1) on critic.path (null: model.path), head zeroed, dropout off
    (a value regression has no use for it, and dropout would make V_old differ from the update's V). A path whose
    architecture has no token-classification class in transformers is a ConfigError naming the field."""
    from transformers import AutoModelForTokenClassification

    field = "critic.path" if config.critic.path else "model.path"
    path = resolve_embedded(config.critic.path or config.model.path)
    problem = local_path_problem(path)
    if problem is not None:
        raise ConfigError(f"config field '{field}': {problem}")
    remote = {"trust_remote_code": True} if config.model.allow_remote_code else {}
    try:
        with torch.random.fork_rng(devices=[]):  # the new head's random init must not move the run's RNG (resume)
            model = AutoModelForTokenClassification.from_pretrained(
                path, num_labels=1, dtype=getattr(torch, config.model.dtype), **remote
            )
    except (ValueError, OSError, KeyError) as error:  # no token-classification class, or not a model at all
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ConfigError(
            f"config field '{field}': {path!r} cannot be a critic ({reason}); give a model whose architecture "
            "transformers loads as AutoModelForTokenClassification (Qwen2, Llama, ...)"
        ) from None
    head = value_head(model)
    if head is None:
        raise ConfigError(
            f"config field '{field}': {path!r} loads without a linear value head of one output; give a model "
            "whose AutoModelForTokenClassification ends in one (Qwen2, Llama, ...)"
        )
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    disable_dropout(model)
    return model.to(device)


def check_critic_source(config: GRPOConfig) -> None:
    """Refuse, before any weights load, a critic model whose config transformers maps to no token-classification
    class (the embedded model is a Qwen2, which has one). A ConfigError naming the field."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING

    path = config.critic.path or config.model.path
    if path.startswith("embedded:"):
        return
    field = "critic.path" if config.critic.path else "model.path"
    problem = local_path_problem(path)
    if problem is not None:
        raise ConfigError(f"config field '{field}': {problem}")
    remote = {"trust_remote_code": True} if config.model.allow_remote_code else {}
    try:
        model_config = AutoConfig.from_pretrained(path, **remote)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ConfigError(f"config field '{field}': cannot load {path!r} ({reason}); give a model directory") from None
    if type(model_config) not in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING and not remote:
        raise ConfigError(
            f"config field '{field}': {path!r} is a {model_config.model_type} model, which transformers cannot load "
            "as AutoModelForTokenClassification (no backbone with a value head); give a causal LM such as Qwen2 "
            "or Llama"
        )


def value_head(model) -> torch.nn.Linear | None:
    """The last nn.Linear of one output feature: transformers' token-classification head (`score`, `classifier`)."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1]
    return heads[-1] if heads else None


def token_values(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor):
    """[B, C] V(s_t) for each completion token t: the critic's output at positions P-1 .. P+C-2 of [prompt |
    completion] (one prompt per row, left-padded; completions right-padded), float32. Masked positions hold values
    to be masked."""
    P, C = prompt_ids.shape[1], completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P+C]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, P+C]
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=real_token_positions(attention_mask)
    ).logits  # [B, P+C, 1]
    return out[:, P - 1 : P + C - 1, 0].float()  # [B, C]


@dataclasses.dataclass
class Critic:
    """The prepared value model and its optimizer; `config` gives the update's passes, steps and micro-batches."""

    run: Run
    config: GRPOConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    @classmethod
    def setup(cls, run: Run, config: GRPOConfig) -> Critic:
        """Load (`load_critic`), build its AdamW (critic.learning_rate, critic.weight_decay), prepare both through
        the run, and restore both from the starting checkpoint when there is one."""
        c = config.critic
        model = load_critic(config, run.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)
        model, optimizer = run.prepare(model, optimizer)
        critic = cls(run, config, model, optimizer)
        if run.checkpoint is not None:
            run.load_trainable(model, run.load("critic"))
            run.load_optimizer(model, optimizer, run.load("critic_optimizer"))
        model.eval()
        return critic

    def states(self) -> dict:
        """The critic's weights and optimizer state, named for the checkpoint (safetensors + JSON skeletons)."""
        return {
            "critic": self.run.trainable_state(self.model),
            "critic_optimizer": self.run.optimizer_state(self.model, self.optimizer),
        }

    @torch.no_grad()
    def values(self, rollout: Rollout, group_size: int) -> Tensor:
        """[n, C] V(s_t) of every completion token of this rank's rollout (completion i continues prompt
        i // group_size), in micro-batches of memory.micro_batch_size."""
        rows = list(range(rollout.completion_ids.shape[0]))
        chunks = [self._forward(rollout, chunk, group_size) for chunk in self._chunks(rows)]
        return torch.cat(chunks)  # [n, C]

    def _chunks(self, rows: list[int]) -> list[list[int]]:
        return micro_batches(rows, self.config.memory.micro_batch_size)

    def _forward(self, rollout: Rollout, rows: list[int], group_size: int) -> Tensor:
        rows_t = torch.tensor(rows)
        prompts = rows_t // group_size  # [m]
        with self.run.autocast():
            return token_values(
                self.model,
                rollout.prompt_ids[prompts],
                rollout.prompt_mask[prompts],
                rollout.completion_ids[rows_t],
                rollout.completion_mask[rows_t],
            )  # [m, C]

    def update(self, rollout: Rollout, group_size: int, old_values: Tensor, returns: Tensor, mask: Tensor) -> dict:
        """algorithm.num_iterations passes of algorithm.updates_per_pass optimizer steps (step p: rows p modulo the
        steps, as the policy's `update_parts`) on the clipped value loss, a token mean over the step's kept tokens
        on all ranks; so the update does not depend on the world size. `mask` [n, C]: the tokens trained (0 rows:
        none). Every rank holds the same number of rows, so makes the same forward and backward calls."""
        a, c = self.config.algorithm, self.config.critic
        n = mask.shape[0]
        steps = a.updates_per_pass
        parts = [[i for i in range(n) if i % steps == p] for p in range(steps)]
        losses, clipfracs, norms = [], [], []
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        for _ in range(a.num_iterations):
            for part in parts:
                denominator = max(float(self.run.sum(mask[part].sum())), 1.0)  # the step's kept tokens, all ranks
                self.optimizer.zero_grad(set_to_none=True)
                chunks = self._chunks(part)
                for index, chunk in enumerate(chunks):
                    with self.run.sync_gradients(self.model, last=index == len(chunks) - 1):
                        values = self._forward(rollout, chunk, group_size)  # [m, C]
                        per_token, metrics = clipped_value_loss(
                            values, old_values[chunk], returns[chunk], mask[chunk], c.value_clip
                        )  # [m, C]
                        share = per_token.sum() / denominator
                        if not torch.isfinite(share):
                            raise FloatingPointError(f"the critic's loss is {share.item()}")
                        self.run.backward(share)
                    losses.append(float(self.run.sum(share.detach())))
                    clipfracs.append(metrics["value_clipfrac"])
                norms.append(self.run.clip_grad_norm(self.model, params, c.max_grad_norm))
                self.optimizer.step()
        self.model.eval()
        steps_done = a.num_iterations * steps
        return {
            "value_loss": sum(losses) / steps_done,  # per optimizer step: the global token mean
            "value_clipfrac": sum(clipfracs) / max(len(clipfracs), 1),  # this rank's micro-batches
            "value_grad_norm": sum(norms) / len(norms),
        }

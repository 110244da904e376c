"""Truncated PPO (algorithm.name: t_ppo): Fan et al. 2025, "Truncated Proximal Policy Optimization"
(arXiv:2506.15050), on llmalign's PPO (llmalign.ppo: the critic, GAE, the policy's and critic's updates).

    llmalign grpo --config configs/llm/arith_t_ppo.yaml
    accelerate launch --multi_gpu --num_processes 2 -m llmalign grpo --config configs/llm/arith_t_ppo.yaml

Each iteration holds B = train.prompts_per_iteration responses (one per prompt: train.group_size is 1): the
unfinished ones carried over from the last iteration first, in order, then new prompts filling the batch (a
stream of seeded permutations of the training rows, `stream_rows`). Every response grows by up to W =
algorithm.window_tokens tokens (its window), and
- the policy trains on every window, finished or not, conditioned on the prompt and the response so far, with
  EGAE's advantages (shared.gae.egae_advantages): an unfinished window bootstraps from V(s_{l-1}), a finished one
  ends in a terminal state with its reward on its last token;
- the critic trains only on finished responses, all their tokens, on GAE's returns computed from its values on the
  whole response (the paper's decoupled critic: no target for an unfinished response);
- unfinished responses carry over to the next iteration (the buffer, saved in every checkpoint: --resume continues
  them bit for bit).
A response finishes at EOS or at sampling.max_new_tokens (then a truncated, terminal one, as in ppo). With W =
max_new_tokens every response finishes in its first window, EGAE is GAE, and an iteration is ppo's on the same
samples (tested).

Sampling: each response's window draws from its own generator, seeded by (train.seed, the response's draw number,
its length so far), through `SeededRowSampler` inside transformers' `generate`; so the tokens of a response do
not depend on which rank holds it nor on the other rows of its batch, and 1 process samples what 2 do.

Not checked against the paper (no official code; its method sections were not readable from here): how it
aggregates the policy loss over windows of different lengths (here algorithm.loss, as ppo), its lambda for the
policy and the critic (one algorithm.gae_lambda here), whether it trains the policy again on the earlier windows
of a response once it finishes (not here: each token is trained once, in its own window), its token filtering
beyond what is above, and how new prompts fill the batch (here one response per freed slot).
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import Tensor

from llmalign.config import GRPOConfig
from llmalign.critic import Critic, check_critic_source
from llmalign.data import iteration_rows
from llmalign.evaluate import Rollout, derived_seed, pad_left
from llmalign.ppo import CriticTargets, critic_targets, ppo_update, total_rewards
from llmalign.rollout import score
from shared.loop import Plan
from shared.reward_calls import RewardError
from shared.run import Run


class SeededRowSampler:
    """A logits processor that samples each row's next token from its own torch.Generator (temperature and top_p
    applied with transformers' own warpers) and hands `generate` a one-hot score, which its greedy search then
    takes: the tokens are a function of each row's logits and generator alone, not of the global RNG."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.warpers = LogitsProcessorList()
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)  # [N, V]
        picked = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])  # [N]
        chosen = torch.full_like(scores, -float("inf"))  # [N, V]
        return chosen.scatter_(1, picked[:, None], 0.0)


@torch.no_grad()
def sample_windows(
    policy, tokenizer, contexts: list[list[int]], limits: list[int], seeds: list[int], temperature: float, top_p: float
) -> list[list[int]]:
    """Each context's next tokens, up to its limit or its EOS (kept), sampled by `SeededRowSampler`."""
    from transformers import LogitsProcessorList

    device = next(policy.parameters()).device
    ids, mask = pad_left(contexts, tokenizer.pad_token_id)  # [n, P]
    was_training = policy.training
    policy.eval()
    output = policy.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max(limits),
        do_sample=False,
        logits_processor=LogitsProcessorList([SeededRowSampler(seeds, temperature, top_p, device)]),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # [n, P + C']
    policy.train(was_training)
    windows = []
    for row, limit in zip(output[:, ids.shape[1] :].tolist(), limits):
        row = row[:limit]
        cut = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        windows.append(row[:cut])
    return windows


def as_rollout(tokenizer, contexts: list[list[int]], completions: list[list[int]], truncated: list[bool]) -> Rollout:
    """A Rollout of one completion per context: contexts left-padded, completions right-padded."""
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = pad_left(contexts, pad)  # [n, P]
    width = max(1, max(len(c) for c in completions))
    completion_ids = torch.tensor([c + [pad] * (width - len(c)) for c in completions], dtype=torch.long)  # [n, C]
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])  # [n, C]
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, torch.tensor(truncated), texts)


def moved(rollout: Rollout, device) -> Rollout:
    tensors = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated")
    return dataclasses.replace(rollout, **{name: getattr(rollout, name).to(device) for name in tensors})


@dataclasses.dataclass
class Response:
    """A response in flight: its training row, its draw number (its sampling seeds' stream), its tokens so far."""

    row: int
    uid: int
    tokens: list[int]


@dataclasses.dataclass
class WindowBatch:
    """An iteration's windows (this rank's rows), in the shape `GRPORecipe.update` and `ppo_update` read."""

    iteration: int
    carried: int  # responses carried into this iteration (global)
    rollout: Rollout  # contexts (prompt + response so far) -> windows
    full: Rollout  # prompts -> whole responses so far, windows included
    finished: Tensor  # [n] bool
    rewards: Tensor  # [n] the finished responses' total reward, 0 for the others
    trained_keep: Tensor  # [n] rows that train (a dropped score, or a truncated response under mask_truncated: not)
    timings: dict[str, float]
    generated: int  # tokens generated this iteration, all ranks
    finished_rewards: list[float]  # every rank's finished responses' total rewards (NaN: dropped)
    finished_lengths: list[int]  # their lengths
    responses: list[Response]  # the global batch, before this iteration's windows
    windows: list[list[int]]  # this rank's windows' tokens
    advantages: Tensor | None = None  # [n, C] set by the advantage stage
    targets: CriticTargets | None = None
    groups: None = None  # all the same size (1)
    token_mask: None = None  # every window token the completion mask keeps trains (no SPO probability mask)

    @property
    def sampled(self) -> WindowBatch:  # GRPORecipe.update reads trained.sampled.iteration and .timings
        return self

    @property
    def correct(self) -> Tensor:  # the objectives' labels, unused by grpo/dr_grpo/dapo
        return torch.zeros_like(self.trained_keep)


def stream_rows(rows: list[dict], start: int, count: int, seed: int) -> list[dict]:
    """Positions start .. start + count - 1 of the prompt stream: epochs of seeded permutations (`iteration_rows`)."""
    return [iteration_rows(rows, k, 1, seed)[0] for k in range(start, start + count)]


class TPPORecipe:
    """T-PPO in the loop's stages: windows of every in-flight response, EGAE, the policy's and critic's updates."""

    def __init__(self, config: GRPOConfig, grpo):
        self.config = config
        self.grpo = grpo  # a llmalign.grpo.GRPORecipe on the same config: setup, evaluation, policy update, save
        self.window = config.algorithm.window_tokens or config.sampling.max_new_tokens

    def setup(self, run: Run) -> Plan:
        self.run = run
        check_critic_source(self.config)
        plan = self.grpo.setup(run)
        self.critic = Critic.setup(run, self.config)
        self.inflight: list[Response] = []
        self.drawn = 0  # prompts taken from the stream so far
        if run.checkpoint is not None:
            state = run.load("t_ppo")
            self.inflight = [Response(int(r), int(u), [int(t) for t in toks]) for r, u, toks in state["inflight"]]
            self.drawn = int(state["drawn"])
        run.print(
            f"t_ppo: windows of {self.window} tokens (sampling.max_new_tokens {self.config.sampling.max_new_tokens}), "
            f"{len(self.inflight)} responses in flight"
        )
        loss = self.config.algorithm.loss
        return dataclasses.replace(plan, label=f"t_ppo[{loss}]", title=f"T-PPO ({loss}) on {self.config.model.path}")

    def rollout(self, iteration: int) -> WindowBatch:
        run, config, s = self.run, self.config, self.config.sampling
        clock = time.perf_counter()
        B = config.train.prompts_per_iteration
        fresh = stream_rows(self.grpo.train_rows, self.drawn, B - len(self.inflight), config.train.seed)
        batch = self.inflight + [Response(row["_index"], self.drawn + k, []) for k, row in enumerate(fresh)]
        carried, self.drawn = len(self.inflight), self.drawn + len(fresh)
        mine = batch[run.block(B).start : run.block(B).stop]
        rows = [self.grpo.train_rows[r.row] for r in mine]
        contexts = [row["_ids"] + r.tokens for row, r in zip(rows, mine)]
        limits = [min(self.window, s.max_new_tokens - len(r.tokens)) for r in mine]
        seeds = [derived_seed(config.train.seed, r.uid, len(r.tokens), 6) for r in mine]
        with run.unwrapped_for_generation(self.grpo.model) as policy:
            windows = sample_windows(policy, self.grpo.tokenizer, contexts, limits, seeds, s.temperature, s.top_p)
        eos = self.grpo.tokenizer.eos_token_id
        ended = [bool(w) and w[-1] == eos for w in windows]
        finished = [e or len(r.tokens) + len(w) >= s.max_new_tokens for e, r, w in zip(ended, mine, windows)]
        cut = [f and not e for f, e in zip(finished, ended)]  # hit max_new_tokens without EOS
        tokenizer = self.grpo.tokenizer
        window_rollout = moved(as_rollout(tokenizer, contexts, windows, cut), run.device)
        full = moved(
            as_rollout(tokenizer, [row["_ids"] for row in rows], [r.tokens + w for r, w in zip(mine, windows)], cut),
            run.device,
        )
        timings = {"time/rollout": time.perf_counter() - clock}
        rewards, keep, finished_rewards = self.score(iteration, rows, full, finished, timings)
        if config.algorithm.mask_overlong:
            keep &= ~torch.tensor(cut)
        generated = int(run.sum(sum(len(w) for w in windows)))
        self.grpo.generated_total += generated
        lengths = [len(r.tokens) + len(w) for r, w, f in zip(mine, windows, finished) if f]
        return WindowBatch(
            iteration,
            carried,
            window_rollout,
            full,
            torch.tensor(finished, device=run.device),
            rewards.to(run.device),
            keep.to(run.device),
            timings,
            generated,
            finished_rewards,
            [n for part in run.gather_objects([lengths]) for n in part],
            batch,
            windows,
        )

    def score(self, iteration: int, rows: list[dict], full: Rollout, finished: list[bool], timings: dict):
        """The configured rewards of this rank's finished responses (scored whole); returns rewards [n] (0 for the
        unfinished), keep [n] (False where a score was dropped) and every rank's finished totals."""
        config = self.config
        clock = time.perf_counter()
        done = [i for i, f in enumerate(finished) if f]
        rewards, keep = torch.zeros(len(rows)), torch.ones(len(rows), dtype=torch.bool)
        failure, totals = None, []
        if done:
            index = torch.tensor(done)
            sub = Rollout(
                full.prompt_ids[index],
                full.prompt_mask[index],
                full.completion_ids[index],
                full.completion_mask[index],
                full.truncated[index],
                [full.texts[i] for i in done],
            )
            columns = [{k: v for k, v in rows[i].items() if not k.startswith("_")} for i in done]
            try:
                scores = score(
                    self.grpo.rewards,
                    [rows[i]["_text"] for i in done],
                    sub,
                    columns,
                    1,
                    iteration,
                    config.sampling.max_new_tokens,
                    config.reward.on_bad_score == "drop",
                )
                total = total_rewards(config, scores)  # [d]
                bad = torch.stack(list(scores.values())).isnan().any(dim=0)  # [d]
                rewards[index], keep[index] = total.float(), ~bad
                totals = total.masked_fill(bad, float("nan")).tolist()
            except RewardError as error:
                failure = str(error)
        failure = self.run.first_failure(failure)
        if failure is not None:
            raise RewardError(failure)
        timings["time/reward"] = time.perf_counter() - clock
        return rewards, keep, [x for part in self.run.gather_objects([totals]) for x in part]

    def advantage(self, batch: WindowBatch) -> WindowBatch:
        """EGAE on the windows; the critic's targets on the finished responses whole (on the windows themselves
        when every response of the global batch is finished in its first window: they are then the same rows)."""
        run, config = self.run, self.config
        whole = batch.carried == 0 and int(run.sum(int((~batch.finished).sum()))) == 0  # decided alike on every rank
        side = None if whole else (batch.full, batch.finished & batch.trained_keep)
        batch.targets = critic_targets(
            run, config, self.critic, batch.rollout, 1, batch.rewards, batch.trained_keep, batch.finished, side
        )
        batch.advantages = batch.targets.advantages
        return batch

    def update(self, batch: WindowBatch) -> dict:
        metrics = ppo_update(self.grpo, self.critic, batch, batch.targets)
        self.carry(batch)
        return metrics

    def carry(self, batch: WindowBatch) -> None:
        """The unfinished responses, every rank's in batch order, become the next iteration's first ones."""
        B = self.config.train.prompts_per_iteration
        block = self.run.block(B)
        mine = [
            (block.start + k, window)
            for k, (window, done) in enumerate(zip(batch.windows, batch.finished.tolist()))
            if not done
        ]
        grown = dict(item for part in self.run.gather_objects([mine]) for item in part)
        self.inflight = [
            Response(r.row, r.uid, r.tokens + grown[k]) for k, r in enumerate(batch.responses) if k in grown
        ]

    def record(self, batch: WindowBatch, metrics: dict) -> dict:
        totals = [x for x in batch.finished_rewards if x == x]  # NaN: dropped
        lengths = batch.finished_lengths
        record = {
            **{f"train/{k}": v for k, v in metrics.items()},
            "train/finished": len(batch.finished_rewards),
            "train/carried_in": batch.carried,
            "train/in_flight": len(self.inflight),
            "train/generated_tokens": batch.generated,
            "train/generated_tokens_total": self.grpo.generated_total,
            **batch.timings,
        }
        if totals:  # iterations where no response finishes have no reward to log
            record["reward/total/mean"] = sum(totals) / len(totals)
        if lengths:
            record["completion/mean_length"] = sum(lengths) / len(lengths)
        return record

    def save(self, done: int) -> None:
        state = {"inflight": [[r.row, r.uid, r.tokens] for r in self.inflight], "drawn": self.drawn}
        self.grpo.save(done, {**self.critic.states(), "t_ppo": state})

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
        return {
            "reward": f"{record.get('reward/total/mean', float('nan')):.3f}",
            "in_flight": record["train/in_flight"],
            "vloss": f"{record.get('train/value_loss', float('nan')):.3f}",
        }

    def closing(self) -> str:
        return self.grpo.closing()

    @property
    def engine(self):
        return self.grpo.engine

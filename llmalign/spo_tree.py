"""SPO-tree in `llmalign grpo` (Guo et al. 2025, arXiv:2505.23564): algorithm.name=spo_tree.

    llmalign grpo --config configs/llm/arith_spo_tree.yaml
    llmalign grpo --config configs/llm/arith.yaml algorithm.name=spo_tree algorithm.loss=dapo \\
        algorithm.spo_tree_branching=[4,2] algorithm.spo_tree_segment_tokens=24

Per prompt a tree of segments (`grow_tree`): from the prompt b_1 segments of M = spo_tree_segment_tokens tokens,
from each of them b_2 more, ..., the last level running to sampling.max_new_tokens. The b_1 x ... x b_D paths from
the prompt to a leaf are the prompt's group (train.group_size completions, so GRPO's rollout shape, scoring, update,
Prefix Grouper and checkpoints all apply). A leaf's value is its completion's weighted reward (reward.weights, raw
scores), an internal node's the mean of its children's (shared.spo.spo_tree_values), and the segment into node i
gets A_i = V(i) - V(parent) (spo_tree_advantage=rloo) or that over the std of its siblings' values + 1e-8 (grpo)
(shared.spo.spo_tree_advantages). The per-token advantages are whitened over the batch's kept tokens (spo_whiten).

How the edges train (departure from the official code, which makes one training row per edge: the prompt and the
parent's text as its prompt, the segment as its completion): here each edge's tokens train inside the first leaf
row below it (`tree_token_advantages`): leaf k holds the segments of every node on its path, at the same positions
after the same prefix, so the log-probs are those of the edge row; the other leaf rows below that node mask those
tokens out, so every edge trains once. The forward is one pass per leaf over its whole path (GRPO's), and the
prompt is shared by the group (algorithm.shared_prefix: Prefix Grouper applies unchanged); the parents' text is not
re-encoded per edge, which a row per edge would need (Prefix Grouper shares one prefix per group, not a tree of
them). The sum over tokens equals the edge rows' exactly, so algorithm.loss=dapo (token mean over the batch) gives
the edge-row loss; grpo's per-row mean weighs a leaf row's edges by their share of its kept tokens instead.

A row left out of the loss (a dropped score, algorithm.mask_truncated, on by default for dapo) takes the edges
trained in it along: keep mask_truncated off with spo_tree (configs/llm/arith_spo_tree.yaml does).

As the official code: edges whose advantage is exactly 0 are dropped (their tokens masked, also from the whitening
statistics); the fixed windows are the official tree's (600 tokens there). A node that finished early (EOS inside
its segment) is a leaf of the official tree; here its children are copies of it with empty segments, so the group
keeps G rows: every copy carries its reward, its value is that reward and its parent's mean is the official one.
Its copies count as rollouts of the group in the reward statistics (reward/total/mean weighs it by its copies).
Edges are not replayed across iterations (the official code replays them for up to 8).

Every sampled token counts once in train/generated_tokens (a node's segment is generated once, whatever its
leaves): the tree shares its prefixes, so a group costs less than G independent completions.

World-size invariance: the segments of global prompt p at level d are one generate call seeded by
derived_seed(seed, iteration, p, d, 8) (transformers), or per-segment seeds (vLLM); never the rank.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import Tensor

from llmalign.config import GRPOConfig
from llmalign.data import iteration_rows
from llmalign.engines import HFEngine
from llmalign.evaluate import Rollout, derived_seed, pad_left
from llmalign.rollout import IterationRollout, RefillPlan, RoundSample, gathered_scores, informative_groups, score
from llmalign.spo import global_whiten
from shared.reward_calls import RewardError
from shared.run import Run
from shared.spo import spo_tree_advantages, spo_tree_values


@dataclasses.dataclass
class Leaf:
    """One path from the prompt: its tokens (EOS included when it ended), whether it ended, the engine's log-prob
    of each token (None when the engine reports none)."""

    ids: list[int]
    ended: bool
    logprobs: list[float] | None


def grow_tree(
    sampler, config: GRPOConfig, prompt: list[int], iteration: int, global_prompt: int
) -> tuple[list[Leaf], int]:
    """The G = prod(branching) leaves of one prompt's tree, in node-major order (leaf k's ancestor at level d is
    node k // prod(branching[d:]) of that level), and the tokens generated. Level d's open nodes are continued in one
    call; a node that ended is copied into its children unchanged (empty segments)."""
    a, s, seed = config.algorithm, config.sampling, config.train.seed
    branching, M = a.spo_tree_branching, a.spo_tree_segment_tokens
    nodes, generated = [Leaf([], False, [])], 0
    for d, b in enumerate(branching):
        budget = s.max_new_tokens - (len(branching) - 1) * M if d == len(branching) - 1 else M
        children: list[Leaf | None] = [node if node.ended else None for node in nodes for _ in range(b)]
        open_ = [k for k, node in enumerate(nodes) if not node.ended]
        if open_:
            torch.manual_seed(derived_seed(seed, iteration, global_prompt, d, 8))  # transformers: torch's global RNG
            out = sampler.generate(
                [prompt + nodes[k].ids for k in open_],
                b,
                budget,
                temperature=s.temperature,
                top_p=s.top_p,
                seeds=[derived_seed(seed, iteration, global_prompt, d, k, c, 9) for k in open_ for c in range(b)],
                sampling_logprobs=True,
            )  # [len(open_) * b] rows, node-major
            generated += int(out.lengths.sum())
            for q, k in enumerate(open_):
                parent = nodes[k]
                for c in range(b):
                    r, n = q * b + c, int(out.lengths[q * b + c])
                    logprobs = None
                    if parent.logprobs is not None and out.sampling_logprobs is not None:
                        logprobs = parent.logprobs + out.sampling_logprobs[r, :n].tolist()
                    ended = not bool(out.truncated[r])
                    children[k * b + c] = Leaf(parent.ids + out.completion_ids[r, :n].tolist(), ended, logprobs)
        nodes = children
    return nodes, generated


def leaves_rollout(tokenizer, prompts: list[list[int]], leaves: list[Leaf], device) -> Rollout:
    """The block's trees as `generate` returns a rollout: prompts left-padded, leaves right-padded (EOS in the
    mask), the engine's log-probs (0 on padding; None when any leaf has none)."""
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = pad_left(prompts, pad)
    width = max(max(len(leaf.ids) for leaf in leaves), 1)
    ids = torch.tensor([leaf.ids + [pad] * (width - len(leaf.ids)) for leaf in leaves])  # [n, C]
    mask = torch.tensor([[1] * len(leaf.ids) + [0] * (width - len(leaf.ids)) for leaf in leaves])  # [n, C]
    logprobs = None
    if all(leaf.logprobs is not None for leaf in leaves):
        logprobs = torch.tensor([leaf.logprobs + [0.0] * (width - len(leaf.ids)) for leaf in leaves])  # [n, C]
    texts = tokenizer.batch_decode([leaf.ids for leaf in leaves], skip_special_tokens=True)
    truncated = torch.tensor([not leaf.ended for leaf in leaves])  # [n]
    on = lambda x: None if x is None else x.to(device)
    return Rollout(on(prompt_ids), on(prompt_mask), on(ids), on(mask), on(truncated), texts, on(logprobs))


def tree_rollout(run: Run, config: GRPOConfig, recipe, iteration: int) -> IterationRollout:
    """The spo_tree rollout stage: this rank's block of the iteration's prompts, a tree each (`grow_tree`), scored
    by the rewards with every reward's values gathered; the shape `sample_iteration` returns."""
    t, s = config.train, config.sampling
    G, clock = t.group_size, time.perf_counter()
    rows = iteration_rows(recipe.train_rows, iteration, t.prompts_per_iteration, t.seed)  # the global batch
    block = run.block(len(rows))
    mine = rows[block.start : block.stop]
    leaves, generated = [], 0
    with run.unwrapped_for_generation(recipe.model) as policy:
        sampler = recipe.engine or HFEngine(policy, recipe.tokenizer)
        for offset, row in enumerate(mine):
            grown, more = grow_tree(sampler, config, row["_ids"], iteration, block.start + offset)
            leaves += grown
            generated += more
    rollout = leaves_rollout(recipe.tokenizer, [row["_ids"] for row in mine], leaves, run.device)
    timings = {"time/rollout": time.perf_counter() - clock, "time/reward": 0.0}
    clock = time.perf_counter()
    columns = [{k: v for k, v in row.items() if not k.startswith("_")} for row in mine]
    local, failure = None, None
    try:
        drop_bad = config.reward.on_bad_score == "drop"
        texts = [row["_text"] for row in mine]
        local = score(
            recipe.rewards, texts, rollout, columns, G, iteration, s.max_new_tokens, drop_bad, block.start * G
        )
    except RewardError as error:
        failure = str(error)
    scores = gathered_scores(run, local, failure)  # name -> [B*G]
    timings["time/reward"] = time.perf_counter() - clock
    informative = int(informative_groups(scores, config.reward.weights, G).sum())
    plan = RefillPlan([(0, g) for g in range(len(rows))], informative, 0, len(rows), len(rows) - informative)
    batch = RoundSample(rows, block, rollout, scores, generated=generated)
    return IterationRollout(iteration, batch, [G] * len(rows), G, plan, int(run.sum(generated)), timings, {}, {})


def tree_parents(branching: list[int]) -> Tensor:
    """[1 + b_1 + b_1 b_2 + ...] the parent of each node of one tree, level-major (the root, a prompt, is node 0 with
    parent -1; node j of level d has parent j // b_d of level d - 1)."""
    parents, first, width = [-1], 0, 1  # first: index of the previous level's first node
    for b in branching:
        parents += [first + j // b for j in range(width * b)]
        first, width = first + width, width * b
    return torch.tensor(parents)


def tree_token_advantages(
    config: GRPOConfig, rewards: Tensor, lengths: Tensor, width: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One group's per-token advantages [G, width] and token mask [G, width] from its leaves' rewards [G] and
    completion lengths [G]: the token at position t of leaf k is in the level-d segment (d = min(t // M, D - 1)),
    carries the advantage of the edge into its level-d ancestor, and trains only in the first leaf below that
    ancestor and when that advantage is not 0. Also returns the tree's node values."""
    a = config.algorithm
    branching, M, D = a.spo_tree_branching, a.spo_tree_segment_tokens, len(a.spo_tree_branching)
    parents = tree_parents(branching)  # [nodes]
    G = rewards.numel()
    node_rewards = torch.cat([torch.zeros(len(parents) - G, dtype=rewards.dtype), rewards])  # leaves last
    values = spo_tree_values(parents, node_rewards)  # [nodes]
    edge = spo_tree_advantages(parents, values, a.spo_tree_advantage)  # [nodes]
    advantages = torch.zeros(G, width, dtype=rewards.dtype)  # [G, width]
    mask = torch.zeros(G, width, dtype=torch.long)  # [G, width]
    first = 1  # the first node of level d + 1 (level 1 starts after the root)
    for d in range(D):
        below = math.prod(branching[d + 1 :])  # leaves under a node of level d + 1
        start, stop = d * M, (d + 1) * M if d < D - 1 else width
        for k in range(G):
            node = first + k // below
            end = min(stop, int(lengths[k]))
            advantages[k, start:end] = edge[node]
            if k % below == 0 and edge[node] != 0:
                mask[k, start:end] = 1
        first += math.prod(branching[: d + 1])
    return advantages, mask, values


class SPOTreeRecipe:
    """SPO-tree in the loop's stages: GRPO's recipe (`base`) with its rollout replaced by the trees
    (`tree_rollout`) and its advantage by the edge advantages. Every other stage and hook is GRPO's, reached through
    `__getattr__` (composition: the loop asks the recipe for optional hooks by name)."""

    def __init__(self, config: GRPOConfig, base):
        self.config, self.base = config, base

    def __getattr__(self, name: str):
        if name == "base":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def setup(self, run: Run):
        plan = self.base.setup(run)
        a, s = self.config.algorithm, self.config.sampling
        levels = " x ".join(str(b) for b in a.spo_tree_branching)
        run.print(
            f"spo_tree: a tree of {levels} segments per prompt, {a.spo_tree_segment_tokens} tokens each but the last "
            f"level's (to {s.max_new_tokens}), {a.spo_tree_advantage} edge advantages, "
            f"{'whitened' if a.spo_whiten else 'not whitened'}"
        )
        title = f"SPO-tree ({a.loss}) on {self.config.model.path}"
        return dataclasses.replace(plan, label=f"spo_tree[{a.loss}]", title=title)

    def rollout(self, iteration: int) -> IterationRollout:
        base, clock = self.base, time.perf_counter()
        if base.engine is not None:  # colocate: the engine samples from the weights of the last optimizer step
            base.engine.push_policy(base.run.unwrap(base.model))
        pushed = time.perf_counter() - clock
        sampled = tree_rollout(base.run, self.config, base, iteration)
        if base.engine is not None:
            sampled.timings["time/weight_push"] = pushed
        base.generated_total += sampled.generated
        return sampled

    def advantage(self, sampled: IterationRollout):
        """GRPO's advantage stage for what it decides (statistics, dropped samples, filters), then this rank's
        groups get their trees' per-token advantages and token mask (`tree_token_advantages`), whitened over the
        global batch's kept tokens."""
        run, config = self.base.run, self.config
        trained = self.base.advantage(sampled)
        batch, G = sampled.batch, sampled.first_size
        total = sum(config.reward.weights[n] * v.nan_to_num(0.0) for n, v in batch.scores.items())  # [N]
        own = total[batch.block.start * G : batch.block.stop * G].double()  # [n]
        lengths = batch.rollout.lengths.cpu()  # [n]
        width = batch.rollout.completion_ids.shape[1]
        pieces = [
            tree_token_advantages(config, own[g : g + G], lengths[g : g + G], width) for g in range(0, len(own), G)
        ]
        advantages = torch.cat([p[0] for p in pieces])  # [n, C]
        mask = torch.cat([p[1] for p in pieces])  # [n, C]
        kept = mask * trained.trained_keep.cpu()[:, None].long()  # [n, C]
        whitened = global_whiten(run, advantages, kept) if config.algorithm.spo_whiten else None
        advantages = advantages if whitened is None else whitened  # [n, C]
        trained.advantages = advantages.to(trained.advantages.dtype).to(run.device)  # [n, C]
        trained.token_mask = mask.to(run.device)  # [n, C]
        edges = sum(int(len(p[2]) - 1) for p in pieces)  # every edge of this rank's trees
        self.tree_log = {
            "train/spo_tree_edges": int(run.sum(edges)),
            "train/spo_tree_trained_tokens": int(run.sum(int(kept.sum()))),
            "train/spo_whitened": whitened is not None,
        }
        return trained

    def record(self, trained, metrics: dict) -> dict:
        return {**self.base.record(trained, metrics), **self.tree_log}  # this iteration's (advantage stage)

"""Generation and held-out accuracy, shared by the trainers, `llmalign eval` and the toy build.

`generate` is the rollout engine: left-padded prompts in, right-padded completions out (EOS kept
in the mask so its probability is trained; what follows it is padding). It is the one place that
calls transformers' `generate`, so another engine (vLLM) can stand in by returning a `Rollout`.
With `sampling_logprobs`, it also returns the log-prob of every sampled token under the distribution
it was drawn from (`SampledTokenLogprobs`), which the trainer compares with its own
(shared.rollout_correction).
"""

from __future__ import annotations

import hashlib

import math

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from shared.run import Run


@dataclass
class Rollout:
    """A batch of generations: B prompts, G completions each (rows g*G .. g*G+G-1 share prompt g)."""

    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P]
    completion_ids: Tensor  # [B*G, C] right-padded
    completion_mask: Tensor  # [B*G, C] real tokens, EOS included
    truncated: Tensor  # [B*G] bool: hit max_new_tokens without EOS
    texts: list[str]  # [B*G] decoded completions, special tokens skipped
    # [B*G, C] the engine's log-prob of each sampled token under the distribution it sampled from (temperature and
    # top_p applied), float32; NaN where the engine did not sample the token (a forced trigger, a replayed row);
    # meaningful under completion_mask only. None: the engine reports none.
    sampling_logprobs: Tensor | None = None

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(dim=1)  # [B*G]

    def token_lists(self) -> list[list[int]]:
        """Each completion's ids without padding or EOS (what length rewards count)."""
        out = []
        for ids, mask, cut in zip(self.completion_ids.tolist(), self.completion_mask.tolist(), self.truncated.tolist()):
            n = sum(mask)
            out.append(ids[: n if cut else n - 1])
        return out


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences], dtype=torch.long)  # [B, P]
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], dtype=torch.long)  # [B, P]
    return ids, mask


# sampling warpers transformers applies from a model's own generation_config that `SampledTokenLogprobs` does not
# mirror: where one is active, `generate` returns no sampling log-probs rather than wrong ones
UNMIRRORED_WARPERS = {"min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None}


class SampledTokenLogprobs:
    """The sampling warpers of `generate` as one logits processor that also records, at every step of transformers'
    sampling loop, the log-prob of the token sampled under the distribution it was sampled from.

    transformers runs a custom processor after its own processors (repetition penalty, ...) and before the sampling
    warpers it appends (temperature, top-k, top-p), then samples from softmax(warped scores). `generate` turns those
    warpers off (temperature 1, top_p 1, top_k 0) and this processor applies the same ones itself, transformers' own
    classes in the order it appends them (temperature, then top-p), so the scores sampled from are the same tensors
    as without it and the tokens the same bit for bit (tested), with the warpers run once. It keeps the
    log-softmax of the warped scores; at the next step the token just sampled is the last column of `input_ids`,
    and the last step's token is read from the output (`finish`). It holds one [N, V] float32 buffer and draws no
    random number."""

    def __init__(self, temperature: float, top_p: float):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        self.warpers = LogitsProcessorList()
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
        self.pending: Tensor | None = None  # [N, V] log-probs of the step whose token is not yet known
        self.steps: list[Tensor] = []  # [N] each, one per token sampled so far

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.pending is not None:  # input_ids[:, -1] is the token sampled from `pending`
            self.steps.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))
        warped = self.warpers(input_ids, scores)  # [N, V] what transformers samples from, through softmax
        self.pending = torch.log_softmax(warped.float(), dim=-1)  # [N, V]
        return warped

    def finish(self, completion_ids: Tensor) -> Tensor:
        """[N, C'] the log-prob of each generated token (`completion_ids` [N, C']); steps transformers ran and then
        undid are dropped."""
        width = completion_ids.shape[1]
        steps = list(self.steps)
        if self.pending is not None and len(steps) < width:
            steps.append(self.pending.gather(1, completion_ids[:, len(steps) : len(steps) + 1]).squeeze(1))
        self.pending = None
        if not steps:
            return torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
        return torch.stack(steps[:width], dim=1)  # [N, C']


def mirrors_sampling(generation_config) -> bool:
    """Whether `SampledTokenLogprobs` reproduces the distribution transformers samples from under this
    generation_config (no warper of UNMIRRORED_WARPERS active)."""
    return all(getattr(generation_config, name, off) in (off, None) for name, off in UNMIRRORED_WARPERS.items())


@torch.no_grad()
def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SHA-256), for streams that must not meet the trainer's other seeds."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generate(
    model,
    tokenizer,
    prompt_token_ids: list[list[int]],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    sampling_logprobs: bool = False,
) -> Rollout:
    """G completions per prompt with `model.generate`. Sampling draws from torch's global RNG, so
    seeding it before the call makes the rollout reproducible (the trainers do, per iteration).
    `sampling_logprobs`: also record the log-prob of each sampled token (`SampledTokenLogprobs`, which then applies
    temperature and top_p; the same tokens are sampled either way); None when greedy, or when the model's
    generation_config turns on a warper it does not mirror (`mirrors_sampling`)."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = pad_left(prompt_token_ids, tokenizer.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    sampling = (
        {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    )
    recorder = None
    if sampling_logprobs and not greedy and mirrors_sampling(model.generation_config):
        from transformers import LogitsProcessorList

        recorder = SampledTokenLogprobs(temperature, top_p)  # applies temperature and top_p itself
        sampling.update(temperature=1.0, top_p=1.0, logits_processor=LogitsProcessorList([recorder]))
    was_training = model.training
    model.eval()
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        num_return_sequences=group_size,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )  # [B*G, P + C']
    model.train(was_training)
    completion_ids = output[:, prompt_ids.shape[1] :]  # [B*G, C']
    logprobs = recorder.finish(completion_ids) if recorder is not None else None  # [B*G, C']
    return completion_rollout(tokenizer, prompt_ids, prompt_mask, completion_ids, logprobs)


def completion_rollout(
    tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, logprobs: Tensor | None = None
) -> Rollout:
    """The `Rollout` of generated `completion_ids` [B*G, C']: each cut after its first EOS (kept in the mask; what
    follows is padding), truncated where there is none, decoded. Shared by `generate` and the masked-diffusion
    sampler (llmalign.diffusion), which fills all C' positions and leaves text after the EOS to be cut here."""
    device = completion_ids.device
    is_eos = completion_ids == tokenizer.eos_token_id  # [B*G, C']
    ended = is_eos.any(dim=1)  # [B*G]
    first_eos = torch.where(
        ended, is_eos.int().argmax(dim=1), torch.full_like(ended, completion_ids.shape[1], dtype=torch.long)
    )
    positions = torch.arange(completion_ids.shape[1], device=device)[None, :]  # [1, C']
    completion_mask = (positions <= first_eos[:, None]).long()  # [B*G, C']; EOS kept, the rest padding
    completion_ids = torch.where(completion_mask.bool(), completion_ids, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(
        [ids[:n] for ids, n in zip(completion_ids.tolist(), completion_mask.sum(dim=1).tolist())],
        skip_special_tokens=True,
    )
    if logprobs is not None:
        logprobs = logprobs.masked_fill(~completion_mask.bool(), 0.0)  # [B*G, C'] padding: 0
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, ~ended, texts, logprobs)


EVAL_BATCH = 64  # held-out rows per generate call

# (rendered prompts, their rollout, their rows) -> reward name -> one score per completion (NaN: dropped)
ScoreFn = Callable[[list[str], Rollout, list[dict]], dict[str, Tensor]]


def accuracy_on(
    model,
    tokenizer,
    rows: list[dict],
    max_new_tokens: int,
    batch_size: int = EVAL_BATCH,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    run: Run | None = None,
    score_fn: ScoreFn | None = None,
    engine=None,
) -> dict:
    """Held-out accuracy (answer extraction and matching of `llmalign.rewards`) and mean completion length in
    tokens (EOS included) over `rows` with `prompt` and `answer`, the (prompt, completion) samples, and each row's
    correctness and length ("correct", "lengths", in the rows' order). With
    `score_fn` (eval.rewards), also "rewards": name -> the mean of its finite scores over the rows; an exception it
    raises on any rank is raised on every rank, after the same generate calls.

    The rows go in chunks of `batch_size`. Over the processes of `run` (None: this process alone), rank r
    generates chunks r, r + W, ... and the results are gathered, so every rank returns the metrics of all rows.
    A sampled chunk k draws from the seed (seed, k) in a forked RNG (the caller's stream is left alone), and a
    chunk holds the same rows whatever the world size, so the result does not depend on it. Every rank makes the
    same number of generate calls (under FSDP each forward is a collective): a rank short of chunks generates its
    last one again and drops the result. `engine` (a `llmalign.engines.VLLMEngine` holding the model's weights;
    `model` is then not used) generates instead, sampled row i of chunk k from the seed derived from (seed, k, i)."""
    from llmalign.data import render_prompt
    from llmalign.rewards import accuracy_reward

    rank, world = (run.rank, run.world) if run is not None else (0, 1)
    chunks = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    mine = list(range(rank, len(chunks), world))
    calls = -(-len(chunks) // world)  # ceil: the busiest rank's count
    results, failure = [], None
    for call in tqdm(range(calls), desc="eval", disable=not progress or rank > 0):
        k = mine[min(call, len(mine) - 1)] if mine else 0
        chunk = chunks[k]
        texts = [render_prompt(tokenizer, row["prompt"]) for row in chunk]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if engine is not None:
            seeds = None if greedy else [derived_seed(seed, k, i, 6) for i in range(len(ids))]
            rollout = engine.generate(ids, 1, max_new_tokens, temperature=temperature, greedy=greedy, seeds=seeds)
        else:
            device = next(model.parameters()).device
            with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
                torch.manual_seed(seed * 1_000_003 + k)
                rollout = generate(model, tokenizer, ids, 1, max_new_tokens, temperature=temperature, greedy=greedy)
        if call < len(mine):
            correct = accuracy_reward(texts, rollout.texts, answer=[row["answer"] for row in chunk])
            scores = {}
            if score_fn is not None and failure is None:
                try:
                    scores = {name: values.tolist() for name, values in score_fn(texts, rollout, chunk).items()}
                except Exception as error:  # raised below on every rank, once all ranks are done generating
                    failure = error
            results.append((k, correct, rollout.lengths.tolist(), list(zip(texts, rollout.texts)), scores))
    if run is not None and score_fn is not None and run.any(failure is not None):
        raise next(error for error in run.gather_objects([failure]) if error is not None)  # the first rank's
    if failure is not None:
        raise failure
    results = sorted(
        run.gather_objects(results) if run is not None else results, key=lambda result: result[0]
    )  # by chunk: the rows' order
    correct = [c for _, chunk, _, _, _ in results for c in chunk]
    lengths = [n for _, _, chunk, _, _ in results for n in chunk]
    n = max(len(correct), 1)
    out = {
        "accuracy": sum(correct) / n,
        "mean_length": sum(lengths) / n,
        "samples": [s for _, _, _, chunk, _ in results for s in chunk],
        "correct": correct,  # per row, in the rows' order
        "lengths": lengths,  # per row, EOS included
    }
    if score_fn is not None:
        scores = {
            name: torch.tensor([v for *_, chunk in results for v in chunk[name]], dtype=torch.float64)
            for name in (results[0][4] if results else {})
        }  # [rows] each
        out["rewards"] = {name: values.nanmean().item() for name, values in scores.items()}  # dropped: left out
    return out


def held_out_metrics(
    model,
    tokenizer,
    rows: list[dict],
    max_new_tokens: int,
    temperature: float = 1.0,
    samples: int = 1,
    seed: int = 0,
    run: Run | None = None,
    score_fn: ScoreFn | None = None,
    engine=None,
) -> dict:
    """What both trainers log and print before and after: greedy accuracy and length, and the sampled accuracy
    at `temperature` averaged over `samples` draws per problem (mean@k; more draws, less noise), on fixed seeds
    without touching the caller's RNG stream; sharded over the processes of `run` (`accuracy_on`), the same on
    every rank. `model` is the plain module (`run.unwrapped_for_generation`). With `score_fn` (eval.rewards),
    eval/<name>: each reward's mean over the greedy completions. `engine`: generates instead (`accuracy_on`)."""
    if not rows:
        return {}
    greedy = accuracy_on(model, tokenizer, rows, max_new_tokens, run=run, score_fn=score_fn, engine=engine)
    sampled = accuracy_on(
        model,
        tokenizer,
        rows * samples,
        max_new_tokens,
        greedy=False,
        temperature=temperature,
        seed=seed,
        run=run,
        engine=engine,
    )
    return {
        "eval/accuracy": greedy["accuracy"],
        "eval/mean_length": greedy["mean_length"],
        "eval/sampled_accuracy": sampled["accuracy"],
        **{f"eval/{name}": value for name, value in greedy.get("rewards", {}).items()},
    }


EVAL_TEMPERATURE = 1.0  # SFT, DPO and iterate have no sampling settings: their held-out sampled accuracy is at T = 1
EVAL_SEED_OFFSET = 12345  # their sampled evaluation draws from train.seed + this, apart from the training draws


@dataclass
class HeldOut:
    """The held-out evaluation of SFT, DPO and iterate (no sampling settings of their own): `held_out_metrics` on
    `rows`, at most data.eval_max_new_tokens new tokens, greedy and sampled at EVAL_TEMPERATURE over
    data.eval_samples draws seeded at seed + EVAL_SEED_OFFSET (seed: train.seed)."""

    run: Run
    rows: list[dict]
    data: Any  # the recipe's data section: eval_max_new_tokens, eval_samples
    seed: int

    def metrics(self, model, tokenizer, engine=None) -> dict:
        """eval/... of `model` ({} without rows), on its plain module (`run.unwrapped_for_generation`; `generate`
        switches it to eval mode and back). `engine`: `model`'s weights are pushed to it and it generates."""
        with self.run.unwrapped_for_generation(model) as policy:
            if engine is not None and self.rows:
                engine.push_policy(policy)
            return held_out_metrics(
                policy,
                tokenizer,
                self.rows,
                self.data.eval_max_new_tokens,
                EVAL_TEMPERATURE,
                self.data.eval_samples,
                seed=self.seed + EVAL_SEED_OFFSET,
                run=self.run,
                engine=engine,
            )

    def describe(self, result: dict) -> str:
        return describe_held_out(result, EVAL_TEMPERATURE, self.data.eval_samples)

    def report_before(self, before: dict) -> None:
        self.run.print(f"held-out accuracy before ({len(self.rows)} problems): {self.describe(before)}")


def describe_held_out(result: dict, temperature: float, samples: int, problems: int | None = None) -> str:
    """The before/after line the trainers print. With the number of `problems`, the greedy accuracy carries its
    standard error: each problem scores 0 or 1, so the sample standard deviation is sqrt(n p (1 - p) / (n - 1)) and
    SE = sqrt(p (1 - p) / (n - 1))."""
    greedy = result["eval/accuracy"]
    error = ""
    if problems is not None and problems >= 2:
        error = f" +- {math.sqrt(greedy * (1 - greedy) / (problems - 1)):.3f}"
    return (
        f"greedy {greedy:.3f}{error}, sampled {result['eval/sampled_accuracy']:.3f} (T={temperature}, "
        f"mean over {samples} sample(s) per problem), greedy mean length {result['eval/mean_length']:.1f} tokens"
    )

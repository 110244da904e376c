"""Generation and held-out accuracy, shared by the trainers, `llmalign eval` and the toy build.

`generate` is the rollout engine: left-padded prompts in, right-padded completions out (EOS kept
in the mask so its probability is trained; what follows it is padding). It is the one place that
calls transformers' `generate`, so another engine (vLLM) can stand in by returning a `Rollout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm


@dataclass
class Rollout:
    """A batch of generations: B prompts, G completions each (rows g*G .. g*G+G-1 share prompt g)."""

    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P]
    completion_ids: Tensor  # [B*G, C] right-padded
    completion_mask: Tensor  # [B*G, C] real tokens, EOS included
    truncated: Tensor  # [B*G] bool: hit max_new_tokens without EOS
    texts: list[str]  # [B*G] decoded completions, special tokens skipped

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


@torch.no_grad()
def generate(model, tokenizer, prompt_token_ids: list[list[int]], group_size: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> Rollout:
    """G completions per prompt with `model.generate`. Sampling draws from torch's global RNG, so
    seeding it before the call makes the rollout reproducible (the trainers do, per iteration)."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = pad_left(prompt_token_ids, tokenizer.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    was_training = model.training
    model.eval()
    output = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
        num_return_sequences=group_size, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )  # [B*G, P + C']
    model.train(was_training)
    completion_ids = output[:, prompt_ids.shape[1]:]  # [B*G, C']
    is_eos = completion_ids == tokenizer.eos_token_id  # [B*G, C']
    ended = is_eos.any(dim=1)  # [B*G]
    first_eos = torch.where(ended, is_eos.int().argmax(dim=1), torch.full_like(ended, completion_ids.shape[1], dtype=torch.long))
    positions = torch.arange(completion_ids.shape[1], device=device)[None, :]  # [1, C']
    completion_mask = (positions <= first_eos[:, None]).long()  # [B*G, C']; EOS kept, the rest padding
    completion_ids = torch.where(completion_mask.bool(), completion_ids, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(
        [ids[:n] for ids, n in zip(completion_ids.tolist(), completion_mask.sum(dim=1).tolist())], skip_special_tokens=True
    )
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, ~ended, texts)


def accuracy_on(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 64,
                greedy: bool = True, temperature: float = 1.0, progress: bool = False) -> dict:
    """Held-out accuracy (answer extraction and matching of `llmalign.rewards`) and mean
    completion length in tokens (EOS included) over `rows` with `prompt` and `answer`."""
    from llmalign.data import render_prompt
    from llmalign.rewards import accuracy_reward

    correct, lengths, samples = [], [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="eval", disable=not progress):
        chunk = rows[start:start + batch_size]
        texts = [render_prompt(tokenizer, row["prompt"]) for row in chunk]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        rollout = generate(model, tokenizer, ids, 1, max_new_tokens, temperature=temperature, greedy=greedy)
        correct += accuracy_reward(texts, rollout.texts, answer=[row["answer"] for row in chunk])
        lengths += rollout.lengths.tolist()
        samples += list(zip(texts, rollout.texts))
    n = max(len(correct), 1)
    return {"accuracy": sum(correct) / n, "mean_length": sum(lengths) / n, "samples": samples}


def held_out_metrics(model, tokenizer, rows: list[dict], max_new_tokens: int, temperature: float = 1.0,
                     samples: int = 1, seed: int = 0) -> dict:
    """What both trainers log and print before and after: greedy accuracy and length, and the
    sampled accuracy at `temperature` averaged over `samples` draws per problem (mean@k; more draws,
    less noise), drawn on fixed seeds without touching the caller's RNG stream."""
    if not rows:
        return {}
    greedy = accuracy_on(model, tokenizer, rows, max_new_tokens)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sampled = accuracy_on(model, tokenizer, rows * samples, max_new_tokens, greedy=False, temperature=temperature)
    return {"eval/accuracy": greedy["accuracy"], "eval/mean_length": greedy["mean_length"],
            "eval/sampled_accuracy": sampled["accuracy"]}


def describe_held_out(result: dict, temperature: float, samples: int) -> str:
    """The before/after line both trainers print."""
    return (f"greedy {result['eval/accuracy']:.3f}, sampled {result['eval/sampled_accuracy']:.3f} (T={temperature}, "
            f"mean over {samples} sample(s) per problem), greedy mean length {result['eval/mean_length']:.1f} tokens")

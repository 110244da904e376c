"""Masked-diffusion language models in llmalign: the unmasking sampler and the coupled log-prob estimate.

A masked-diffusion LM (a transformers *ForMaskedLM with a mask token, loaded by `llmalign.policy.load_policy` with
kind=MASKED_DIFFUSION) writes a completion of fixed length L = sampling.max_new_tokens by unmasking: it starts
from the prompt followed by L mask tokens and, over `steps` steps, predicts every masked position and commits the
most confident predictions, `transfer_counts(L, steps)` of them per step (LLaDA's low-confidence remasking, Nie et
al. 2025, arXiv 2502.09992, Sec. 2.4; its `get_num_transfer_tokens` spreads the remainder over the first steps).
Confidence is the largest probability of a position's distribution (max_prob) or its negative entropy
(neg_entropy; DiffuCoder samples with entropy-ordered unmasking). Rollouts sample each token at a temperature
from per-completion torch.Generators (Gumbel-max, so a completion depends on its seed alone, whatever the batch or
the world size); evaluation takes the argmax. The text after a completion's first EOS is padding
(`llmalign.evaluate.completion_rollout`).

`DiffusionSampler` has a rollout engine's interface (generate / push_policy / close, as llmalign.engines), so GRPO's
rollout stage (llmalign.rollout.sample_iteration, with per-completion seeds) and held-out evaluation
(llmalign.evaluate.accuracy_on) run it unchanged.

`masked_token_logps` is the per-token log-prob estimate the update trains on (shared.masked_diffusion): under
coupled masks the fully masked pass, pass A and pass B in one batched forward, combined by
`coupled_token_logps`; under a single mask, pass A alone (`single_mask_token_logps`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from llmalign.evaluate import Rollout, completion_rollout, pad_left
from shared.masked_diffusion import (
    coupled_pass_inputs,
    coupled_token_logps,
    masks_from_uniforms,
    single_mask_token_logps,
)

CONFIDENCES = ("max_prob", "neg_entropy")


def transfer_counts(length: int, steps: int) -> list[int]:
    """Tokens committed at each of `steps` steps, summing to `length`: length // steps each, one more on the first
    length % steps steps (LLaDA's `get_num_transfer_tokens`)."""
    if not 1 <= steps <= length:
        raise ValueError(f"steps={steps}: use 1 to the completion length {length}")
    base, extra = divmod(length, steps)
    return [base + (step < extra) for step in range(steps)]


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token (left padding gets position 0)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # [N, S]


def masked_lm_logits(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The model's logits [N, S, V] over the whole sequence, bidirectional, padding not attended to."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits


def confidence_of(logits: Tensor, confidence: str) -> Tensor:
    """[N, L] confidence of each position's prediction: max probability or negative entropy."""
    logp = torch.log_softmax(logits, dim=-1)  # [N, L, V]
    if confidence == "max_prob":
        return logp.max(dim=-1).values.exp()  # [N, L]
    finite = logp.clamp(min=torch.finfo(logp.dtype).min)  # a token of probability 0 (the mask) adds 0, not 0 * -inf
    return (logp.exp() * finite).sum(dim=-1)  # [N, L] = -entropy


@torch.no_grad()
def unmask(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    length: int,
    steps: int,
    mask_id: int,
    confidence: str = "max_prob",
    temperature: float = 1.0,
    generators: list[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor]:
    """Unmask `length` completion positions after each (left-padded) prompt [N, P] in `steps` steps. `generators`
    (one per row) sample at `temperature` by Gumbel-max; None takes the argmax (greedy). Returns the completion ids
    [N, L] (no mask token left) and the step at which each position was committed [N, L]."""
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence {confidence!r}: use one of {CONFIDENCES}")
    n, prompt_length = prompt_ids.shape
    device = prompt_ids.device
    ids = torch.cat([prompt_ids, torch.full((n, length), mask_id, device=device)], dim=1)  # [N, P+L]
    attention = torch.cat([prompt_mask, torch.ones(n, length, dtype=prompt_mask.dtype, device=device)], dim=1)
    committed_at = torch.full((n, length), -1, dtype=torch.long, device=device)  # [N, L]
    for step, count in enumerate(transfer_counts(length, steps)):
        logits = masked_lm_logits(model, ids, attention)[:, prompt_length:].float()  # [N, L, V]
        logits[..., mask_id] = -torch.inf  # the mask token is never a prediction
        if generators is None:
            choice = logits.argmax(dim=-1)  # [N, L]
            scaled = logits
        else:
            scaled = logits / temperature
            uniform = torch.stack([torch.rand(logits.shape[1:], generator=g) for g in generators]).to(device)
            gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))  # [N, L, V]
            choice = (scaled + gumbel).argmax(dim=-1)  # [N, L] a draw from softmax(scaled)
        still_masked = committed_at < 0  # [N, L]
        score = confidence_of(scaled, confidence).masked_fill(~still_masked, -torch.inf)  # [N, L]
        chosen = score.topk(count, dim=1).indices  # [N, count]
        commit = torch.zeros_like(still_masked).scatter(1, chosen, True)  # [N, L]
        ids[:, prompt_length:] = torch.where(commit, choice, ids[:, prompt_length:])
        committed_at[commit] = step
    return ids[:, prompt_length:], committed_at


class DiffusionSampler:
    """The unmasking sampler as a rollout engine (the interface of llmalign.engines): `generate` takes token-id
    prompts and returns a `Rollout`; `push_policy` sets the model it samples from (the policy's plain module)."""

    def __init__(self, tokenizer, steps: int, confidence: str = "max_prob", model=None):
        self.tokenizer, self.steps, self.confidence, self.model = tokenizer, steps, confidence, model

    def push_policy(self, policy) -> None:
        self.model = policy

    def close(self) -> None:
        """Nothing to free (llmalign.grpo.train closes an engine after the run)."""

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        group_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        sampling_logprobs: bool = False,
        seeds: list[int] | None = None,
    ) -> Rollout:
        """`group_size` completions of max_new_tokens tokens per prompt; sampled completion k from seeds[k] (one
        per completion, prompt-major), greedy without seeds. top_p and sampling_logprobs are not supported (the
        config refuses top_p < 1; the rollout carries no sampling log-probs)."""
        if top_p < 1.0:
            raise ValueError("the masked-diffusion sampler samples from the full distribution; set top_p to 1")
        if not greedy and (seeds is None or len(seeds) != len(prompt_token_ids) * group_size):
            raise ValueError("sampling needs one seed per completion (greedy needs none)")
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = pad_left(prompt_token_ids, self.tokenizer.pad_token_id)  # [B, P]
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        repeated = torch.arange(len(prompt_token_ids), device=device).repeat_interleave(group_size)  # [B*G]
        generators = None if greedy else [torch.Generator().manual_seed(seed) for seed in seeds]
        completion, _ = unmask(
            model,
            prompt_ids[repeated],
            prompt_mask[repeated],
            max_new_tokens,
            self.steps,
            self.tokenizer.mask_token_id,
            self.confidence,
            temperature,
            generators,
        )  # [B*G, L]
        model.train(was_training)
        return completion_rollout(self.tokenizer, prompt_ids, prompt_mask, completion)


@dataclasses.dataclass
class DiffusionMasks:
    """The masks a rollout's completions are scored under, drawn once per rollout and kept for every update on it
    (the old, reference and policy log-probs all use them): one ratio t for the batch, pass A per row."""

    t: float
    mask_a: Tensor  # [n, C] completion positions masked in pass A (pass B masks the rest of the completion)
    mode: str  # "coupled" (three passes) or "single" (pass A alone)

    def loss_mask(self) -> Tensor | None:
        """[n, C] the tokens that carry an estimate besides the completion mask: mask_a under a single mask (the
        others are not scored), None (all) when coupled."""
        return self.mask_a if self.mode == "single" else None


def draw_masks(t: float, completion_mask: Tensor, row_seeds: list[int], mode: str) -> DiffusionMasks:
    """Pass A's mask of each row, u < t with u ~ U[0, 1) [C] from the row's own seed (a row's masks do not depend on
    the batch it is in or the world size), within the completion (shared.masked_diffusion.masks_from_uniforms)."""
    width = completion_mask.shape[1]
    uniforms = torch.stack([torch.rand(width, generator=torch.Generator().manual_seed(s)) for s in row_seeds])
    mask_a, _ = masks_from_uniforms(completion_mask, t, uniforms.to(completion_mask.device))  # [n, C]
    return DiffusionMasks(t, mask_a, mode)


def masked_token_logps(
    model, rollout: Rollout, rows: list[int], group_size: int, masks: DiffusionMasks, mask_id: int, temperature: float
) -> Tensor:
    """The per-token log-prob estimate [m, C] of the completions `rows` under `masks` (shared.masked_diffusion):
    coupled, the fully masked pass and passes A and B as one batch of 3m sequences; single, pass A alone. The
    log-probs are those of logits / temperature, as the causal recipes'."""
    rows_t = torch.tensor(rows, device=rollout.completion_ids.device)
    prompts = rows_t // group_size  # [m]
    completion, kept = rollout.completion_ids[rows_t], rollout.completion_mask[rows_t].bool()  # [m, C]
    mask_a = masks.mask_a[rows_t]  # [m, C]
    prompt_ids, prompt_mask = rollout.prompt_ids[prompts], rollout.prompt_mask[prompts]  # [m, P]
    ids = torch.cat([prompt_ids, completion], dim=1)  # [m, S]
    attention = torch.cat([prompt_mask, torch.ones_like(completion)], dim=1)  # [m, S]
    outside = torch.zeros_like(prompt_ids, dtype=torch.bool)  # [m, P] the prompt is never masked
    in_completion = lambda mask: torch.cat([outside, mask], dim=1)  # [m, S]
    if masks.mode == "coupled":
        passes = coupled_pass_inputs(
            ids, in_completion(kept), in_completion(mask_a), in_completion(kept & ~mask_a), mask_id
        )  # [3, m, S]
    else:
        passes = torch.where(in_completion(mask_a), torch.full_like(ids, mask_id), ids)[None]  # [1, m, S]
    k, m, width = passes.shape
    logits = masked_lm_logits(model, passes.reshape(k * m, width), attention.repeat(k, 1))  # [k*m, S, V]
    logits = logits[:, prompt_ids.shape[1] :].float() / temperature  # [k*m, C, V]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, completion.repeat(k, 1)[..., None]).squeeze(-1)  # [k*m, C]
    logp = logp.view(k, m, -1)  # [k, m, C]
    if masks.mode == "coupled":
        return coupled_token_logps(logp[0], logp[1], logp[2], mask_a, masks.t, kept)  # [m, C]
    return single_mask_token_logps(logp[0], mask_a, masks.t) * kept  # [m, C]

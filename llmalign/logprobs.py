"""Per-token log-probs of sampled completions under a causal LM, with an optional shared-prefix forward.

For completion i of prompt g (G completions per prompt) and completion token t:

    logp[i, t] = log_softmax(logits(prompt_g + completion_i[:t]) / temperature)[completion_i[t]]

Two ways to compute it, chosen by `shared_prefix` through `_LOGPROB_PATHS`:

- repeated (plain): repeat each prompt G times, one forward over [B*G, P+C], read the logits at
  positions P-1 .. P+C-2.
- shared prefix (Prefix Grouper): forward the B prompts once with a KV cache, repeat the cached keys
  and values G times along the batch, then forward the completions with their queries attending to
  [prompt K/V, own K/V] causally. Completion token 0 is scored by the prompt forward's last logit,
  tokens 1..C-1 by the completion forward's logits 0..C-2. The prompt's attention and MLP run B times
  instead of B*G; gradients reach the prompt's computation through the repeated cache (the backward of
  repeat_interleave sums the G copies), so values and gradients equal the repeated forward's.

Positions count real tokens only: position of a token = number of real (mask 1) tokens before it in its
sequence, so left padding of the prompt does not shift any real token's rotary position, and every
completion's positions start at its prompt's real length.

    from llmalign.logprobs import completion_logprobs
    logp = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                               group_size=G, shared_prefix=True, temperature=1.0)  # [B*G, C]
"""

from __future__ import annotations

import inspect
import operator
from typing import Callable

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["completion_logprobs", "expand_kv_cache", "real_token_positions", "token_logprobs"]


def real_token_positions(mask: Tensor) -> Tensor:
    """Position ids that count real tokens only: pos[b, j] = sum_{k < j} mask[b, k] (an exclusive cumsum).

    Left padding gets position 0 and never shifts the real tokens; right padding continues after the last
    real token (its value does not matter, it is masked).
    """
    mask = mask.long()
    return mask.cumsum(-1) - mask  # [N, T]


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log_softmax(logits / temperature)[target] per position, computed in float32.

    logits [N, C, V], targets [N, C] -> [N, C].
    """
    # float32 log_softmax: in bf16 the log-normaliser of a 100k-word vocabulary loses about two digits.
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [N, C, V]
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, C]


def expand_kv_cache(cache, repeats: int) -> DynamicCache:
    """A new DynamicCache whose every layer holds the keys and values of `cache` repeated `repeats` times
    along the batch: row b becomes rows b*repeats .. (b+1)*repeats-1 (repeat_interleave, dim 0).

    The repeated tensors stay in the autograd graph. Only full-attention `DynamicLayer`s are supported: a
    sliding-window layer may have dropped the start of a long prompt, and linear-attention or quantised
    layers hold other states, so those raise ValueError.
    """
    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"shared_prefix=True needs the model to return a transformers DynamicCache, got "
            f"{type(cache).__name__}; use shared_prefix=False for this model"
        )
    if not cache.layers:
        raise ValueError(
            "shared_prefix=True got an empty KV cache from the prompt forward (no layer stored keys); "
            "use shared_prefix=False for this model"
        )
    pairs = []
    for index, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            raise ValueError(
                f"shared_prefix=True supports only full-attention DynamicLayer caches, but cache layer "
                f"{index} is a {type(layer).__name__}"
                f"{' without keys' if getattr(layer, 'keys', None) is None else ''} (sliding-window, "
                f"linear-attention, quantised or KV-shared layers are not supported); "
                f"use shared_prefix=False for this model"
            )
        pairs.append(
            (
                layer.keys.repeat_interleave(repeats, dim=0),  # [B*G, kv_heads, P, head_dim]
                layer.values.repeat_interleave(repeats, dim=0),
            )
        )
    # The constructor fills one DynamicLayer per (keys, values) pair (transformers names it ddp_cache_data).
    return DynamicCache(pairs)


def _call_options(model) -> tuple[str, bool]:
    """(name of the cache keyword, whether `logits_to_keep` is accepted) for this model's forward.

    transformers 5.x renamed `past_key_values` to `cache` (the old name still works until 5.40 with a
    deprecation warning); a peft wrapper, and a DDP/FSDP wrapper (which keeps the model as `.module`), pass
    keywords through to the model they wrap.
    """
    inner = getattr(model, "module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    parameters = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "logits_to_keep" in parameters


def _returned_cache(outputs):
    cache = outputs.get("cache", None)
    return cache if cache is not None else outputs.get("past_key_values", None)


def repeated_prompt_logprobs(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    group_size: int,
    temperature: float,
) -> Tensor:
    """Plain path: one forward over [prompt_g repeated G times | completions]; logits at P-1 .. P+C-2."""
    P, C = prompt_ids.shape[1], completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids.repeat_interleave(group_size, dim=0), completion_ids], dim=1)  # [B*G, P+C]
    attention_mask = torch.cat([prompt_mask.repeat_interleave(group_size, dim=0), completion_mask], dim=1)
    _, keep = _call_options(model)
    # logits_to_keep=C+1 runs the LM head on the last C+1 positions (P-1 .. P+C-1) only, not on the prompt.
    extra = {"logits_to_keep": C + 1} if keep else {}
    position_ids = real_token_positions(attention_mask)  # [B*G, P+C]
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra
    ).logits  # [B*G, C+1 or P+C, V]
    logits = logits[:, -(C + 1) : -1] if keep else logits[:, P - 1 : P + C - 1]  # [B*G, C, V]
    return token_logprobs(logits, completion_ids, temperature)


def shared_prefix_logprobs(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    group_size: int,
    temperature: float,
) -> Tensor:
    """Prefix Grouper path: prompts forwarded once, their KV cache repeated G times for the completions."""
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        raise ValueError(
            "shared_prefix=True does not support peft prompt-learning adapters (prefix/prompt tuning "
            "own the cache); use shared_prefix=False"
        )
    if (
        model.training
        and torch.is_grad_enabled()
        and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ):
        # transformers drops the KV cache inside checkpointed layers, so the completions would not see the prompt.
        raise ValueError(
            "shared_prefix=True cannot run with activation (gradient) checkpointing enabled "
            "(checkpointed layers drop the KV cache); call model.activation_checkpointing_disable() "
            "or use shared_prefix=False"
        )
    C = completion_ids.shape[1]
    cache_name, keep = _call_options(model)
    prompt_out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=real_token_positions(prompt_mask),
        use_cache=True,
        **({"logits_to_keep": 1} if keep else {}),
    )
    # Left padding puts every prompt's last real token at column P-1: its logit scores completion token 0.
    first = prompt_out.logits[:, -1:].repeat_interleave(group_size, dim=0)  # [B*G, 1, V]
    if C == 1:
        return token_logprobs(first, completion_ids, temperature)
    cache = _returned_cache(prompt_out)
    if cache is None:
        raise ValueError(
            f"shared_prefix=True needs the model to return its KV cache with use_cache=True, but "
            f"{type(model).__name__} returned none; use shared_prefix=False"
        )
    cache = expand_kv_cache(cache, group_size)
    if cache.get_seq_length() != prompt_ids.shape[1]:
        raise ValueError(
            f"shared_prefix=True: the prompt forward cached {cache.get_seq_length()} positions but the "
            f"prompts have {prompt_ids.shape[1]}; use shared_prefix=False for this model"
        )
    # The last completion token's logit scores nothing, so the completion forward takes tokens 0..C-2.
    inputs = completion_ids[:, :-1]  # [B*G, C-1]
    inputs_mask = completion_mask[:, :-1]
    prompt_lengths = prompt_mask.long().sum(-1).repeat_interleave(group_size)  # [B*G]
    position_ids = prompt_lengths[:, None] + real_token_positions(inputs_mask)  # [B*G, C-1]
    attention_mask = torch.cat([prompt_mask.repeat_interleave(group_size, dim=0), inputs_mask], dim=1)  # [B*G, P+C-1]
    # use_cache=True so that every model appends the completion's K/V to the prompt's before attending.
    rest = model(
        input_ids=inputs,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **{cache_name: cache},
    ).logits  # [B*G, C-1, V]
    return token_logprobs(torch.cat([first, rest], dim=1), completion_ids, temperature)  # [B*G, C]


_LOGPROB_PATHS: dict[bool, Callable[..., Tensor]] = {
    False: repeated_prompt_logprobs,
    True: shared_prefix_logprobs,
}


def _check_inputs(
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    group_size: int,
    temperature: float,
) -> None:
    if isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int (completions per prompt), got {group_size!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (logits are divided by it), got {temperature!r}")
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [B, P] with P >= 1, got shape {tuple(prompt_ids.shape)}")
    if completion_ids.ndim != 2 or completion_ids.shape[1] == 0:
        raise ValueError(f"completion_ids must be [B*G, C] with C >= 1, got shape {tuple(completion_ids.shape)}")
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"prompt_mask has shape {tuple(prompt_mask.shape)} but prompt_ids has "
            f"{tuple(prompt_ids.shape)}; they must match"
        )
    if completion_mask.shape != completion_ids.shape:
        raise ValueError(
            f"completion_mask has shape {tuple(completion_mask.shape)} but completion_ids has "
            f"{tuple(completion_ids.shape)}; they must match"
        )
    B = prompt_ids.shape[0]
    if completion_ids.shape[0] != B * group_size:
        raise ValueError(
            f"completion_ids has {completion_ids.shape[0]} rows but B * group_size = {B} * {group_size} "
            f"= {B * group_size}; pass group_size completions per prompt, grouped by prompt"
        )
    if not bool((prompt_mask[:, -1] != 0).all()):
        rows = torch.nonzero(prompt_mask[:, -1] == 0).flatten().tolist()
        raise ValueError(
            f"prompt rows {rows} end in padding (prompt_mask[:, -1] == 0); prompts must be LEFT-padded "
            f"with at least one real token (tokenizer.padding_side = 'left')"
        )


def completion_logprobs(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    group_size: int,
    shared_prefix: bool = False,
    temperature: float = 1.0,
) -> Tensor:
    """Log-prob of every completion token, log_softmax(logits / temperature)[token], as a [B*G, C] tensor.

    model: a transformers causal LM, possibly peft-wrapped. prompt_ids, prompt_mask: [B, P], LEFT-padded.
    completion_ids, completion_mask: [B*G, C], RIGHT-padded; rows g*G .. (g+1)*G-1 complete prompt g.
    shared_prefix: False repeats each prompt G times in one forward; True encodes each prompt once and
    shares its KV cache (Prefix Grouper); both give the same values and gradients.
    Values at padded completion positions are finite but meaningless: mask them with completion_mask.
    """
    try:
        group_size = operator.index(group_size)  # ints, numpy and 0-d torch integers; not floats
    except TypeError:
        raise ValueError(f"group_size must be a positive int (completions per prompt), got {group_size!r}") from None
    _check_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask, group_size, temperature)
    return _LOGPROB_PATHS[bool(shared_prefix)](
        model, prompt_ids, prompt_mask, completion_ids, completion_mask, group_size, temperature
    )

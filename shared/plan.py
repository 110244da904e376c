"""What `--dry-run` prints: the run's plan, from a validated config, without loading any weights.

Both front ends (`flowalign/train.py --dry-run`, `llmalign grpo|dpo --dry-run`) check the model source, the data
and the reward signatures, then print one `name: value` line per plan entry. Hub ids (models, datasets) are
checked by form only (huggingface_hub's validate_repo_id): nothing here touches the network.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.config import ConfigError, local_path_problem


def world_size() -> int:
    """The number of processes a launcher started this one among (accelerate launch and torchrun set
    WORLD_SIZE), else 1; read from the environment so that no accelerator or process group is created."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(value)
    except ValueError:
        raise ConfigError(
            f"environment variable WORLD_SIZE={value!r} is not an integer; unset it or give a count"
        ) from None
    if world < 1:
        raise ConfigError(f"environment variable WORLD_SIZE={world} is below 1; unset it or give a count")
    return world


def require_divisible(value: int, world: int, field: str, what: str) -> None:
    """The refusal Run.require_divisible makes when training starts, made here before anything loads."""
    if value % world:
        raise ConfigError(
            f"config field '{field}': {value} {what} do not split over {world} processes; "
            f"use a multiple of {world} (batch sizes count over all processes)"
        )


def hub_id_problem(value: str) -> str | None:
    """Why `value` is not a well-formed hub repository id ('name' or 'org/name'), or None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as error:
        return str(error).strip().splitlines()[0]
    return None


def describe_source(value: str, field: str, embedded: str | None = None, kind: str = "model") -> str:
    """'embedded', 'local directory ...' or 'hub id ... (form checked, not downloaded)' for a model or dataset
    path; a missing local path or a malformed hub id is a ConfigError naming `field`."""
    if embedded is not None and (value == embedded or value.startswith(embedded + "/")):
        return f"{value} (the project's embedded {kind}, built locally on first use)"
    local = Path(value).expanduser()
    if local.exists():
        return f"{value} (local {'directory' if local.is_dir() else 'file'})"
    problem = local_path_problem(value)
    if problem is None:
        problem = hub_id_problem(value)
        if problem is not None:
            problem = f"{value!r} is neither a local path nor a hub id ({problem}); give a directory or org/name"
    if problem is not None:
        raise ConfigError(f"config field '{field}': {problem}")
    return f"{value} (hub id: form checked, not downloaded; needs the hub or a local cache)"


def format_plan(title: str, rows: list[tuple[str, object]]) -> str:
    """`title` then one aligned 'name: value' line per row."""
    width = max(len(name) for name, _ in rows)
    return "\n".join([title] + [f"  {name.ljust(width)} : {value}" for name, value in rows])

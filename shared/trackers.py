"""Experiment trackers for both front ends, through accelerate's (`Accelerator(log_with=...)`, `init_trackers`,
`Accelerator.log`); `shared.run.Run` drives them from the main process only.

`log.report_to` names them. Each is an optional pip extra of this package (`pip install 'flowalign[wandb]'`),
imported only when named; a named tracker that is not installed is refused with the extra to install, before any
model loads (accelerate would drop it silently). What each receives:
- every number of every metrics.jsonl record, at the record's iteration as the step (on resume the steps go on
  from the checkpoint's, and TensorBoard hides what the interrupted run logged after it: `purge_step`);
  strings, lists and mappings stay in metrics.jsonl alone;
- flowalign's eval image grids as images (tensorboard, wandb);
- llmalign's sample completions as a table (wandb), or as a markdown table in TensorBoard's text tab.
Local files (TensorBoard's events, wandb's, trackio's and mlflow's stores unless TRACKIO_DIR or MLFLOW_TRACKING_URI
say otherwise) go under log.output_dir/trackers.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path
from typing import Any, Literal

TrackerName = Literal["tensorboard", "wandb", "trackio", "mlflow"]
TRACKERS: tuple[str, ...] = ("tensorboard", "wandb", "trackio", "mlflow")  # each is also the name of its pip extra
# the distributions that provide each (mlflow-skinny is mlflow without its server)
_DISTRIBUTIONS = {
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
    "trackio": ("trackio",),
    "mlflow": ("mlflow", "mlflow-skinny"),
}
TRACKER_DIR = "trackers"  # under log.output_dir
IMAGE_TRACKERS = ("tensorboard", "wandb")  # accelerate's trackers with log_images
TABLE_TRACKERS = ("wandb",)  # with log_table; TensorBoard gets a markdown table as text instead


def installed(tracker: str) -> bool:
    """Whether the package of `tracker` is installed, read from its distribution's metadata (a directory that
    merely bears the name, such as the ./wandb a wandb run leaves behind, does not count). Nothing is imported."""
    for distribution in _DISTRIBUTIONS[tracker]:
        try:
            importlib.metadata.distribution(distribution)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


def report_to_problem(names: list[str]) -> str | None:
    """Why the trackers `names` (log.report_to) cannot be used here, or None. Unknown names are left to the
    field's Literal type."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        return f"{repeated[0]!r} is named twice; name each tracker once"
    missing = [name for name in names if not installed(name)]
    if missing:
        one = len(missing) == 1
        return (
            f"{', '.join(missing)} {'is' if one else 'are'} not installed; pip install "
            f"'flowalign[{','.join(missing)}]', or drop {'it' if one else 'them'} from log.report_to"
        )
    return None


def init_kwargs(names: list[str], out: Path, purge_step: int | None) -> dict[str, dict]:
    """Per-tracker arguments for `Accelerator.init_trackers`: the run directory's name as the run's name, wandb's
    local files under out/trackers, and TensorBoard's purge step (events the interrupted run logged at or after it
    are hidden, as metrics.jsonl is trimmed back to the checkpoint). TensorBoard writes to out/trackers/<project>
    (accelerate's logging_dir, set by Run)."""
    kwargs: dict[str, dict] = {
        "tensorboard": {} if purge_step is None else {"purge_step": purge_step},
        "wandb": {"name": out.name, "dir": str(out / TRACKER_DIR)},
        "trackio": {"name": out.name},
        "mlflow": {"run_name": out.name},
    }
    return {name: kwargs[name] for name in names}


def local_storage(names: list[str], out: Path) -> None:
    """Point the trackers that keep a local store elsewhere by default into out/trackers, unless the user chose a
    place: trackio (~/.cache/huggingface/trackio; TRACKIO_DIR, read when trackio is imported) and mlflow (./mlruns
    or ./mlflow.db; MLFLOW_TRACKING_URI). Call it before the trackers start; it imports mlflow when named."""
    import os
    import sys

    local = out / TRACKER_DIR
    local.mkdir(parents=True, exist_ok=True)  # wandb's dir must exist
    if "trackio" in names and "TRACKIO_DIR" not in os.environ and "trackio" not in sys.modules:
        os.environ["TRACKIO_DIR"] = str((local / "trackio").resolve())
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        mlflow.set_tracking_uri((local / "mlruns").resolve().as_uri())


def scalars(record: dict, step_key: str = "iteration") -> dict[str, float | int]:
    """The numbers of a metrics record, for the trackers: ints and floats (booleans as 0/1), the step key left
    out; strings, lists, mappings and None dropped (a tracker may refuse them, and they are in metrics.jsonl)."""
    values: dict[str, float | int] = {}
    for key, value in record.items():
        if key == step_key:
            continue
        if isinstance(value, bool):
            values[key] = int(value)
        elif isinstance(value, (int, float)):
            values[key] = value
    return values


def flat_config(config: dict) -> dict[str, Any]:
    """The config (`to_dict`: section -> field -> value) as `section.field` keys with str/int/float/bool/None
    values, for a tracker's hyperparameters: lists, mappings (reward weights), null and non-finite floats as JSON
    text (TensorBoard's hparams take none of them)."""
    flat: dict[str, Any] = {}
    for section, fields in config.items():
        for field, value in fields.items() if isinstance(fields, dict) else [("", fields)]:
            name = f"{section}.{field}" if field else section
            if isinstance(value, (list, tuple, dict)):
                value = json.dumps(value)
            elif value is None or (isinstance(value, float) and not math.isfinite(value)):
                value = json.dumps(value)
            flat[name] = value
    return flat


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (TensorBoard's text tab renders it); cells on one line, pipes escaped."""

    def cell(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def completions_table(sample: dict) -> tuple[list[str], list[list[Any]]]:
    """A samples.jsonl record (`prompt`, `completions`, `rewards`: reward name -> one score per completion) as
    table columns and one row per completion."""
    names = list(sample["rewards"])
    rows = [
        [sample["prompt"], completion, *(sample["rewards"][name][i] for name in names)]
        for i, completion in enumerate(sample["completions"])
    ]
    return ["prompt", "completion", *names], rows

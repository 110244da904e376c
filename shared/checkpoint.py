"""Checkpoint I/O: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a directory `step-000010/` holding `<name>.safetensors` + `<name>.json` pairs
(for example `optimizer`, `rng`, `trainer`). It is written under a temporary name and renamed
into place, and `latest` (a text file naming the newest checkpoint) is replaced atomically
afterwards, so a crash mid-write never damages the previous checkpoint. Nothing is unpickled:
nested state (optimizer state dicts, RNG states) is split into a tensor dict and a JSON skeleton.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

RUN_LOGS = ("metrics.jsonl", "samples.jsonl", "config_changes.jsonl")  # records keyed by "iteration", trimmed on resume
_TENSOR_REF = "__tensor__"  # a JSON marker that stands for an entry of the safetensors file
_TUPLE = "__tuple__"


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor] | None = None, path: str = "") -> tuple[Any, dict]:
    """Split nested state into a JSON-able skeleton and a flat `{key: tensor}` dict."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR_REF: key}, tensors
    if isinstance(obj, np.ndarray):
        return flatten_state(torch.from_numpy(obj.copy()), tensors, path)
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"checkpoint state at '{path}': only str/int keys can be saved")
        items = [[k, flatten_state(v, tensors, f"{path}.{k}" if path else str(k))[0]] for k, v in obj.items()]
        return {"__dict__": items}, tensors
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{path}.{i}")[0] for i, v in enumerate(obj)]
        return ({_TUPLE: items} if isinstance(obj, tuple) else items), tensors
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item(), tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"checkpoint state at '{path}': cannot save a {type(obj).__name__}")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if _TENSOR_REF in skeleton:
            return tensors[skeleton[_TENSOR_REF]]
        if _TUPLE in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton[_TUPLE])
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_state(directory: Path, name: str, state: Any) -> None:
    skeleton, tensors = flatten_state(state)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(directory: Path, name: str) -> Any:
    directory = Path(directory)
    tensors = load_file(str(directory / f"{name}.safetensors"))
    return unflatten_state(json.loads((directory / f"{name}.json").read_text()), tensors)


def rng_state() -> dict:
    """Python, numpy and torch (CPU, and CUDA when present) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


class WriteError(RuntimeError):
    """A file of the run could not be written (a full disk, a read-only or vanished directory), as one line that
    names the path; the command lines exit with code 5."""


_RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")


def io_failure(error: BaseException) -> str | None:
    """The operating system's reason when `error` is an I/O failure, else None: an OSError, or the error of a
    Rust-backed writer, which raises its own exception type with the system's message and "(os error N)" in it
    (safetensors: SafetensorError "...I/O error: File too large (os error 27)"; tokenizers, saving tokenizer.json
    on a full disk here: a plain Exception "No space left on device (os error 28)")."""
    if isinstance(error, OSError):
        reason = os.strerror(error.errno) if error.errno else str(error)
        return f"{reason}: {error.filename}" if error.filename else reason
    match = _RUST_IO_ERROR.search(str(error))
    return os.strerror(int(match.group(1))) if match else None


def checkpoints_by_step(root: Path) -> list[Path]:
    """The `step-*` checkpoint directories under `root`, oldest first by step number (not by name, which puts
    step-1000000 before step-999999)."""
    found = [path for path in Path(root).glob("step-*") if path.name.removeprefix("step-").isdigit()]
    return sorted(found, key=lambda path: int(path.name.removeprefix("step-")))


def point_symlink(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target` (relative to the link's directory) atomically: a temporary link is
    renamed over it, so `link` names either the old or the new target at every moment, never nothing."""
    link = Path(link)
    tmp = link.parent / f".{link.name}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, link.parent))
    os.replace(tmp, link)


def save_checkpoint(
    root: str | Path,
    step: int,
    states: dict[str, Any],
    keep_last: int | None = None,
    extra_writer=None,
    link: tuple[Path, str] | None = None,
) -> Path:
    """Write `root/step-{step:06d}/` atomically, then point `root/latest` at it.

    states: name -> nested state (tensors, numbers, strings, lists, dicts).
    extra_writer: optional `fn(tmp_dir)` for files in other formats (a LoRA adapter directory, say).
    link: optional (symlink, path inside the checkpoint), e.g. (RUN/final, "model"): re-pointed atomically right
    after `latest`, before older checkpoints are deleted, so it never names a deleted one.
    keep_last: delete older checkpoints beyond this many (by step number), only after the new one is in place.
    A write that fails for an I/O reason (a full disk) raises WriteError naming the checkpoint; the unfinished
    directory is removed and `latest` still names the previous checkpoint, untouched.
    """
    root = Path(root)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    pointer_tmp = root / f".latest.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, state in states.items():
            save_state(tmp, name, state)
        if extra_writer is not None:
            extra_writer(tmp)
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step replaces it as a whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, root / "latest")
        if link is not None:
            point_symlink(link[0], final / link[1])
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)  # also frees the space a full disk needs
        pointer_tmp.unlink(missing_ok=True)
        reason = io_failure(error)
        if reason is None:
            raise
        previous = latest_checkpoint(root)
        kept = f"{previous} is intact and --resume starts from it" if previous else "no earlier checkpoint exists"
        reason = reason.replace(str(tmp), str(final))  # the file's name in the checkpoint, not in its temporary
        raise WriteError(f"cannot write checkpoint {final} ({reason}); {kept}") from None
    if keep_last is not None:
        for old in checkpoints_by_step(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_crash_leftovers(out: Path) -> list[Path]:
    """Delete what a run killed in the middle of a checkpoint leaves behind: unfinished `.tmp-step-*` directories
    and temporary `latest` pointers under out/checkpoints, temporary symlinks (`.final.tmp-*`) and temporary
    trimmed logs (`.metrics.jsonl.tmp-*`) in out.
    Returns what was removed. Call it before the run writes anything, on the main process."""
    removed = []
    checkpoints = out / "checkpoints"
    for path in sorted(checkpoints.glob(".tmp-step-*")) + sorted(checkpoints.glob(".latest.tmp-*")):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        removed.append(path)
    for path in sorted(out.glob(".*.tmp-*")):
        # point_symlink's temporary links and truncate_metrics's temporary logs (not replaced_atomically's
        # directories, which belong to other builds)
        if path.is_symlink() or (path.is_file() and path.name.split(".tmp-")[0][1:] in RUN_LOGS):
            path.unlink()
            removed.append(path)
    return removed


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `root/latest` names, or None when there is none yet."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if path.is_dir() else None


def open_output_dir(out: str | Path, resume: bool, write: bool = True) -> Path | None:
    """The checkpoint a run starts from (None: step 0), decided before anything loads.

    A fresh run (resume False) into an output directory that already holds a checkpoint is refused, so it
    neither mixes its logs and checkpoints with the old run's nor overwrites them; --resume takes the latest
    checkpoint. A run that starts from step 0 either way (a directory whose run stopped before its first
    checkpoint) has its logs started afresh, since it writes every line of them again. With `write` (the main
    process), what a run killed mid-checkpoint left behind is removed first (`remove_crash_leftovers`)."""
    from shared.config import ConfigError
    from shared.runlog import truncate_metrics

    out = Path(out)
    checkpoint = latest_checkpoint(out / "checkpoints")
    if checkpoint is not None and not resume:
        raise ConfigError(
            f"log.output_dir: {out} already holds a run (checkpoint {checkpoint.name}); continue it with "
            f"--resume, or set log.output_dir to a new directory (or delete this one)"
        )
    if write:
        for path in remove_crash_leftovers(out):
            print(f"removed {path}: left unfinished by a run killed while writing a checkpoint", flush=True)
    if checkpoint is None and write:
        for log in RUN_LOGS:
            truncate_metrics(out / log, -1)
    return checkpoint


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def trainable_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in transformer.named_parameters() if p.requires_grad}


def load_trainable_state(transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(transformer.named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise ValueError(
            f"checkpoint has parameters the model lacks, e.g. {missing[:3]}; was it made with another config?"
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


@contextlib.contextmanager
def replaced_atomically(out: str | Path):
    """Yield a temporary sibling directory to fill; on success it replaces `out` by a rename, so an
    interrupted build never leaves a half-written `out` (nor damages an older one until the swap)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

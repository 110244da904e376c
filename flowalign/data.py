"""What the flow recipes read: prompt lists (config data.*), the iteration's prompt draw, and a pairs file
(data.pairs_file of flowalign/preference.py). Errors are one-line ConfigErrors naming the config field."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from flowalign.config import FlowGRPOConfig
from flowalign.prompts import dataset_prompts
from shared.config import ConfigError, read_text_file


def prompt_lines(path: str, field: str) -> list[str]:
    text = read_text_file(
        path, f"config field '{field}':", "give a UTF-8 text file, one prompt a line"
    )  # missing or not UTF-8: a config error
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompts(config: FlowGRPOConfig) -> tuple[list[str], list[str]]:
    """(training prompts, evaluation prompts). Training: data.prompts, data.prompts_file or data.prompts_dataset;
    evaluation: data.eval_prompts, data.eval_prompts_file or data.eval_split, else the training prompts
    (config.validate allows one source of each)."""
    d = config.data
    prompts = d.prompts
    if d.prompts_file:
        prompts = prompt_lines(d.prompts_file, "data.prompts_file")
    elif d.prompts_dataset:
        prompts = dataset_prompts(d.prompts_dataset, d.prompts_split, d.prompts_column)
    if not prompts:
        raise ConfigError("config field 'data.prompts': no prompts; list some or set data.prompts_file")
    eval_prompts = d.eval_prompts
    if d.eval_prompts_file:
        eval_prompts = prompt_lines(d.eval_prompts_file, "data.eval_prompts_file")
        if not eval_prompts:
            raise ConfigError(
                f"config field 'data.eval_prompts_file': {d.eval_prompts_file} holds no prompts; "
                f"write one a line, or unset it to evaluate on the training prompts"
            )
    elif d.eval_split:
        eval_prompts = dataset_prompts(d.prompts_dataset, d.eval_split, d.prompts_column, "data.eval_split")
    return prompts, (eval_prompts or prompts)


def draw_prompts(prompts: list[str], count: int, generator: torch.Generator) -> list[str]:
    """The iteration's global prompt list (more asked than exist: go round again)."""
    rounds = -(-count // len(prompts))
    chosen = torch.cat([torch.randperm(len(prompts), generator=generator) for _ in range(rounds)])
    return [prompts[i] for i in chosen[:count].tolist()]


# ------------------------------------------------------------------------------ pairs from a file
@dataclasses.dataclass
class PairRecord:
    line: int
    prompt: str
    winner: Path
    loser: Path


def read_image(path: Path) -> torch.Tensor:
    """[3, H, W] in [0, 1]; PIL's errors propagate (the caller names the line)."""
    import numpy as np  # imported when a pairs file is read: PIL is not needed otherwise
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def read_pairs_file(path: str) -> tuple[list[PairRecord], tuple[int, int]]:
    """Read and check every line of data.pairs_file: (records, (H, W) of the images). A line that is not a JSON
    object with a non-empty "prompt" and "winner"/"loser" image paths (relative to the file) that open as images
    of one size, the same on every line, is a ConfigError naming the line."""
    field = "config field 'data.pairs_file'"
    source = Path(path).expanduser()
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{field}: cannot read {path} ({error}); give a UTF-8 jsonl file") from None
    records, size = [], None
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{field}: {path} line {number}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where}: not JSON ({error.msg}); write one object per line") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "winner", "loser")):
            raise ConfigError(f'{where}: needs string fields "prompt", "winner" and "loser"')
        if not row["prompt"].strip():
            raise ConfigError(f"{where}: empty prompt; give the prompt the images were made for")
        images = {}
        for side in ("winner", "loser"):
            image_path = source.parent / row[side]
            if not image_path.is_file():
                raise ConfigError(f"{where}: {side} image {row[side]!r} not found next to the file")
            try:
                images[side] = read_image(image_path)
            except Exception as error:  # PIL raises several kinds for a broken file
                raise ConfigError(f"{where}: {side} image {row[side]!r} is unreadable ({error})") from None
        shapes = {side: tuple(image.shape[1:]) for side, image in images.items()}
        if shapes["winner"] != shapes["loser"]:
            raise ConfigError(f"{where}: winner is {shapes['winner']} and loser {shapes['loser']} pixels; sizes differ")
        if size is not None and shapes["winner"] != size:
            raise ConfigError(f"{where}: images are {shapes['winner']} pixels, earlier lines {size}; use one size")
        size = shapes["winner"]
        records.append(
            PairRecord(number, row["prompt"].strip(), source.parent / row["winner"], source.parent / row["loser"])
        )
    if not records:
        raise ConfigError(f"{field}: {path} holds no pairs; write one JSON object per line")
    return records, size

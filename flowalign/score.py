"""Score a folder of images with any reward: `flowalign-score --reward module:name --images DIR --prompts FILE`.

Prompts: a text file with one prompt per line, matched to the images in sorted file-name order, or a JSON
object {file name: prompt}. Prints `file,score` lines (CSV) to stdout, or writes them with --out.

    flowalign-score --reward flowalign.rewards:jpeg_compressibility --images samples/ --prompts prompts.txt
    flowalign-score --reward flowalign.rewards.models:clip_score --kwargs '{"model_name": "ViT-B-32"}' \\
        --images samples/ --prompts prompts.json --out scores.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def read_images_and_prompts(images_dir: Path, prompts_file: Path) -> tuple[list[Path], list[str]]:
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"--images {images_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
    text = prompts_file.read_text()
    if prompts_file.suffix.lower() == ".json":
        mapping = json.loads(text)
        missing = [f.name for f in files if f.name not in mapping]
        if missing:
            raise SystemExit(f"--prompts {prompts_file}: no prompt for {missing[:5]}; add them to the JSON object")
        return files, [mapping[f.name] for f in files]
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if len(prompts) != len(files):
        raise SystemExit(
            f"--prompts {prompts_file}: {len(prompts)} prompts for {len(files)} images; give one line per "
            "image in sorted file-name order, or a JSON object {file name: prompt}"
        )
    return files, prompts


def load_batch(files: list[Path]) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1]; images of different sizes are resized to the first one's size."""
    first = Image.open(files[0]).convert("RGB")
    arrays = [np.asarray(Image.open(f).convert("RGB").resize(first.size, Image.BICUBIC)) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # [B, 3, H, W]


def main(argv: list[str] | None = None) -> None:
    from flowalign.rewards.plugins import RewardError, call_reward, load_reward

    parser = argparse.ArgumentParser(
        prog="flowalign-score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reward", required=True, help="import path module:name of a reward or reward factory")
    parser.add_argument("--kwargs", default="{}", help="JSON object of factory arguments")
    parser.add_argument("--images", required=True, type=Path, help="folder of images")
    parser.add_argument("--prompts", required=True, type=Path, help="prompts: text file (a line per image) or JSON")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, help="write the CSV here instead of stdout")
    args = parser.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--kwargs: not a JSON object ({error})") from None
    files, prompts = read_images_and_prompts(args.images, args.prompts)
    try:
        reward = load_reward(args.reward, kwargs)
        rows = []
        for start in range(0, len(files), args.batch_size):
            chunk, texts = files[start : start + args.batch_size], prompts[start : start + args.batch_size]
            scores = call_reward(args.reward, reward, load_batch(chunk), texts, [{"file": f.name} for f in chunk])
            rows += [(f.name, float(s)) for f, s in zip(chunk, scores)]
    except RewardError as error:
        raise SystemExit(f"reward error: {error}") from None
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "score"])
    writer.writerows(rows)
    if args.out:
        args.out.write_text(buffer.getvalue())
    else:
        sys.stdout.write(buffer.getvalue())


if __name__ == "__main__":
    main()

"""What a researcher looks at: image grids of evaluation samples and reward curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def save_image_grid(
    images: torch.Tensor,
    rows: int,
    path: str | Path,
    labels: list[str] | None = None,
    min_cell: int = 64,
    fps: int = 16,
) -> None:
    """images [rows*cols, 3, H, W] in [0, 1], row-major -> one PNG; small images are upscaled (nearest). Videos
    [rows*cols, F, 3, H, W]: each cell of the PNG is the sample's F frames side by side, left to right (a frame
    strip), and an animated GIF beside it (path with .gif) plays the grid frame by frame at `fps` (Wan: 16)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if images.ndim == 5:
        strips = images.permute(0, 2, 3, 1, 4).flatten(3)  # [N, 3, H, F*W]: frame f at columns f*W .. (f+1)*W
        _grid_canvas(strips, rows, labels, min_cell).save(path)
        frames = [_grid_canvas(images[:, f], rows, labels, min_cell) for f in range(images.shape[1])]
        frames[0].save(Path(path).with_suffix(".gif"), save_all=True, append_images=frames[1:], duration=1000 // fps)
        return
    _grid_canvas(images, rows, labels, min_cell).save(path)


def _grid_canvas(images: torch.Tensor, rows: int, labels: list[str] | None, min_cell: int) -> Image.Image:
    """images [rows*cols, 3, H, W] in [0, 1] as one labelled RGB canvas."""
    count, _, height, width = images.shape
    cols = count // rows
    zoom = max(1, -(-min_cell // max(height, width)))  # ceil: tiny toy images stay visible
    label_width = 8 * max((len(label) for label in labels), default=0) + 8 if labels else 0
    cells = images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, 3]
    canvas = Image.new("RGB", (label_width + cols * width * zoom, rows * height * zoom), "white")
    for index in range(rows * cols):
        r, c = divmod(index, cols)
        cell = Image.fromarray(np.ascontiguousarray(cells[index])).resize((width * zoom, height * zoom), Image.NEAREST)
        canvas.paste(cell, (label_width + c * width * zoom, r * height * zoom))
    if labels:
        draw = ImageDraw.Draw(canvas)
        for r, label in enumerate(labels[:rows]):
            draw.text((4, r * height * zoom + height * zoom // 2 - 5), label, fill="black")
    return canvas

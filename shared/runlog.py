"""Run logs both front ends write: metrics.jsonl (one JSON record per iteration) and curve plots."""

from __future__ import annotations

import json
from pathlib import Path


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, iteration: int) -> None:
    """After a resume, drop records written after the checkpoint (they will be written again)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["iteration"] <= iteration]
        path.write_text("".join(line + "\n" for line in keep))


def plot_curves(metrics_path: str | Path, out_path: str | Path, keys: list[str], title: str) -> list[str]:
    """Plot `keys` from a metrics.jsonl against the iteration; returns the keys that were found."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    found = [key for key in keys if any(key in r for r in records)]
    fig, axes = plt.subplots(1, max(1, len(found)), figsize=(4.5 * max(1, len(found)), 3.2), squeeze=False)
    for axis, key in zip(axes[0], found):
        points = [(r["iteration"], r[key]) for r in records if key in r]
        axis.plot(*zip(*points), marker="." if len(points) < 30 else None)
        axis.set_xlabel("iteration")
        axis.set_title(key)
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return found

"""Run logs both front ends write: metrics.jsonl (one JSON record per iteration) and curve plots."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, iteration: int) -> None:
    """After a resume, drop records written after the checkpoint (they will be written again).

    A line that is not valid JSON (the last line of a run killed while appending it) is dropped with a warning
    on stderr. The trimmed file replaces the old one by a rename, so a kill during the trim loses nothing."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(
                f"warning: {path} line {number} is cut off ({len(line)} characters, not a whole JSON record; "
                f"a run killed while writing it): dropped",
                file=sys.stderr,
                flush=True,
            )
            continue
        if record["iteration"] <= iteration:
            keep.append(line)
    if keep == lines:
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            handle.write("".join(line + "\n" for line in keep))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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

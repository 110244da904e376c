"""A reward plug-in for the multi-process tests: it records which process scored which samples, then scores
images by their mean brightness. Named in a config as `tests.flow_rank_probe:recording_reward` with
`reward.kwargs` giving `directory`."""

from __future__ import annotations

import json
import os
from pathlib import Path


def process_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def recording_reward(directory: str):
    """Factory: a reward that appends one JSON line per call to `directory/rank{r}.jsonl`: the rank, and the
    metadata of every sample it was asked to score."""
    Path(directory).mkdir(parents=True, exist_ok=True)

    def reward(images, prompts, metadata):
        rank = process_rank()
        with open(Path(directory) / f"rank{rank}.jsonl", "a") as log:
            log.write(json.dumps({"rank": rank, "prompts": list(prompts), "metadata": list(metadata)}) + "\n")
        return images.mean(dim=(1, 2, 3))  # [B]

    return reward

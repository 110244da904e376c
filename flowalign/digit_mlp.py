"""A second digit classifier for the embedded toy, built differently from the reward the recipes train on: a held-out
judge for over-optimisation (a policy that games the toy's CNN need not fool this one).

The toy's reward (`flowalign.rewards:digit_classifier_reward`) is a CNN (three 3x3 convolutions, seed 0, trained on
shifted, contrast-jittered, noisy digits). This one is a two-layer MLP over the 16x16 gray pixels, seed 1, trained
without augmentation, on the same training split of sklearn's digits (the toy's held-out split is left out of both):
another architecture, another seed, other training data views. Its weights are shipped in
`flowalign/embedded/digit-mlp-v1` (digest SHIPPED_DIGEST); a missing or changed copy is rebuilt, deterministically on
one thread, into the cache.

    python -m flowalign.digit_mlp build [DIR]     # train it (about 10 s on one CPU thread) into DIR
    python -m flowalign.digit_mlp digest [DIR]    # the digest of a build (default: the shipped one)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowalign import toy
from shared.embedded import MISSING, build_threads, cache_problem, directory_digest, record_digest, shipped_or_none

SEED = 1
EPOCHS = 40
SHIPPED_DIR = Path(__file__).resolve().parent / "embedded" / "digit-mlp-v1"
SHIPPED_DIGEST = "sha256:b06f407118e2d4bb3a1ca134e9991083c288df07334c8e7844b44e64452a79e9"
"""`shared.embedded.directory_digest` of the shipped build (`python -m flowalign.digit_mlp digest`)."""


class DigitMLP(nn.Module):
    """logits [B, 10] from images [B, 1 or 3, H, W] in [0, 1] (ink = 1): gray, resized to image_size, flattened,
    one hidden layer."""

    def __init__(self, image_size: int = toy.IMAGE_SIZE, hidden: int = 128):
        super().__init__()
        self.image_size, self.hidden = image_size, hidden
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(image_size * image_size, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 10)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [B, 1 or 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        gray = images.float().mean(dim=1, keepdim=True)  # [B, 1, H, W]
        if gray.shape[-2:] != (self.image_size, self.image_size):
            gray = F.interpolate(gray, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.layers(gray)  # [B, 10]


def train_digit_mlp(images: torch.Tensor, labels: torch.Tensor, epochs: int = EPOCHS, seed: int = SEED) -> DigitMLP:
    """Cross-entropy, AdamW, batches of 32, no augmentation; images [N, 1, H, W] in [0, 1]."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitMLP(image_size=images.shape[-1]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
    for _ in range(epochs):
        for index in torch.randperm(len(images), generator=generator).split(32):
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


def heldout_accuracy(model: nn.Module) -> float:
    """Accuracy on the toy's held-out split of the digit images (toy.digit_split), which no classifier trains on."""
    images, labels = toy.load_digit_images()
    _, heldout = toy.digit_split(len(labels))
    with torch.no_grad():
        return (model(images[heldout]).argmax(-1) == labels[heldout]).float().mean().item()


def build_digit_mlp(out: str | os.PathLike) -> float:
    """Train on the toy's training split and save model.safetensors + config.json (+ digest.txt) to `out`; returns
    the held-out accuracy."""
    from safetensors.torch import save_file

    with build_threads():
        images, labels = toy.load_digit_images()
        train, _ = toy.digit_split(len(labels))
        model = train_digit_mlp(images[train], labels[train])
        accuracy = heldout_accuracy(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = {"image_size": model.image_size, "hidden": model.hidden, "seed": SEED, "epochs": EPOCHS}
    (out / "config.json").write_text(json.dumps({**config, "heldout_accuracy": round(accuracy, 4)}, indent=2))
    record_digest(out)
    return accuracy


def is_complete(path: str | os.PathLike) -> bool:
    return all((Path(path) / name).is_file() for name in ("model.safetensors", "config.json"))


def ensure_digit_mlp(path: str | os.PathLike | None = None) -> str:
    """`path` if given (built there if missing or damaged), else the shipped copy when its digest is SHIPPED_DIGEST,
    else the cache next to the toy's (built once)."""
    if path is None:
        shipped = shipped_or_none(SHIPPED_DIR, SHIPPED_DIGEST, is_complete)
        if shipped is not None:
            return str(shipped)
    out = Path(path).expanduser() if path is not None else toy.default_cache_dir().parent / SHIPPED_DIR.name
    problem = cache_problem(out, is_complete)
    if problem is not None:
        print(f"{'' if problem == MISSING else f'the digit MLP in {out} {problem}; '}building it into {out}")
        build_digit_mlp(out)
    return str(out)


def load_digit_mlp(path: str | os.PathLike | None = None) -> DigitMLP:
    """The classifier (shipped, cached or built), in eval mode, frozen."""
    from safetensors.torch import load_file

    directory = Path(ensure_digit_mlp(path))
    config = json.loads((directory / "config.json").read_text())
    model = DigitMLP(image_size=config["image_size"], hidden=config["hidden"])
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flowalign.digit_mlp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="train the MLP into DIR")
    build.add_argument("path", nargs="?", default=str(SHIPPED_DIR))
    digest = sub.add_parser("digest", help="print the digest of a build directory (default: the shipped one)")
    digest.add_argument("path", nargs="?", default=str(SHIPPED_DIR))
    args = parser.parse_args(argv)
    if args.command == "digest":
        print(directory_digest(args.path))
        return
    accuracy = build_digit_mlp(args.path)
    print(f"digit MLP: held-out accuracy {accuracy:.4f}; digest {directory_digest(args.path)}")


if __name__ == "__main__":
    main()
